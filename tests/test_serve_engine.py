"""The serving engine (moeops.serve.engine) on real ONNX Runtime sessions of the served test models:
continuous batching gives each request the results it gets alone (on the fp32 graph to float rounding;
on int8 measured, since an int8 graph that quantizes activations per tensor couples a batch's rows),
cancellation frees the slot, a full queue refuses at once, stop strings, prompt logprobs, the context limit, timeouts,
drain, the optimized-graph cache and torch-free import."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from moeops.sampling import sample_next
from moeops.serve.engine import (
    Engine,
    EngineClosed,
    EngineFull,
    SamplingParams,
    merge_caches,
    prefill_groups,
    stream_text,
    trim_padding,
)

REPO = Path(__file__).resolve().parents[1]
GREEDY = {"temperature": 0.0}
SAMPLED = {"temperature": 0.8, "top_p": 0.9}


@pytest.fixture(scope="module")
def fp32_dir(served_registry, tmp_path_factory) -> Path:
    """v1's fp32 graph as a served model directory (model.onnx + config + tokenizer + lineage checksums)."""
    from stages.quantize import describe

    base = served_registry["versions"]["v1"].parents[1]  # <seed dir>/onnx/int8
    out = tmp_path_factory.mktemp("fp32") / "fp32"
    out.mkdir()
    shutil.copyfile(base / "fp32.onnx", out / "model.onnx")
    describe(out, base / "model", {"stage": "test", "variant": "fp32"})
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ort-cache")


@pytest.fixture(scope="module")
def fp32(fp32_dir, cache_dir):
    engine = Engine(fp32_dir, version="test-fp32", variant="fp32", max_batch=16, threads=1, cache_dir=cache_dir)
    engine.start()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def int8(served_registry, cache_dir):
    engine = Engine(served_registry["versions"]["v1"], version="test-int8", max_batch=16, threads=1,
                    cache_dir=cache_dir)
    engine.start()
    yield engine
    engine.close()


