"""Serving benchmarks (issue 11 §7, §3, §8): real `moeops serve` processes on loopback, driven by a
load generator in the manner of vLLM's benchmark_serving, side by side in one run.

    python -m bench.serve [--quick] [--only NAME ...] [--repeats 3] [--rate R]     (after `make pipeline`)

The model is the pipeline's own output: exports/onnx/int8 + data/prepared/tokenizer.json registered
(champion, metrics.candidate onnx_int8) into a temporary registry and served by
`python -m moeops serve`, one process per configuration, one at a time, each with serve.threads 2.
Prompts are 16-64 tokens cut from the val documents, output lengths drawn uniformly in 1-192 and
forced with `ignore_eos` (greedy), every draw seeded. Requests arrive as a Poisson process at a rate
(or all at once: "inf") and stream /v1/completions through httpx. Per request: TTFT (first chunk
with text), ITL (gaps between chunks with text), e2e, TPOT = (e2e - TTFT) / (output tokens - 1);
output tokens from the stream's usage chunk. Per run: requests/s and output tokens/s over the run's
wall time (first send to last byte), TTFT / TPOT / ITL / e2e p50 and p99, goodput = requests/s that
meet the SLO (TTFT <= 1 s and TPOT <= 100 ms).

Benchmarks (NAME for --only), each repeated, every ratio taken per repeat and reported as
median (min-max), a target judged on the worst end (bench.common.verdict):
  batching   continuous batching (max_batch 16) vs the same server with max_batch 1: output tokens/s at
             saturation (target >= 4x); p99 TTFT at a rate the unbatched server sustains (half its
             saturated request rate, from the first repeat; target: no worse); the batched server also
             at 2x and 4x that rate
  static     continuous vs static batching (serve.scheduling static, same max_batch), saturation,
             varied output lengths (target >= 1.5x output tokens/s)
  hf         our server vs bench/hf_server.py (transformers `generate` on exports/hf, one request at a
             time) on the same requests, all at once (expect >= 5x output tokens/s)
  overhead   the server at saturation vs moeops.serve.engine.Engine driven in this process with the same
             requests all submitted at once, same max_batch (target >= 85%)
  startup    process start -> /health/ready 200 with a cold and a warm optimized-graph cache (target
             <= 1.5 s warm); the first request after ready vs the steady median of the same request,
             with warm-up on and off (target <= 1.5x with warm-up)
  soak       short requests, 32 at a time, server RSS (psutil) after warm-up and at the end (target:
             growth < 10%)

Full run (3 repeats): ~8 min estimated on a quiet 2-core machine (scaled from runs on a loaded one;
--quick: 2 repeats of small counts, a smoke test of ~2 min there, ~10 min when 6 jobs share the cores).
Per repeat: 48 requests at saturation, 24 at each rate, 8 for transformers, 1000 in the soak.
Writes bench/results/serve.json ($MOEOPS_BENCH_OUT for scratch runs).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
import yaml

from bench.common import print_spread, save, spread, verdict
from moeops.io import sha256_file

REPO = Path(__file__).resolve().parents[1]
NAMES = ("batching", "static", "hf", "overhead", "startup", "soak")
MODEL = "moeops"
SLO = {"ttft_s": 1.0, "tpot_s": 0.1}
TARGETS = {  # (target, higher is better)
    "batching_saturation_output_tps_ratio": (4.0, True),
    "batching_p99_ttft_ratio_at_sustained_rate": (1.0, False),
    "continuous_vs_static_output_tps_ratio": (1.5, True),
    "ours_vs_transformers_output_tps_ratio": (5.0, True),
    "server_vs_in_process_output_tps_ratio": (0.85, True),
    "start_to_ready_warm_cache_s": (1.5, False),
    "first_request_vs_steady_warmup_on": (1.5, False),
    "soak_rss_growth": (0.10, False),
}
SIZES = {  # requests per run; soak requests per repeat; steady-state requests after the first
    "full": {"repeats": 3, "saturation": 48, "rate": 24, "hf": 8, "soak": 1000, "steady": 10},
    "quick": {"repeats": 2, "saturation": 16, "rate": 8, "hf": 2, "soak": 200, "steady": 3},
}
PROMPT_TOKENS, OUTPUT_TOKENS = (16, 64), (1, 192)
SOAK_PROMPT_TOKENS, SOAK_OUTPUT_TOKENS, SOAK_CONCURRENCY = (16, 32), (1, 8), 32
SERVE = {"max_batch": 16, "max_waiting": 256, "max_prompt_tokens": 0, "max_new_tokens": 256,
         "request_timeout_s": 120.0, "threads": 2, "warmup": True, "watch_interval_s": 0.0,
         "drain_timeout_s": 30.0, "scheduling": "continuous"}


# ---------------------------------------------------------------- workload


@dataclass(frozen=True)
class Req:
    prompt: str
    prompt_tokens: int
    max_tokens: int


def make_requests(prepared: Path, n: int, seed: int, prompt_range: tuple[int, int] = PROMPT_TOKENS,
                  output_range: tuple[int, int] = OUTPUT_TOKENS, context: int = 256) -> list[Req]:
    """`n` requests: a window of the drawn length from a random val document, decoded to text (drawn
    again if its text does not re-encode to a length in range, e.g. a cut through a UTF-8 character),
    and an output length that fits the context beside it."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    meta = json.loads((prepared / "meta.json").read_text())
    flat = np.fromfile(prepared / "val.bin", dtype=meta["dtype"])
    starts = np.load(prepared / "val.idx.npy")
    lengths = np.diff(starts) - 1  # each document ends with its EOS
    rng = np.random.default_rng(seed)
    lo, hi = prompt_range
    out: list[Req] = []
    while len(out) < n:
        want = int(rng.integers(lo, hi + 1))
        docs = np.flatnonzero(lengths >= want)
        d = int(rng.choice(docs))
        at = int(starts[d] + rng.integers(0, lengths[d] - want + 1))
        text = tok.decode(flat[at:at + want].tolist())
        got = len(tok.encode(text).ids)
        if "\ufffd" in text or not lo <= got <= hi:
            continue
        max_tokens = min(int(rng.integers(output_range[0], output_range[1] + 1)), context - got)
        out.append(Req(text, got, max_tokens))
    return out


