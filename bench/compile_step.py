"""Our training step eager vs `torch.compile(model)` (inductor on CPU), same model, batch and
threads, interleaved in one process after the compiled model's first step (whose time, mostly
compilation, is reported on its own).

    python -m bench.compile_step [--flavor small] [--batch 16] [--seq 256] [--repeats 5]

The speedup is taken per repeat and reported as median (min-max). Writes
bench/results/compile_step.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from bench.common import save, spread
from bench.train_step import make_step
from moeops.config import PretrainParams, make_model_args
from moeops.model.transformer import build_model
from moeops.train.loop import make_optimizer


def run(flavor: str, batch: int, seq: int, repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    args = make_model_args(flavor, {"max_seq_len": max(seq, make_model_args(flavor).max_seq_len)})
    p = PretrainParams(flavor=flavor, seq_len=min(seq, args.max_seq_len), model={"max_seq_len": args.max_seq_len})
    eager = build_model(args, seed=0).train()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    x_BS = torch.randint(0, args.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    steps = {"eager": make_step(eager, make_optimizer(eager, p), x_BS, args.vocab_size),
             "compiled": make_step(compiled, make_optimizer(compiled_model, p), x_BS, args.vocab_size)}
    t = time.perf_counter()
    steps["compiled"]()
    first_compiled_s = time.perf_counter() - t
    steps["compiled"]()  # a second call can still recompile (e.g. optimizer state appearing)
    steps["eager"]()
    times = {k: [] for k in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    tokens = batch * seq
    speedup = spread((e / c for e, c in zip(times["eager"], times["compiled"])), 3)
    return {"flavor": flavor, "batch": batch, "seq": seq, "threads": threads, "repeats": repeats,
            "tokens_per_s": {k: spread((tokens / s for s in v), 1) for k, v in times.items()},
            "speedup_compiled_vs_eager": speedup, "first_compiled_step_s": round(first_compiled_s, 1),
            "note": "per repeat one step of each, interleaved; first_compiled_step_s: the compiled model's first "
                    "step (compilation included), once"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.compile_step")
    ap.add_argument("--flavor", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args(argv)
    result = run(a.flavor, a.batch, a.seq, a.repeats, a.threads)
    print(json.dumps(result, indent=2))
    print(f"written {save('compile_step', 'bench.compile_step', argv, result)}")


if __name__ == "__main__":
    main()