def prompts_and_lengths(vocab: int, n: int = 16, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """Prompts of 1..60 tokens and 1..40 new tokens; request 0 is the longest to generate, so that the
    late requests join while it decodes."""
    rng = np.random.default_rng(seed)
    prompts = [[int(t) for t in rng.integers(1, vocab, int(rng.integers(1, 61)))] for _ in range(n)]
    max_tokens = [40] + [int(m) for m in rng.integers(1, 41, n - 1)]
    return prompts, max_tokens


async def collect(engine: Engine, prompt: list[int], params: SamplingParams, started: asyncio.Event | None = None):
    """(token ids, logprobs, text, finish_reason, deltas) of one request."""
    deltas = []
    async for d in engine.generate(prompt, params):
        deltas.append(d)
        if started is not None and len(deltas) == 2:
            started.set()
    ids = [t for d in deltas for t in d.token_ids]
    lps = np.array([lp.logprob for d in deltas for lp in d.logprobs])
    return ids, lps, "".join(d.text for d in deltas), deltas[-1].finish_reason, deltas


def run_alone_and_batched(engine: Engine, prompts, max_tokens, sampling: dict):
    """Each request alone (one after the other), then all 16 at once: 8 submitted together and 8 joining
    once request 0 is decoding."""
    def params(i):
        seed = {"seed": 100 + i} if sampling.get("temperature") else {}
        return SamplingParams(max_tokens=max_tokens[i], logprobs=0, ignore_eos=True, **sampling, **seed)

    async def alone():
        return [await collect(engine, p, params(i)) for i, p in enumerate(prompts)]

    async def batched():
        started = asyncio.Event()
        first = [asyncio.create_task(collect(engine, prompts[0], params(0), started))]
        first += [asyncio.create_task(collect(engine, prompts[i], params(i))) for i in range(1, 8)]
        await started.wait()
        late = [asyncio.create_task(collect(engine, prompts[i], params(i))) for i in range(8, 16)]
        return await asyncio.gather(*first, *late)

    return asyncio.run(alone()), asyncio.run(batched())


def wait_idle(engine: Engine, timeout_s: float = 10.0) -> bool:
    """True once nothing runs, waits or is being prefilled (a cancelled row leaves at the scheduler's next
    step; a newcomer taken from the queue is in neither count until its prefill ends, hence _inflight)."""
    deadline = time.monotonic() + timeout_s
    while engine.stats() != {"running": 0, "waiting": 0, "kv_cache_bytes": 0} or engine._inflight:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def batch_steps(version: str) -> tuple[float, float]:
    """(decode steps, decode steps with one row) recorded for a model version."""
    labels = {"model_version": version}
    return (REGISTRY.get_sample_value("moeops_batch_size_count", labels),
            REGISTRY.get_sample_value("moeops_batch_size_bucket", labels | {"le": "1.0"}))


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_batching_never_changes_results(variant, request):
    """Alone or in a batch with other prompt and output lengths (some joining mid-decode), a request gets
    the same greedy tokens, logprobs within 1e-4, and the same seeded samples: fp32, and int8 too because
    its weights are decoded at load and no activation is quantized per batch (see quantize_int8)."""
    engine = request.getfixturevalue(variant)
    prompts, max_tokens = prompts_and_lengths(engine.vocab_size)
    steps_before, single_before = batch_steps(engine.version)
    alone, batched = run_alone_and_batched(engine, prompts, max_tokens, GREEDY)
    steps, single = batch_steps(engine.version)
    assert steps - steps_before > single - single_before  # some decode steps really ran several rows
    for i, (a, b) in enumerate(zip(alone, batched)):
        assert a[0] == b[0] and len(a[0]) == max_tokens[i], i
        assert np.abs(a[1] - b[1]).max() < 1e-4, i
        assert a[3] == b[3] == "length"

    alone, batched = run_alone_and_batched(engine, prompts, max_tokens, SAMPLED)
    for a, b in zip(alone, batched):
        assert a[0] == b[0]  # same seed, same tokens, whatever else shares the batch
    assert engine.stats() == {"running": 0, "waiting": 0, "kv_cache_bytes": 0}


def test_prompt_logprobs_and_max_tokens_0(fp32):
    prompt = fp32.tokenizer.encode("def alpha_1(beta, alpha=None):\n    return beta").ids
    params = SamplingParams(max_tokens=0, prompt_logprobs=True, logprobs=2)
    _, _, text, finish, deltas = asyncio.run(collect(fp32, prompt, params))
    assert len(deltas) == 1 and deltas[0].token_ids == [] and text == "" and finish == "length"
    plp = deltas[0].prompt_logprobs
    assert len(plp) == len(prompt) and plp[0] is None
    assert [lp.token_id for lp in plp[1:]] == prompt[1:]
    assert all(len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1] and lp.top[0][1] >= lp.logprob for lp in plp[1:])
    # position i's logprobs are those of the next token after prompt[:i + 1]: the greedy first token there
    for i in (1, len(prompt) // 2, len(prompt) - 2):
        ids, lps, *_ = asyncio.run(collect(fp32, prompt[:i + 1], SamplingParams(max_tokens=1, ignore_eos=True,
                                                                                 logprobs=0, **GREEDY)))
        assert fp32.tokenizer.decode([ids[0]], skip_special_tokens=False) == plp[i + 1].top[0][0]
        assert abs(lps[0] - plp[i + 1].top[0][1]) < 1e-4


def test_stop_string_spanning_tokens(int8):
    prompt = int8.tokenizer.encode("def gamma_2(delta, gamma=None):\n").ids
    greedy = SamplingParams(max_tokens=60, ignore_eos=True, **GREEDY)
    ids, _, full, finish, _ = asyncio.run(collect(int8, prompt, greedy))
    assert finish == "length"
    pieces = [int8.tokenizer.decode(ids[:k + 1]) for k in range(len(ids))]
    # a stop string made of the last character of token k and the first of token k + 1, found first there
    stop = None
    for k in range(len(ids) - 1):
        end = len(pieces[k])
        candidate = full[end - 1:end + 1]
        if len(candidate) == 2 and "\ufffd" not in pieces[k + 1] + candidate and full.find(candidate) == end - 1 \
                and pieces[k + 1].startswith(pieces[k]):
            stop = candidate
            break
    assert stop is not None, full
    ids2, _, text, finish, deltas = asyncio.run(collect(int8, prompt, SamplingParams(
        max_tokens=60, ignore_eos=True, stop=("never appears", stop), **GREEDY)))
    assert finish == "stop" and text == full[:full.find(stop)] and stop not in text
    assert ids2 == ids[:len(ids2)] and len(ids2) < len(ids)


def test_context_limit_and_bad_prompts(int8):
    n = int8.max_seq_len
    long_prompt = [5] * (n - 3)
    ids, _, _, finish, _ = asyncio.run(collect(int8, long_prompt, SamplingParams(max_tokens=50, ignore_eos=True)))
    assert len(ids) == 3 and finish == "length"
    for prompt, params, field in (([], SamplingParams(max_tokens=1), "prompt"),
                                  ([5] * n, SamplingParams(max_tokens=1), "prompt"),
                                  ([5] * (n + 1), SamplingParams(max_tokens=0), "prompt"),
                                  ([int8.vocab_size], SamplingParams(max_tokens=1), "prompt"),
                                  ([5], SamplingParams(max_tokens=-1), "max_tokens"),
                                  ([5], SamplingParams(max_tokens=1, top_p=0.0), "top_p")):
        with pytest.raises(ValueError, match=field):
            asyncio.run(collect(int8, prompt, params))
    # the whole context as a prompt is fine when only its logprobs are asked for
    asyncio.run(collect(int8, [5] * n, SamplingParams(max_tokens=0, prompt_logprobs=True)))


def test_cancel_frees_the_slot(int8):
    async def main():
        params = SamplingParams(max_tokens=110, ignore_eos=True)
        a, b = int8.generate([3, 4, 5], params), int8.generate([6, 7], params)
        await anext(a), await anext(b)
        await anext(a), await anext(b)
        assert int8.stats()["running"] == 2
        await a.aclose()  # the client went away
        for _ in range(500):
            if int8.stats()["running"] == 1:
                break
            await asyncio.sleep(0.01)
        assert int8.stats()["running"] == 1
        n = 2 + sum([len(d.token_ids) async for d in b])
        assert n == 110  # the other one went on undisturbed
    asyncio.run(main())
    assert int8.stats() == {"running": 0, "waiting": 0, "kv_cache_bytes": 0}


def test_full_queue_refuses_at_once(served_registry):
    engine = Engine(served_registry["versions"]["v1"], version="test-full", max_batch=1, max_waiting=2, threads=1,
                    warmup=False)
    engine.start()
    long = SamplingParams(max_tokens=100, ignore_eos=True)

    async def main():
        running = engine.generate([3], long)
        await anext(running)
        queued = [asyncio.create_task(anext(engine.generate([4], long))) for _ in range(2)]
        while engine.stats()["waiting"] < 2:
            await asyncio.sleep(0.001)
        with pytest.raises(EngineFull) as full:
            await anext(engine.generate([5], long))
        assert full.value.retry_after_s >= 1
        queued[0].cancel()  # a queued client gives up: its place in the queue is free again
        await asyncio.gather(queued[0], return_exceptions=True)
        assert engine.stats()["waiting"] == 1
        third = asyncio.create_task(anext(engine.generate([5], long)))
        await running.aclose()
        assert (await third).finish_reason is None and (await queued[1]).finish_reason is None
    try:
        asyncio.run(main())
    finally:
        engine.close()


def test_request_timeout(served_registry):
    """8 requests of 110 tokens, one at a time, with 0.1 s each: those still queued or running at their
    deadline raise TimeoutError and leave nothing behind."""
    engine = Engine(served_registry["versions"]["v1"], version="test-timeout", max_batch=1, request_timeout_s=0.1,
                    threads=1, warmup=False)
    engine.start()

    async def main():
        runs = [collect(engine, [3 + i], SamplingParams(max_tokens=110, ignore_eos=True)) for i in range(8)]
        return await asyncio.gather(*runs, return_exceptions=True)
    try:
        results = asyncio.run(main())
        assert any(isinstance(r, TimeoutError) for r in results)
        assert all(isinstance(r, TimeoutError) or r[3] == "length" for r in results)
        assert wait_idle(engine) and engine._inflight == 0
        ids, *_ = asyncio.run(collect(engine, [3], SamplingParams(max_tokens=2, ignore_eos=True)))
        assert len(ids) == 2
    finally:
        engine.close()


def test_drain(served_registry):
    engine = Engine(served_registry["versions"]["v1"], version="test-drain", max_batch=4, threads=1, warmup=False)
    engine.start()
    drained = []

    async def main():
        streams = [engine.generate([3 + i], SamplingParams(max_tokens=60, ignore_eos=True)) for i in range(3)]
        for s in streams:
            await anext(s)
        waiter = threading.Thread(target=lambda: drained.append(engine.drain(30.0)))
        waiter.start()
        while engine._admitting:
            await asyncio.sleep(0.001)
        with pytest.raises(EngineClosed):
            await anext(engine.generate([3], SamplingParams(max_tokens=1)))
        finishes = [[d.finish_reason async for d in s][-1] for s in streams]
        await asyncio.to_thread(waiter.join)
        return finishes
    try:
        assert asyncio.run(main()) == ["length"] * 3  # in-flight requests finish
        assert drained == [True]
    finally:
        engine.close()


def test_second_engine_reuses_the_cached_graph(int8, served_registry, cache_dir):
    assert not int8.cache_hit  # the module's first engine on an empty cache_dir wrote it
    cached = list(cache_dir.glob(f"{int8.sha256[:16]}-ort{int8.ort_version}-CPUExecutionProvider-*.onnx"))
    assert len(cached) == 1 and not list(cache_dir.glob(".*"))  # no temp file left behind
    again = Engine(served_registry["versions"]["v1"], version="test-int8-again", max_batch=16, threads=1,
                   cache_dir=cache_dir)
    again.start()
    try:
        assert again.cache_hit
        params = SamplingParams(max_tokens=20, logprobs=3, seed=1, **SAMPLED)
        first = asyncio.run(collect(int8, [3, 4, 5], params))
        second = asyncio.run(collect(again, [3, 4, 5], params))
        assert first[0] == second[0] and np.array_equal(first[1], second[1]) and first[2] == second[2]
    finally:
        again.close()


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(served_registry, monkeypatch):
    from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

    engine = Engine(served_registry["versions"]["v1"], version="test-fault", threads=1, warmup=False)
    real_run = engine._run
    faults = [RuntimeException("injected: device lost")]

    def run(*args):
        if faults:
            raise faults.pop()
        return real_run(*args)
    monkeypatch.setattr(engine, "_run", run)
    engine.start()
    try:
        with pytest.raises(RuntimeError, match="injected"):
            asyncio.run(collect(engine, [3, 4], SamplingParams(max_tokens=5)))
        ids, *_ = asyncio.run(collect(engine, [3, 4], SamplingParams(max_tokens=5, ignore_eos=True)))
        assert len(ids) == 5 and engine.stats()["running"] == 0
    finally:
        engine.close()


def test_static_scheduling_runs_a_batch_to_completion(served_registry):
    engine = Engine(served_registry["versions"]["v1"], version="test-static", max_batch=4, threads=1,
                    warmup=False, scheduling="static")
    engine.start()
    order = []

    async def run(name, prompt, n, started=None):
        async for d in engine.generate(prompt, SamplingParams(max_tokens=n, ignore_eos=True)):
            order.append((name, d.finish_reason))
            if started is not None:
                started.set()

    async def main():
        started = asyncio.Event()
        long = asyncio.create_task(run("long", [3], 40, started))
        await started.wait()
        await asyncio.gather(long, run("late", [4], 2))
    try:
        asyncio.run(main())
        assert order.index(("long", "length")) < order.index(("late", None))  # the late one waited
    finally:
        engine.close()


def test_metrics_follow_the_requests(served_registry):
    engine = Engine(served_registry["versions"]["v1"], version="test-metrics", threads=1, warmup=False)
    engine.start()
    labels = {"model_version": "test-metrics"}

    async def main():
        return await asyncio.gather(*[collect(engine, [3] * (i + 1), SamplingParams(max_tokens=4 + i,
                                                                                     ignore_eos=True))
                                      for i in range(3)])
    asyncio.run(main())
    value = REGISTRY.get_sample_value
    assert value("moeops_prompt_tokens_total", labels) == 1 + 2 + 3
    assert value("moeops_generation_tokens_total", labels) == 4 + 5 + 6
    assert value("moeops_time_to_first_token_seconds_count", labels) == 3
    assert value("moeops_request_duration_seconds_count", labels) == 3
    assert value("moeops_inter_token_latency_seconds_count", labels) == 3 + 4 + 5
    assert value("moeops_model_info", labels | {"variant": "int8", "sha256": engine.sha256}) == 1
    assert value("moeops_requests_running", labels) == 0
    engine.close()
    assert value("moeops_requests_running", labels) is None and value("moeops_model_info", labels | {
        "variant": "int8", "sha256": engine.sha256}) is None


def test_import_is_torch_free():
    code = "import sys, moeops.serve.engine; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# ----------------------------------------------------------------------------- pure helpers


def test_prefill_groups():
    assert prefill_groups([5, 6, 7]) == [[2, 1, 0]]  # similar prompts: one call
    assert prefill_groups([10, 30, 20]) == [[1, 2, 0]]  # short ones: one call beats little padding
    assert prefill_groups([60, 100, 70, 4, 2]) == [[1, 2, 0], [3, 4]]  # no short one padded to 100
    assert sorted(i for g in prefill_groups([9, 1, 50, 30, 2, 2]) for i in g) == list(range(6))


def test_stream_text_holds_back_what_may_change():
    assert stream_text("abc", 0, (), final=False) == ("abc", 3, False)
    assert stream_text("ab\ufffd", 0, (), final=False) == ("ab", 2, False)  # an incomplete UTF-8 character
    assert stream_text("ab\ufffd", 2, (), final=True) == ("\ufffd", 3, False)
    assert stream_text("hello wo", 0, ("world",), final=False) == ("hello ", 6, False)  # maybe a stop string
    assert stream_text("hello wa", 6, ("world",), final=False) == ("wa", 8, False)
    assert stream_text("hello world!", 6, ("world", "lo"), final=False) == ("", 6, True)  # "lo" first: cut at 3
    assert stream_text("hello world!", 0, ("world",), final=False) == ("hello ", 6, True)


def test_merge_and_trim_caches():
    a = [np.ones((1, 2, 3), np.float32)]
    b = [np.full((2, 4, 3), 2, np.float32)]
    cache, mask = merge_caches([(a, np.array([[0, 1]])), (b, np.ones((2, 4), np.int64))])
    assert cache[0].shape == (3, 4, 3) and mask.tolist() == [[0, 0, 0, 1], [1] * 4, [1] * 4]
    assert cache[0][0, :2].sum() == 0 and cache[0][0, 2:].sum() == 6
    cache, mask = trim_padding([c[:1] for c in cache], mask[:1])
    assert cache[0].shape == (1, 1, 3) and mask.tolist() == [[1]]


def test_seeded_sampling_ignores_float_noise_in_the_probability_order():
    """Batching moves logits by ~1e-6: two near-equal tokens may swap places in the probability order,
    which must not change what a seeded draw picks."""
    logits_V = np.random.default_rng(0).normal(size=50)
    logits_V[[3, 7]] = logits_V.max() - 1.0
    a_V, b_V = logits_V.copy(), logits_V.copy()
    a_V[3] += 1e-6
    b_V[7] += 1e-6
    for seed in range(200):
        picks = [sample_next(x_V[None], 0.8, 0.9, np.random.default_rng(seed))[0] for x_V in (a_V, b_V)]
        assert picks[0] == picks[1], seed
    assert sample_next(a_V[None], 0.0, 1.0, np.random.default_rng(0))[0] == int(a_V.argmax())


def test_an_unusable_cached_graph_is_rebuilt(fp32_dir, tmp_path, caplog):
    first = Engine(fp32_dir, version="test-cache", threads=1, cache_dir=tmp_path, warmup=False)
    first.close()
    (cached,) = tmp_path.glob("*.onnx")
    good = cached.read_bytes()
    cached.write_bytes(good[: len(good) // 2])  # damaged after it was written
    with caplog.at_level("WARNING", logger="moeops.serve.engine"):
        again = Engine(fp32_dir, version="test-cache", threads=1, cache_dir=tmp_path, warmup=False)
    again.close()
    assert not first.cache_hit and not again.cache_hit
    assert [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()] != []
    hit = Engine(fp32_dir, version="test-cache", threads=1, cache_dir=tmp_path, warmup=False)
    hit.close()
    assert hit.cache_hit