def distribution(values: list[int]) -> dict:
    a = np.asarray(values)
    return {"n": len(a), "min": int(a.min()), "p50": float(np.median(a)), "mean": round(float(a.mean()), 2),
            "max": int(a.max())}


# ---------------------------------------------------------------- load generator


@dataclass
class Outcome:
    ok: bool
    prompt_tokens: int
    output_tokens: int = 0
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.ttft is None:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


async def send(client: httpx.AsyncClient, url: str, req: Req) -> Outcome:
    """One streaming /v1/completions request, timed on the client as benchmark_serving does."""
    body = {"model": MODEL, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    o = Outcome(ok=False, prompt_tokens=req.prompt_tokens)
    t0 = time.perf_counter()
    last = t0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                o.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200].decode(errors='replace')}"
                return o
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if chunk.get("usage"):
                    o.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    if o.ttft is None:
                        o.ttft = now - t0
                    else:
                        o.itl.append(now - last)
                    last = now
        o.e2e = time.perf_counter() - t0
        o.ok = True
        if o.ttft is None:  # every chunk was empty text (possible for byte tokens): first token = end
            o.ttft = o.e2e
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        o.error = f"{type(e).__name__}: {str(e)[:200]}"
    return o


def arrivals(n: int, rate: float, seed: int) -> np.ndarray:
    """Seconds after the start at which each request is sent: a Poisson process (exponential gaps)."""
    if rate == float("inf"):
        return np.zeros(n)
    return np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, n))


def client(n_connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=n_connections, max_keepalive_connections=n_connections)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(300.0))


async def load(url: str, requests: list[Req], rate: float, seed: int) -> tuple[list[Outcome], float]:
    """Send `requests` at `rate` (Poisson; inf = all at once); the outcomes and the wall time from the
    first send to the last response's end."""
    at = arrivals(len(requests), rate, seed)
    async with client(len(requests) + 4) as c:
        await send(c, url, requests[0])  # opens a connection and pays any first-request cost, untimed
        t0 = time.perf_counter()

        async def one(req: Req, delay: float) -> Outcome:
            await asyncio.sleep(max(0.0, t0 + delay - time.perf_counter()))
            return await send(c, url, req)

        outcomes = await asyncio.gather(*(one(r, d) for r, d in zip(requests, at, strict=True)))
        return list(outcomes), time.perf_counter() - t0


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1e3, 2) if values else None


