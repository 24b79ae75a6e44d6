"""Noisy neighbour (issue 12 §5): a flooding tenant against a steady one on one engine, with the engine's
fair scheduling (VTC admission + max_share row cap) and without it (FCFS, the control), side by side.

    python -m bench.tenants [--repeats 3] [--duration 20] [--project .]     (after `make pipeline`)

The model is the pipeline's exports/onnx/int8, driven in this process by moeops.serve.engine.Engine
(max_batch 16, max_waiting 64, 2 ORT threads; no HTTP: the figures are the scheduler's). Requests are
bench.serve's: prompts of 16-64 tokens cut from the val documents, output lengths drawn in 16-96 and
forced (greedy, ignore_eos), every draw seeded. Each repeat, on a fresh engine per run:

  capacity   48 requests at once: requests/s and output tokens/s at saturation (C)
  B alone    tenant B, Poisson at 20% of C's request rate, plus probes, for --duration s
  vtc        the same B and probes while tenant A offers 5x C's request rate (Poisson, open loop: a refused
             request is not retried), fairness vtc, each tenant's max_share 0.3
  fcfs       the same arrivals, fairness fcfs (the control: arrival order, no caps)

Probes, in the manner of `vllm bench serve --probe-request-rate`: a third tenant sends a small request
(16-token prompt, 1 new token) 2 times a second; its TTFT minus its TTFT in "B alone" is the stall a
newcomer sees. Per run: B's TTFT p50 / p99 (arrival to first token), requests refused (EngineFull, the
server's 429) per tenant, and while B has demand (the union of B's requests' [arrival, end]) A's share
of the tokens generated, A's output tokens/s over C, and A's rows of the batch (sampled every 5 ms).

Targets (issue §5), judged on the worst end of the repeats: vtc B p99 TTFT <= 1.5x B alone; B refused 0;
A's rows while B has demand <= ceil(0.3 x 16) = 5 (the engine's max_share is a share of the batch).
A's token share and its share of C are reported beside it: they are not bounded by the row cap alone.
Writes bench/results/tenants.json ($MOEOPS_BENCH_OUT for scratch runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.common import print_spread, save, spread, verdict
from bench.serve import Req, arrivals, make_requests, pct

ENGINE = {"max_batch": 16, "max_waiting": 64, "threads": 2, "request_timeout_s": 300.0}
SHARE = 0.3
TENANTS = {"A": (1.0, SHARE), "B": (1.0, SHARE), "probe": (1.0, SHARE)}
PROMPT_TOKENS, OUTPUT_TOKENS = (16, 64), (16, 96)
A_OFFERED, B_OFFERED, PROBE_RATE = 5.0, 0.2, 2.0  # A and B: multiples of the capacity's request rate; probes/s
CAPACITY_REQUESTS = 48
ROW_CAP = math.ceil(SHARE * ENGINE["max_batch"])
TARGETS = {  # (target, higher is better)
    "vtc_b_p99_ttft_vs_alone": (1.5, False),
    "vtc_b_refused": (0.0, False),
    "vtc_a_rows_max_while_b_demand": (float(ROW_CAP), False),
}


@dataclass
class Sent:
    tenant: str
    submitted: float
    refused: bool = False
    ttft: float | None = None
    end: float | None = None
    token_times: list[float] = field(default_factory=list)


def engine_for(model_dir: Path, cache_dir: Path, name: str, fairness: str | None):
    from moeops.serve.engine import Engine

    engine = Engine(model_dir, version=name, max_batch=ENGINE["max_batch"], max_waiting=ENGINE["max_waiting"],
                    request_timeout_s=ENGINE["request_timeout_s"], threads=ENGINE["threads"], cache_dir=cache_dir,
                    tenants=TENANTS if fairness else None, fairness=fairness or "vtc")
    engine.start()
    return engine


async def consume(engine, tenant: str, ids: list[int], max_tokens: int) -> Sent:
    from moeops.serve.engine import EngineFull, SamplingParams

    s = Sent(tenant, time.perf_counter())
    try:
        async for delta in engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                               ignore_eos=True), tenant=tenant):
            now = time.perf_counter()
            s.token_times += [now] * len(delta.token_ids)
            if s.ttft is None and delta.token_ids:
                s.ttft = now - s.submitted
    except EngineFull:
        s.refused = True
        return s
    s.end = time.perf_counter()
    return s


async def drive(engine, streams: dict[str, tuple[list[list[int]], list[int], np.ndarray]]):
    """Send each tenant's requests at their arrival times (seconds after the start); (sent, rows of A
    sampled every 5 ms as (time, rows), start time)."""
    rows: list[tuple[float, int]] = []
    await consume(engine, "B", [1, 2, 3], 2)  # the first request's cost, untimed
    t0 = time.perf_counter()

    async def one(tenant: str, ids: list[int], max_tokens: int, at: float) -> Sent:
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        return await consume(engine, tenant, ids, max_tokens)

    async def watch():
        while True:
            rows.append((time.perf_counter(), sum(r.tenant == "A" for r in list(engine._rows))))
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    sent = await asyncio.gather(*(one(t, ids, m, float(at)) for t, (prompts, maxes, ats) in streams.items()
                                  for ids, m, at in zip(prompts, maxes, ats, strict=True)))
    watcher.cancel()
    return list(sent), rows, t0


def intervals(sent: list[Sent], tenant: str) -> list[tuple[float, float]]:
    """The union of a tenant's accepted requests' [arrival, end], merged."""
    spans = sorted((s.submitted, s.end) for s in sent if s.tenant == tenant and s.end is not None)
    merged: list[list[float]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def inside(t: float, spans: list[tuple[float, float]]) -> bool:
    return any(a <= t <= b for a, b in spans)


def analyse(sent: list[Sent], rows: list[tuple[float, int]], capacity_tps: float) -> dict:
    ttft = {t: [s.ttft for s in sent if s.tenant == t and s.ttft is not None] for t in ("A", "B", "probe")}
    refused = {t: sum(s.refused for s in sent if s.tenant == t) for t in ("A", "B", "probe")}
    offered = {t: sum(s.tenant == t for s in sent) for t in ("A", "B", "probe")}
    spans = intervals(sent, "B")
    demand_s = sum(b - a for a, b in spans)
    tokens = {t: sum(inside(x, spans) for s in sent if s.tenant == t for x in s.token_times)
              for t in ("A", "B", "probe")}
    total = sum(tokens.values())
    a_rows = [n for t, n in rows if inside(t, spans)]
    return {
        "b_ttft_ms_p50": pct(ttft["B"], 50), "b_ttft_ms_p99": pct(ttft["B"], 99),
        "probe_ttft_ms_p50": pct(ttft["probe"], 50), "probe_ttft_ms_p99": pct(ttft["probe"], 99),
        "offered": offered, "refused": refused,
        "b_demand_s": round(demand_s, 3),
        "tokens_while_b_demand": tokens,
        "a_token_share_while_b_demand": round(tokens["A"] / total, 4) if total else None,
        "a_tps_over_capacity_while_b_demand": round(tokens["A"] / demand_s / capacity_tps, 4) if demand_s else None,
        "a_rows_max_while_b_demand": max(a_rows, default=0),
        "a_rows_mean_while_b_demand": round(float(np.mean(a_rows)), 3) if a_rows else 0.0,
    }


def run(project: Path, repeats: int, duration: float, capacity_requests: int = CAPACITY_REQUESTS) -> dict:
    from tokenizers import Tokenizer

    model_dir, prepared = project / "exports/onnx/int8", project / "data/prepared"
    context = json.loads((model_dir / "config.json").read_text())["max_seq_len"]
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    def workload(n: int, seed: int, prompt=PROMPT_TOKENS, output=OUTPUT_TOKENS) -> tuple[list[list[int]], list[int]]:
        reqs: list[Req] = make_requests(prepared, n, seed, prompt, output, context)
        return [tok.encode(r.prompt).ids for r in reqs], [r.max_tokens for r in reqs]

    cache_dir = Path(tempfile.mkdtemp(prefix="bench-tenants-ort-"))
    per_repeat = []
    for r in range(repeats):
        print(f"repeat {r + 1}/{repeats}", flush=True)
        prompts, maxes = workload(capacity_requests, 1000 + r)
        engine = engine_for(model_dir, cache_dir, f"cap{r}", None)
        try:
            sent, _, t0 = asyncio.run(drive(engine, {"B": (prompts, maxes, np.zeros(len(prompts)))}))
        finally:
            engine.close()
        wall = max(s.end for s in sent) - t0
        cap_rps, cap_tps = len(sent) / wall, sum(len(s.token_times) for s in sent) / wall
        print(f"  capacity {cap_rps:.2f} req/s, {cap_tps:.0f} output tokens/s", flush=True)

        def stream(rate: float, seed: int, prompt=PROMPT_TOKENS, output=OUTPUT_TOKENS):
            ats = arrivals(max(1, int(rate * duration * 1.5) + 4), rate, seed)
            ats = ats[ats < duration] if (ats < duration).any() else ats[:1]
            return (*workload(len(ats), seed, prompt, output), ats)

        b = stream(B_OFFERED * cap_rps, 2000 + r)
        probe = stream(PROBE_RATE, 3000 + r, (16, 16), (1, 1))
        a = stream(A_OFFERED * cap_rps, 4000 + r)
        runs = {}
        for config, fairness, streams in (("alone", "vtc", {"B": b, "probe": probe}),
                                          ("vtc", "vtc", {"A": a, "B": b, "probe": probe}),
                                          ("fcfs", "fcfs", {"A": a, "B": b, "probe": probe})):
            engine = engine_for(model_dir, cache_dir, f"{config}{r}", fairness)
            try:
                sent, rows, _ = asyncio.run(drive(engine, streams))
            finally:
                engine.close()
            runs[config] = analyse(sent, rows, cap_tps)
            m = runs[config]
            print(f"  {config:6} B TTFT p50 {m['b_ttft_ms_p50']} ms p99 {m['b_ttft_ms_p99']} ms, probe p99 "
                  f"{m['probe_ttft_ms_p99']} ms, refused {m['refused']}, A token share while B has demand "
                  f"{m['a_token_share_while_b_demand']}, A rows max {m['a_rows_max_while_b_demand']}", flush=True)
        alone = runs["alone"]
        ratios = {"capacity_requests_per_s": cap_rps, "capacity_output_tokens_per_s": cap_tps}
        for config in ("vtc", "fcfs"):
            m = runs[config]
            ratios |= {
                f"{config}_b_p99_ttft_vs_alone": m["b_ttft_ms_p99"] / alone["b_ttft_ms_p99"],
                f"{config}_b_p50_ttft_vs_alone": m["b_ttft_ms_p50"] / alone["b_ttft_ms_p50"],
                f"{config}_b_refused": m["refused"]["B"],
                f"{config}_a_rows_max_while_b_demand": m["a_rows_max_while_b_demand"],
                f"{config}_a_token_share_while_b_demand": m["a_token_share_while_b_demand"],
                f"{config}_a_tps_over_capacity_while_b_demand": m["a_tps_over_capacity_while_b_demand"],
                f"{config}_probe_stall_ms_p50": (m["probe_ttft_ms_p50"] or 0) - (alone["probe_ttft_ms_p50"] or 0),
                f"{config}_probe_stall_ms_p99": (m["probe_ttft_ms_p99"] or 0) - (alone["probe_ttft_ms_p99"] or 0),
            }
        per_repeat.append({"runs": runs, "ratios": ratios})
    keys = per_repeat[0]["ratios"]
    ratio_spread = {k: spread([p["ratios"][k] for p in per_repeat]) for k in keys}
    return {
        "per_repeat": per_repeat, "ratio_spread": ratio_spread,
        "targets": {k: {"target": t, "higher_is_better": hib} for k, (t, hib) in TARGETS.items()},
        "verdicts": {k: verdict(ratio_spread[k], t, hib) for k, (t, hib) in TARGETS.items()},
        "setup": {"engine": ENGINE, "tenants": {t: {"weight": w, "max_share": s} for t, (w, s) in TENANTS.items()},
                  "row_cap": ROW_CAP, "prompt_tokens": PROMPT_TOKENS, "output_tokens": OUTPUT_TOKENS,
                  "a_offered_x_capacity": A_OFFERED, "b_offered_x_capacity": B_OFFERED,
                  "probe_rate_per_s": PROBE_RATE, "duration_s": duration, "repeats": repeats,
                  "capacity_requests": capacity_requests,
                  "model": str(model_dir / "model.onnx")},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.tenants", description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", type=Path, default=Path("."), help="a project after `make pipeline` (default: .)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per run (default 20)")
    ap.add_argument("--capacity-requests", type=int, default=CAPACITY_REQUESTS,
                    help=f"requests of the saturation run (default {CAPACITY_REQUESTS})")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    result = run(a.project, a.repeats, a.duration, a.capacity_requests)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print_spread(result)
    print(f"written {save('tenants', 'bench.tenants', argv, result)} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
