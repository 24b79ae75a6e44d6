"""Training-step throughput: ours vs transformers' DeepseekV3ForCausalLM at the same config,
batch, sequence length and threads, interleaved in one process; and MFU against a matmul
peak measured on the same machine.

    python -m bench.train_step [--flavor small] [--batch 16] [--seq 256] [--repeats 5]

Each repeat times one step of each implementation back to back; the ratio is taken per repeat
(the pair saw the same machine state) and reported as median (min-max) over the repeats. The
targets (fp32 >= 1.5x transformers, MFU >= 45%; bf16 autocast >= 2x transformers fp32, timed only
on a CPU whose bf16 matmul peak beats its fp32 peak) count as met only when the lowest per-repeat
value meets them.
Writes bench/results/train_step.json.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from bench.common import save, spread, verdict
from moeops.config import PretrainParams, make_model_args
from moeops.model.hf import hf_model
from moeops.model.transformer import Transformer, build_model, param_counts
from moeops.train.loop import make_optimizer


def matmul_peak_gflops(threads: int, n: int = 2048, repeats: int = 5, dtype=torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


def train_flops_per_token(args, seq_len: int) -> float:
    """6 × active non-embedding params (forward + backward matmuls) + causal attention scores
    (12 · layers · heads · seq · head_dim / 2, PaLM appendix B with a causal half)."""
    counts = param_counts(args)
    active_matmul = counts["active"] - args.vocab_size * args.dim  # embedding lookup is not a matmul
    qk, v = args.qk_nope_head_dim + args.qk_rope_head_dim, args.v_head_dim
    attn = 6 * args.n_layers * args.n_heads * seq_len * (qk + v) / 2
    return 6 * active_matmul + attn


def make_step(model, optimizer, x_BS, vocab, autocast: bool = False):
    """One training step as each implementation is meant to be trained: ours through the fused
    lm_head + cross-entropy (`model(x, targets)`, what the pretrain loop runs), transformers'
    through its logits and F.cross_entropy."""
    y_BS = x_BS % vocab

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if isinstance(model, Transformer):
                loss = model(x_BS, y_BS)
            else:
                logits = model(x_BS)
                logits = logits.logits if hasattr(logits, "logits") else logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), y_BS.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def run(flavor: str, batch: int, seq: int, repeats: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    args = make_model_args(flavor, {"max_seq_len": max(seq, make_model_args(flavor).max_seq_len)})
    ours = build_model(args, seed=0).train()
    theirs = hf_model(args).train()
    theirs.load_state_dict(ours.state_dict())
    p = PretrainParams(flavor=flavor, seq_len=min(seq, args.max_seq_len), model={"max_seq_len": args.max_seq_len})
    x_BS = torch.randint(0, args.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    peaks = {"fp32": [matmul_peak_gflops(threads) for _ in range(3)],
             "bf16": [matmul_peak_gflops(threads, n=1024, dtype=torch.bfloat16) for _ in range(2)]}
    bf16_pays = max(peaks["bf16"]) > max(peaks["fp32"])
    steps = {"moeops": make_step(ours, make_optimizer(ours, p), x_BS, args.vocab_size),
             "transformers": make_step(theirs, make_optimizer(theirs, p), x_BS, args.vocab_size)}
    if bf16_pays:  # bf16 autocast only where this CPU's bf16 matmuls beat fp32 (what `bf16: auto` picks)
        ours_bf16 = build_model(args, seed=0).train()
        steps["moeops_bf16"] = make_step(ours_bf16, make_optimizer(ours_bf16, p), x_BS, args.vocab_size, True)
    for fn in steps.values():  # warm-up
        fn()
    times = {k: [] for k in steps}
    for _ in range(repeats):  # interleaved so both see the same machine state
        for name, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    tokens = batch * seq
    tok_s = {k: spread((tokens / t for t in v), 1) for k, v in times.items()}
    ratio = spread((b / a for a, b in zip(times["moeops"], times["transformers"])), 3)
    ratio_bf16 = (spread((b / a for a, b in zip(times["moeops_bf16"], times["transformers"])), 3)
                  if bf16_pays else None)
    flops = train_flops_per_token(args, seq)
    mfu = spread((tokens / t * flops / (max(peaks["fp32"]) * 1e9) for t in times["moeops"]), 4)
    return {
        "flavor": flavor, "batch": batch, "seq": seq, "threads": threads, "repeats": repeats,
        "tokens_per_s": {k: v["median"] for k, v in tok_s.items()},
        "tokens_per_s_spread": tok_s,
        "speedup_vs_transformers": ratio["median"],
        "speedup_spread": ratio,
        "target_speedup": 1.5, "target_speedup_verdict": verdict(ratio, 1.5),
        "bf16_speedup_vs_transformers_fp32": ratio_bf16,
        "target_bf16_speedup": 2.0,
        "target_bf16_verdict": (verdict(ratio_bf16, 2.0) if bf16_pays else
                                "not applicable: this CPU's bf16 matmul peak is below its fp32 peak"),
        "matmul_peak_gflops_fp32": round(max(peaks["fp32"]), 1),
        "matmul_peak_gflops_spread": spread(peaks["fp32"], 1),
        "matmul_peak_gflops_bf16": round(max(peaks["bf16"]), 1),
        "train_flops_per_token": round(flops),
        "mfu_fp32": mfu["median"],
        "mfu_spread": mfu,
        "target_mfu": 0.45, "target_mfu_verdict": verdict(mfu, 0.45),
        "params": param_counts(args),
        "note": "per repeat: one step of each, interleaved; speedup = transformers step time / ours, per repeat; "
                "ours trains through the fused lm_head + cross-entropy, transformers through its logits; "
                "MFU against the best of 3 fp32 matmul-peak measurements (2048^2; bf16: 1024^2, best of 2)",
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.train_step")
    ap.add_argument("--flavor", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args(argv)
    result = run(a.flavor, a.batch, a.seq, a.repeats, a.threads)
    print(json.dumps(result, indent=2))
    print(f"written {save('train_step', 'bench.train_step', argv, result)}")


if __name__ == "__main__":
    main()