def summarize(outcomes: list[Outcome], duration: float, slo: dict = SLO) -> dict:
    """benchmark_serving's figures for one run (latencies in ms)."""
    done = [o for o in outcomes if o.ok]
    ttft = [o.ttft for o in done]
    tpot = [o.tpot for o in done if o.tpot is not None]
    itl = [x for o in done for x in o.itl]
    e2e = [o.e2e for o in done]
    good = [o for o in done if o.ttft <= slo["ttft_s"] and (o.tpot is None or o.tpot <= slo["tpot_s"])]
    out_tokens = sum(o.output_tokens for o in done)
    errors = sorted({o.error for o in outcomes if not o.ok})
    return {"completed": len(done), "failed": len(outcomes) - len(done), "duration_s": round(duration, 3),
            "output_tokens": out_tokens, "requests_per_s": round(len(done) / duration, 3),
            "output_tokens_per_s": round(out_tokens / duration, 2),
            "goodput_requests_per_s": round(len(good) / duration, 3),
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "tpot_ms_p50": pct(tpot, 50), "tpot_ms_p99": pct(tpot, 99),
            "itl_ms_p50": pct(itl, 50), "itl_ms_p99": pct(itl, 99),
            "e2e_ms_p50": pct(e2e, 50), "e2e_ms_p99": pct(e2e, 99), "errors": errors[:5]}


def measure(url: str, requests: list[Req], rate: float, seed: int) -> dict:
    outcomes, duration = asyncio.run(load(url, requests, rate, seed))
    s = summarize(outcomes, duration)
    if s["failed"]:
        print(f"  warning: {s['failed']} of {len(requests)} requests failed: {s['errors']}", flush=True)
    return s


# ---------------------------------------------------------------- servers


def bench_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONHASHSEED="0")
    env.pop("MOEOPS_REGISTRY", None)  # it would override --registry
    return env


def make_registry(project: Path, root: Path) -> tuple[Path, str]:
    """exports/onnx/int8 + the prepared tokenizer as version v1, the champion; (its dir, version)."""
    from moeops.registry import promote, register, resolve

    variant, tok = project / "exports/onnx/int8", project / "data/prepared/tokenizer.json"
    for p in (variant / "model.onnx", tok):
        if not p.is_file():
            raise SystemExit(f"error: {p}: missing; run `make pipeline` (or pass --project) first")
    version = register(root, MODEL, {"onnx/int8": variant, "tokenizer.json": tok}, {"bench": "serve"},
                       {"candidate": "onnx_int8"}, "bench.serve")
    promote(root, MODEL, version, "bench.serve")
    return resolve(root, MODEL, "champion"), version


