"""Tenants and fair scheduling (moeops.serve.tenants, the engine's admission), in this process on real ONNX
Runtime sessions of the served test model: tenants.yaml's one-line errors, key authentication, rate limits
(token buckets, hard quota, max concurrent), the virtual token counter's order, a flooding tenant held to its
row cap while a trickling one overtakes its backlog (and FCFS, the control, does neither), and the injected
faults of a canary (error rate, latency factor)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from moeops.cli import UserError
from moeops.serve.engine import Engine, EngineFull, InjectedFault, SamplingParams
from moeops.serve.tenants import RateLimited, Tenant, Tenants, VirtualTokenCounter, hash_key, load_tenants

REPO = Path(__file__).resolve().parents[1]
KEY_A, KEY_B = "sk-tenant-a", "sk-tenant-b"


def write_tenants(path: Path, *entries: str) -> Path:
    path.write_text("tenants:\n" + "".join(entries))
    return path


def entry(name: str, key: str, extra: str = "") -> str:
    lines = [f"name: {name}", f"key_sha256: {hash_key(key)}", *extra.splitlines()]
    return "  - " + "".join(f"{'    ' if i else ''}{line}\n" for i, line in enumerate(lines))


@pytest.mark.parametrize("entries, where", [
    ([entry("a", KEY_A, "wieght: 2")], "tenants[0].wieght: unknown key"),
    ([entry("a", KEY_A, "weight: -1")], "tenants[0].weight: Input should be greater than 0"),
    ([entry("a", KEY_A, "requests_per_minute: many")], "tenants[0].requests_per_minute:"),
    ([entry("a", KEY_A), entry("a", KEY_B)], "tenants[1].name: 'a' is a duplicate"),
    ([entry("a", KEY_A), entry("b", KEY_A)], "tenants[1].key_sha256: the same key as tenant 'a'"),
    (["  - name: a\n    key_sha256: sk-plain-key\n"], "tenants[0].key_sha256: must be the 64 hex digits"),
])
def test_tenants_yaml_errors_are_one_line_naming_file_and_field(tmp_path, entries, where):
    path = write_tenants(tmp_path / "tenants.yaml", *entries)
    with pytest.raises(UserError) as e:
        load_tenants(path)
    assert str(e.value).startswith(f"{path}: {where}") and "\n" not in str(e.value)


def test_authenticate_and_hash_key_cli(tmp_path):
    tenants = load_tenants(write_tenants(tmp_path / "t.yaml", entry("a", KEY_A, "weight: 2"), entry("b", KEY_B)))
    assert tenants["a"] == Tenant("a", hash_key(KEY_A), weight=2.0)
    t = Tenants(tenants)
    assert t.authenticate(KEY_A).name == "a" and t.authenticate(KEY_B).name == "b"
    assert t.authenticate("sk-tenant-c") is None and t.authenticate(None) is None and t.authenticate("") is None
    assert t.authenticate(hash_key(KEY_A)) is None  # the stored hash is not a key
    out = subprocess.run([sys.executable, "-m", "moeops.serve.tenants", "hash-key"], input=KEY_A + "\n",
                         capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == hash_key(KEY_A)


def limited(tenants: Tenants, tenant: Tenant, tokens: int) -> RateLimited:
    with pytest.raises(RateLimited) as e:
        tenants.admit(tenant, tokens)
    return e.value


def refused(name: str, limit: str) -> float:
    return REGISTRY.get_sample_value("moeops_rate_limited_total", {"tenant": name, "limit": limit}) or 0.0


def test_rate_limits_refuse_with_retry_after_and_a_hard_quota():
    rpm = Tenant("rpm", "0" * 64, requests_per_minute=2)
    tpm = Tenant("tpm", "1" * 64, tokens_per_minute=120)
    conc = Tenant("conc", "2" * 64, max_concurrent=1)
    t = Tenants({x.name: x for x in (rpm, tpm, conc)})
    before = refused("rpm", "requests_per_minute")
    t.admit(rpm, 10)
    t.admit(rpm, 10)
    e = limited(t, rpm, 10)  # a minute's 2 requests are spent; one refills in 30 s
    assert (e.limit, e.hard) == ("requests_per_minute", False) and 29 <= e.retry_after_s <= 31
    assert refused("rpm", "requests_per_minute") == before + 1

    t.admit(tpm, 100)
    e = limited(t, tpm, 80)  # 20 left, 60 more needed at 2 tokens/s
    assert (e.limit, e.hard) == ("tokens_per_minute", False) and 29 <= e.retry_after_s <= 31
    t.admit(tpm, 20)  # the refusal took nothing from the bucket
    e = limited(t, tpm, 121)  # more than the whole quota: can never pass
    assert (e.limit, e.hard) == ("tokens_per_minute", True)

    t.admit(conc, 1)
    e = limited(t, conc, 1)
    assert (e.limit, e.hard) == ("max_concurrent", False) and e.retry_after_s >= 1
    t.release(conc)
    t.admit(conc, 1)


def test_virtual_token_counter_orders_by_weighted_service_and_banks_no_idle_time():
    vtc = VirtualTokenCounter({"a": 1.0, "b": 2.0, "c": 1.0})
    vtc.enqueue("a")
    vtc.enqueue("b")
    vtc.charge("a", prompt_tokens=10, output_tokens=5)  # 10 + 2 x 5 = 20 at weight 1
    vtc.charge("b", prompt_tokens=10, output_tokens=10)  # 30 at weight 2 = 15
    assert (vtc.counter("a"), vtc.counter("b")) == (20.0, 15.0)
    assert vtc.pick(["a", "b"]) == "b"
    vtc.charge("b", output_tokens=5)  # b: 20, a tie: the first candidate given (the oldest request) wins
    assert vtc.pick(["a", "b"]) == "a" and vtc.pick(["b", "a"]) == "b"
    # c was idle: it joins at the smallest backlogged counter, not at 0 (no banked credit)
    vtc.enqueue("c")
    assert vtc.counter("c") == 20.0 and vtc.pick(["a", "b", "c"]) == "a"
    for t in "abc":
        vtc.dequeue(t)
    assert vtc.backlogged() == []
    vtc.charge("a", prompt_tokens=100)
    vtc.enqueue("a")  # nobody backlogged: lifted to the last tenant that left (c, at 20); a is above it
    assert vtc.counter("a") == 120.0
    vtc.dequeue("a")
    vtc.enqueue("b")  # lifted to a's 120, the last that left
    assert vtc.counter("b") == 120.0 and vtc.pick([]) is None


# ----------------------------------------------------------------------------- the engine

TENANTS = {"a": (1.0, 0.25), "b": (1.0, 0.25)}  # max_batch 8 -> 2 rows each while the other has demand
LONG, SHORT = SamplingParams(max_tokens=40, ignore_eos=True), SamplingParams(max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module", params=["vtc", "fcfs"])
def tenant_engine(request, served_registry, tmp_path_factory):
    engine = Engine(served_registry["versions"]["v1"], version=f"test-fair-{request.param}", max_batch=8,
                    max_waiting=32, threads=1, cache_dir=tmp_path_factory.mktemp("ort"), tenants=TENANTS,
                    fairness=request.param)
    engine.start()
    yield engine
    engine.close()


async def timed(engine: Engine, tenant: str, prompt: list[int], params: SamplingParams, log: list):
    """Consume one request; append (tenant, submitted, first token at) or (tenant, submitted, exception)."""
    submitted = time.monotonic()
    first = None
    try:
        async for _ in engine.generate(prompt, params, tenant=tenant):
            first = first or time.monotonic()
    except (EngineFull, InjectedFault) as e:
        log.append((tenant, submitted, e))
        return
    log.append((tenant, submitted, first))


async def flood_and_trickle(engine: Engine) -> tuple[list, int]:
    """B sends one request (so it has demand), then A floods 16 long requests at once and B trickles 4
    short ones 30 ms apart. Returns (the log, the most rows A held at once)."""
    log: list = []
    await timed(engine, "b", [5, 6, 7, 8], SHORT, log)
    most_a = 0

    async def watch():
        nonlocal most_a
        while True:
            most_a = max(most_a, Counter(r.tenant for r in list(engine._rows))["a"])
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    tasks = [asyncio.create_task(timed(engine, "a", [3 + i % 5, 4, 5, 6], LONG, log)) for i in range(16)]
    for i in range(4):
        await asyncio.sleep(0.03)
        tasks.append(asyncio.create_task(timed(engine, "b", [7 + i, 8, 9, 10], SHORT, log)))
    await asyncio.gather(*tasks)
    watcher.cancel()
    return log, most_a


def overtaken(log: list) -> int:
    """Pairs (A request, B request) where A was submitted first and B got its first token first."""
    ok = [(t, s, f) for t, s, f in log if isinstance(f, float)]
    return sum(fa > fb for ta, sa, fa in ok if ta == "a" for tb, sb, fb in ok if tb == "b" and sa < sb)


def test_a_flooding_tenant_is_held_to_its_rows_and_a_trickling_one_overtakes_its_backlog(tenant_engine):
    log, most_a = asyncio.run(flood_and_trickle(tenant_engine))
    full = Counter(t for t, _, f in log if isinstance(f, EngineFull))
    assert full["b"] == 0  # B never sees a full queue
    if tenant_engine.fairness == "vtc":
        assert most_a <= 2, "A held more than ceil(0.25 x 8) rows while B had demand"
        assert overtaken(log) > 0, "B's requests waited behind A's backlog"
        assert 16 - 8 - 2 <= full["a"] <= 16 - 8, "A may hold only ceil(0.25 x 32) = 8 waiting requests"
    else:  # the control: arrival order, no caps
        assert most_a > 2 and overtaken(log) == 0 and full["a"] == 0
    served = REGISTRY.get_sample_value("moeops_tenant_generation_tokens_total", {"tenant": "b"})
    assert served >= 5 * SHORT.max_tokens
    waiting = REGISTRY.get_sample_value("moeops_tenant_requests_waiting",
                                        {"model_version": tenant_engine.version, "tenant": "a"})
    assert waiting == 0


def test_injected_faults_fail_a_seeded_fraction_and_slow_every_step(served_registry, tmp_path):
    engine = Engine(served_registry["versions"]["v1"], version="test-faults", max_batch=4, threads=1,
                    cache_dir=tmp_path, fault_error_rate=0.2)
    engine.start()
    try:
        async def run(n: int, params: SamplingParams) -> list:
            log: list = []
            for i in range(n):
                await timed(engine, "", [3 + i % 7], params, log)
            return log

        log = asyncio.run(run(300, SamplingParams(max_tokens=1)))
        failed = sum(isinstance(f, InjectedFault) for *_, f in log)
        assert 0.14 <= failed / 300 <= 0.26  # 60 expected; +-3 standard deviations is 39..81

        def itl() -> tuple[float, float]:
            labels = {"model_version": "test-faults"}
            return (REGISTRY.get_sample_value("moeops_inter_token_latency_seconds_sum", labels),
                    REGISTRY.get_sample_value("moeops_inter_token_latency_seconds_count", labels))

        engine.fault_error_rate = 0.0
        means = []
        for factor in (1.0, 3.0, 1.0, 3.0):  # interleaved, so a busy moment of the machine hits both
            engine.fault_latency_factor = factor
            s0, n0 = itl()
            asyncio.run(run(3, SamplingParams(max_tokens=30, ignore_eos=True)))
            s1, n1 = itl()
            means.append((s1 - s0) / (n1 - n0))
        assert means[1] + means[3] > 1.5 * (means[0] + means[2]), f"inter-token latency {means}"
    finally:
        engine.close()
