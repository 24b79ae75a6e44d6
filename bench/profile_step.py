"""Where a training step's time goes: torch.profiler over 3 steps of the small flavor
(batch 8 x 256, 1 thread, after 2 warm-up steps), top ops by self CPU time.

    python -m bench.profile_step [--flavor small] [--batch 8] [--seq 256] [--steps 3]

Writes bench/results/profile_step.json (each op's share of the profiled self CPU time) and
prints the profiler's table. One profiled run: shares, not speeds, so no spread is taken.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import save
from bench.train_step import make_step
from moeops.config import PretrainParams, make_model_args
from moeops.model.transformer import build_model
from moeops.train.loop import make_optimizer


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.profile_step")
    ap.add_argument("--flavor", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    args = make_model_args(a.flavor, {"max_seq_len": max(a.seq, make_model_args(a.flavor).max_seq_len)})
    model = build_model(args).train()
    x_BS = torch.randint(0, args.vocab_size, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    step = make_step(model, make_optimizer(model, PretrainParams()), x_BS, args.vocab_size)
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps):
            step()
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=a.top))
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:a.top]
    result = {"flavor": a.flavor, "batch": a.batch, "seq": a.seq, "threads": 1, "profiled_steps": a.steps,
              "self_cpu_ms_total": round(total / 1000, 1),
              "top_ops": [{"op": e.key, "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1000, 1),
                           "share": round(e.self_cpu_time_total / total, 4)} for e in top]}
    print(f"written {save('profile_step', 'bench.profile_step', argv, result)}")


if __name__ == "__main__":
    main()