def write_params(path: Path, serve: dict) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["serve"] = {**params.get("serve", {}), **SERVE, **serve}
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def wait_ready(proc: subprocess.Popen, url: str, log: Path, t0: float, timeout_s: float = 180.0) -> float:
    """Seconds from `t0` (just before the process was started) to the first /health/ready 200."""
    with httpx.Client(timeout=2.0) as c:
        while time.perf_counter() - t0 < timeout_s:
            if proc.poll() is not None:
                raise SystemExit(f"error: server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if c.get(url + "/health/ready").status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.01)
    proc.kill()
    raise SystemExit(f"error: server not ready in {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], workdir: Path, name: str) -> tuple[subprocess.Popen, str, float]:
    """A server process on a free loopback port: (process, base URL, start -> ready seconds)."""
    port = free_port()
    log = workdir / f"{name}.log"
    url = f"http://127.0.0.1:{port}"
    with open(log, "ab") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen([*cmd, "--host", "127.0.0.1", "--port", str(port)], cwd=workdir, stdout=f,
                                stderr=subprocess.STDOUT, env=bench_env())
    return proc, url, wait_ready(proc, url, log, t0)


def start_moeops(workdir: Path, registry: Path, name: str, **serve) -> tuple[subprocess.Popen, str, float]:
    params = write_params(workdir / f"{name}.params.yaml", {"cache_dir": str(workdir / "cache"), **serve})
    return start([sys.executable, "-m", "moeops", "serve", "--params", str(params), "--registry", str(registry),
                  "--model", MODEL, "--alias", "champion"], workdir, name)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- benchmarks


def engine_in_process(model_dir: Path, version: str, cache_dir: Path, requests: list[Req]) -> dict:
    """The same requests, all submitted at once to an Engine in this process: no HTTP, no SSE."""
    from moeops.serve.engine import Engine, SamplingParams

    engine = Engine(model_dir, version=version, variant="int8", max_batch=SERVE["max_batch"],
                    max_waiting=SERVE["max_waiting"], request_timeout_s=SERVE["request_timeout_s"],
                    threads=SERVE["threads"], cache_dir=cache_dir, warmup=True)
    engine.start()
    prompts = [engine.tokenizer.encode(r.prompt).ids for r in requests]

    async def one(ids: list[int], req: Req) -> Outcome:
        o = Outcome(ok=False, prompt_tokens=len(ids))
        t0 = last = time.perf_counter()
        stream = engine.generate(ids, SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True))
        if inspect.isawaitable(stream):
            stream = await stream
        async for delta in stream:
            now = time.perf_counter()
            o.output_tokens += len(delta.token_ids)
            if delta.token_ids:
                if o.ttft is None:
                    o.ttft = now - t0
                else:
                    o.itl.append(now - last)
                last = now
        o.e2e, o.ok = time.perf_counter() - t0, True
        return o

    async def run() -> tuple[list[Outcome], float]:
        await one(prompts[0], requests[0])  # as the server runs get one untimed request first
        t0 = time.perf_counter()
        outcomes = await asyncio.gather(*(one(ids, r) for ids, r in zip(prompts, requests, strict=True)))
        return list(outcomes), time.perf_counter() - t0

    try:
        outcomes, duration = asyncio.run(run())
    finally:
        engine.close()
    return summarize(outcomes, duration)


def first_vs_steady(url: str, req: Req, steady: int) -> dict:
    """The first request after ready, then `steady` more of the same one after another: e2e seconds."""

    async def go() -> list[Outcome]:
        async with client(2) as c:
            await c.get(url + "/health/live")  # the TCP connect is not the first request's cost
            return [await send(c, url, req) for _ in range(1 + steady)]

    outcomes = asyncio.run(go())
    if not all(o.ok for o in outcomes):
        raise SystemExit(f"error: startup probe failed: {[o.error for o in outcomes if not o.ok][:3]}")
    median = float(np.median([o.e2e for o in outcomes[1:]]))
    return {"first_e2e_ms": round(outcomes[0].e2e * 1e3, 2), "first_ttft_ms": round(outcomes[0].ttft * 1e3, 2),
            "steady_e2e_ms_p50": round(median * 1e3, 2), "first_vs_steady": round(outcomes[0].e2e / median, 3)}


def soak(workdir: Path, registry: Path, requests: list[Req], name: str) -> dict:
    """`requests` (short) SOAK_CONCURRENCY at a time on a fresh server; RSS after the first tenth (at least
    50: the warm-up, while arenas, caches and connection pools reach their working size), then 9 times
    more up to the end."""
    proc, url, _ = start_moeops(workdir, registry, name)
    try:
        ps = psutil.Process(proc.pid)
        warm = min(len(requests) // 2, max(50, len(requests) // 10))
        samples: list[tuple[int, float]] = [(0, ps.memory_info().rss / 2**20)]

        async def go() -> tuple[list[Outcome], float]:
            outcomes: list[Outcome] = []
            async with client(SOAK_CONCURRENCY + 4) as c:
                sem = asyncio.Semaphore(SOAK_CONCURRENCY)

                async def one(req: Req) -> Outcome:
                    async with sem:
                        return await send(c, url, req)

                outcomes += await asyncio.gather(*(one(r) for r in requests[:warm]))
                samples.append((len(outcomes), ps.memory_info().rss / 2**20))
                t0 = time.perf_counter()
                step = max(1, (len(requests) - warm) // 9)
                for i in range(warm, len(requests), step):
                    outcomes += await asyncio.gather(*(one(r) for r in requests[i:i + step]))
                    samples.append((len(outcomes), ps.memory_info().rss / 2**20))
                return outcomes, time.perf_counter() - t0

        outcomes, duration = asyncio.run(go())
    finally:
        stop(proc)
    after_warmup, end = samples[1][1], samples[-1][1]
    return {"requests": len(requests), "failed": sum(not o.ok for o in outcomes),
            "requests_per_s_after_warmup": round((len(requests) - warm) / duration, 2),
            "rss_mb_start": round(samples[0][1], 1), "rss_mb_after_warmup": round(after_warmup, 1),
            "rss_mb_end": round(end, 1), "rss_growth": round(end / after_warmup - 1, 4),
            "rss_mb_trajectory": [[n, round(mb, 1)] for n, mb in samples]}


def startup(workdir: Path, registry: Path, probe: Req, steady: int, r: int) -> dict:
    """Three starts: cold cache + warm-up, warm cache + warm-up, warm cache without warm-up."""
    out = {}
    for label, cache, warmup in (("cold_cache", workdir / f"cache-cold-{r}", True), ("warm_cache", None, True),
                                 ("warm_cache_no_warmup", None, False)):
        serve = {"warmup": warmup, **({"cache_dir": str(cache)} if cache else {})}
        proc, url, ready_s = start_moeops(workdir, registry, f"startup-{label}-{r}", **serve)
        try:
            out[label] = {"start_to_ready_s": round(ready_s, 3), **first_vs_steady(url, probe, steady)}
            info = httpx.get(url + "/version", timeout=10).json()  # after the probe: no warm-up of its own
            out[label].update({k: info.get(k) for k in ("cache_hit", "load_seconds", "warmup_seconds")})
        finally:
            stop(proc)
        if out[label]["cache_hit"] is not (cache is None):
            print(f"  warning: {label}: the server reports cache_hit {out[label]['cache_hit']}", flush=True)
        print(f"  startup {label}: {out[label]}", flush=True)
    return out


def sustained_rate(saturated_requests_per_s: float) -> float:
    """Half the unbatched server's saturated request rate, to two significant digits."""
    return float(f"{saturated_requests_per_s / 2:.2g}")


def run(project: Path, quick: bool, only: list[str], repeats: int | None, rate: float | None,
        hf_threads: int = SERVE["threads"]) -> dict:
    size = dict(SIZES["quick" if quick else "full"])
    if repeats:
        size["repeats"] = repeats
    context = json.loads((project / "exports/onnx/int8/config.json").read_text())["max_seq_len"]
    prepared = project / "data/prepared"
    sat = make_requests(prepared, size["saturation"], seed=1, context=context)
    at_rate = make_requests(prepared, size["rate"], seed=2, context=context)
    hf_reqs = sat[:size["hf"]]
    if quick:  # transformers streams ~10x slower: a smoke test keeps its part short
        hf_reqs = [Req(r.prompt, r.prompt_tokens, min(r.max_tokens, 32)) for r in hf_reqs]
    soak_reqs = make_requests(prepared, size["soak"], seed=3, prompt_range=SOAK_PROMPT_TOKENS,
                              output_range=SOAK_OUTPUT_TOKENS, context=context)
    probe = Req(sat[0].prompt, sat[0].prompt_tokens, 32)
    runs: dict[str, dict[str, list[dict]]] = {}  # config -> rate label -> per-repeat summaries
    per_repeat: list[dict] = []
    startups: list[dict] = []
    soaks: list[dict] = []

    def record(config: str, label: str, summary: dict) -> dict:
        runs.setdefault(config, {}).setdefault(label, []).append(summary)
        print(f"  {config:12} {label:>9}: {summary['output_tokens_per_s']:8.1f} tok/s  "
              f"{summary['requests_per_s']:6.2f} req/s  TTFT p99 {summary['ttft_ms_p99']} ms  "
              f"TPOT p50 {summary['tpot_ms_p50']} ms  failed {summary['failed']}", flush=True)
        return summary

    with tempfile.TemporaryDirectory(prefix="moeops-bench-serve-") as tmp:
        work = Path(tmp)
        model_dir, version = make_registry(project, work / "registry")
        registry = work / "registry"
        for r in range(size["repeats"]):
            print(f"# repeat {r + 1}/{size['repeats']}", flush=True)
            ratios: dict[str, float] = {}
            if "batching" in only:
                proc, url, _ = start_moeops(work, registry, f"max_batch1-{r}", max_batch=1)
                try:
                    one_sat = record("max_batch_1", "inf", measure(url, sat, float("inf"), r))
                    if rate is None:
                        rate = sustained_rate(one_sat["requests_per_s"])
                        print(f"  the sustained rate: {rate} req/s (half the unbatched saturated rate)", flush=True)
                    one_r = record("max_batch_1", f"{rate:g}", measure(url, at_rate, rate, 100 + r))
                finally:
                    stop(proc)
            if {"batching", "static", "hf", "overhead"} & set(only):
                proc, url, _ = start_moeops(work, registry, f"continuous-{r}")
                try:
                    if {"batching", "static", "overhead"} & set(only):
                        cont_sat = record("continuous", "inf", measure(url, sat, float("inf"), r))
                    if "batching" in only:
                        cont_r = record("continuous", f"{rate:g}", measure(url, at_rate, rate, 100 + r))
                        for k in (2, 4):
                            record("continuous", f"{k * rate:g}", measure(url, at_rate, k * rate, 100 + r))
                        ratios["batching_saturation_output_tps_ratio"] = (cont_sat["output_tokens_per_s"]
                                                                          / one_sat["output_tokens_per_s"])
                        ratios["batching_p99_ttft_ratio_at_sustained_rate"] = (cont_r["ttft_ms_p99"]
                                                                               / one_r["ttft_ms_p99"])
                    if "hf" in only:
                        ours_hf = record("continuous", "inf_hf_set", measure(url, hf_reqs, float("inf"), r))
                finally:
                    stop(proc)
            if "static" in only:
                proc, url, _ = start_moeops(work, registry, f"static-{r}", scheduling="static")
                try:
                    static_sat = record("static", "inf", measure(url, sat, float("inf"), r))
                finally:
                    stop(proc)
                ratios["continuous_vs_static_output_tps_ratio"] = (cont_sat["output_tokens_per_s"]
                                                                   / static_sat["output_tokens_per_s"])
            if "hf" in only:
                proc, url, _ = start([sys.executable, "-m", "bench.hf_server", "--model-dir",
                                      str((project / "exports/hf").resolve()), "--threads",
                                      str(hf_threads)], work, f"transformers-{r}")
                try:
                    hf = record("transformers", "inf_hf_set", measure(url, hf_reqs, float("inf"), r))
                finally:
                    stop(proc)
                ratios["ours_vs_transformers_output_tps_ratio"] = (ours_hf["output_tokens_per_s"]
                                                                   / hf["output_tokens_per_s"])
            if "overhead" in only:
                inproc = record("in_process", "inf", engine_in_process(model_dir / "onnx/int8", version,
                                                                         work / "cache", sat))
                ratios["server_vs_in_process_output_tps_ratio"] = (cont_sat["output_tokens_per_s"]
                                                                   / inproc["output_tokens_per_s"])
            if "startup" in only:
                s = startup(work, registry, probe, size["steady"], r)
                startups.append(s)
                ratios["start_to_ready_warm_cache_s"] = s["warm_cache"]["start_to_ready_s"]
                ratios["start_to_ready_cold_cache_s"] = s["cold_cache"]["start_to_ready_s"]
                ratios["first_request_vs_steady_warmup_on"] = s["warm_cache"]["first_vs_steady"]
                ratios["first_request_vs_steady_warmup_on_cold_cache"] = s["cold_cache"]["first_vs_steady"]
                ratios["first_request_vs_steady_warmup_off"] = s["warm_cache_no_warmup"]["first_vs_steady"]
            if "soak" in only:
                s = soak(work, registry, soak_reqs, f"soak-{r}")
                soaks.append(s)
                ratios["soak_rss_growth"] = s["rss_growth"]
                print(f"  soak: {s['requests']} requests, {s['failed']} failed, {s['requests_per_s_after_warmup']} "
                      f"req/s, RSS {s['rss_mb_after_warmup']} -> {s['rss_mb_end']} MB", flush=True)
            per_repeat.append(ratios)
            print(f"  ratios: { {k: round(v, 3) for k, v in ratios.items()} }", flush=True)
        sha256 = sha256_file(model_dir / "onnx/int8/model.onnx")  # what was served: the registry's copy

    ratio_spread = {k: spread([p[k] for p in per_repeat if k in p], 4) for k in per_repeat[0]} if per_repeat else {}
    metric_keys = ("requests_per_s", "output_tokens_per_s", "goodput_requests_per_s", "ttft_ms_p50", "ttft_ms_p99",
                   "tpot_ms_p50", "tpot_ms_p99", "itl_ms_p50", "itl_ms_p99", "e2e_ms_p50", "e2e_ms_p99", "failed")
    table = {config: {label: {k: spread([s[k] for s in summaries], 3) for k in metric_keys}
                      for label, summaries in labels.items()} for config, labels in runs.items()}
    targets = {k: {"target": t, "higher_is_better": hib} for k, (t, hib) in TARGETS.items() if k in ratio_spread}
    return {
        "project": str(project.resolve()), "quick": quick, "only": only, "repeats": size["repeats"], "sizes": size,
        "model": model_info(project, version, sha256),
        "serve": SERVE, "transformers_threads": hf_threads, "slo": SLO, "sustained_rate_requests_per_s": rate,
        "rates": {config: sorted(labels) for config, labels in runs.items()},
        "workload": {"saturation": workload(sat), "at_rate": workload(at_rate), "hf_set": workload(hf_reqs),
                     "soak": {**workload(soak_reqs), "concurrency": SOAK_CONCURRENCY},
                     "startup_probe": {"prompt_tokens": probe.prompt_tokens, "max_tokens": probe.max_tokens,
                                       "steady_requests": size["steady"]},
                     "sampling": "greedy (temperature 0), ignore_eos, streaming with include_usage",
                     "arrivals": "Poisson (exponential gaps, seeded per repeat); inf = all at once"},
        "table": table, "runs": runs, "ratios": {k: v["median"] for k, v in ratio_spread.items() if v},
        "ratio_spread": ratio_spread, "targets": targets,
        "verdicts": {k: verdict(ratio_spread[k], t["target"], t["higher_is_better"]) for k, t in targets.items()},
        "startup": startups, "soak": soaks,
        "note": "per-run figures: benchmark_serving's definitions, latencies in ms, client side over loopback; "
                "table: spread over repeats; ratios: per repeat (both sides from the same repeat), median (min-max); "
                "goodput: requests/s with TTFT <= slo.ttft_s and TPOT <= slo.tpot_s; servers run one at a time with "
                "serve.threads 2, the load generator in this process beside them",
    }


def workload(requests: list[Req]) -> dict:
    return {"requests": len(requests), "prompt_tokens": distribution([r.prompt_tokens for r in requests]),
            "max_tokens": distribution([r.max_tokens for r in requests])}


def model_info(project: Path, version: str, sha256: str | None) -> dict:
    config = json.loads((project / "exports/onnx/int8/config.json").read_text())
    info = {"variant": "int8", "path": "exports/onnx/int8/model.onnx", "registry_version": version,
            "sha256": sha256, "file_bytes": (project / "exports/onnx/int8/model.onnx").stat().st_size,
            "config": config}
    metrics = project / "metrics/eval.json"  # the evaluate stage's figures for this variant, if it is the one served
    if metrics.is_file():
        ev = json.loads(metrics.read_text()).get("variants", {}).get("onnx_int8", {})
        if ev.get("model_sha256") == sha256:
            info.update({k: ev.get(k) for k in ("params_total", "bits_per_byte")})
    return info


def print_table(result: dict) -> None:
    cols = ("requests_per_s", "output_tokens_per_s", "goodput_requests_per_s", "ttft_ms_p50", "ttft_ms_p99",
            "tpot_ms_p50", "tpot_ms_p99", "itl_ms_p50", "itl_ms_p99")
    heads = ("req/s", "out tok/s", "goodput", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "ITL p50", "ITL p99")
    print(f"\n{'config':13}{'rate':>11}" + "".join(f"{h:>11}" for h in heads) + "   (median over repeats, ms)")
    for config, labels in result["table"].items():
        for label, metrics in labels.items():
            cells = "".join(f"{(metrics[c] or {}).get('median', '-'):>11}" for c in cols)
            print(f"{config:13}{label:>11}{cells}")
    print_spread(result, "ratio / figure", 50)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", type=Path, default=Path("."), help="a project after `make pipeline` (default: .)")
    ap.add_argument("--quick", action="store_true", help="2 repeats of small runs (a smoke test, ~2 min)")
    ap.add_argument("--only", nargs="+", choices=NAMES, default=list(NAMES), metavar="NAME",
                    help=f"run only these: {', '.join(NAMES)} (default: all)")
    ap.add_argument("--repeats", type=int, help="override the repeats (3 full, 2 --quick)")
    ap.add_argument("--rate", type=float, help="the sustained rate in req/s (default: half the unbatched "
                                               "server's saturated request rate, measured in the first repeat)")
    ap.add_argument("--hf-threads", type=int, default=SERVE["threads"],
                    help="torch threads of the transformers peer (default: the server's, 2)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    result = run(a.project, a.quick, a.only, a.repeats, a.rate, a.hf_threads)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print_table(result)
    print(f"written {save('serve', 'bench.serve', argv, result)} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
