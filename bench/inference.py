"""Issue-4 speed targets, side by side in one process on the pipeline's own artifacts:

  * ONNX Runtime int8 (and fp32, int4) decode tokens/s vs PyTorch eager fp32 with the same KV
    cache, same student model, batch 1 and 8;
  * student vs teacher latency in PyTorch eager: prefill of a 64-token prompt, and per decoded token.

    python -m bench.inference [--rounds 7] [--project .]      (after `make pipeline`)

Runs are interleaved (A B C ... A B C ...). Every ratio is taken per round (both sides measured
back to back) and reported as median (min-max) over the rounds; a target counts as met only when
the lowest per-round ratio meets it. Writes bench/results/inference.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from bench.common import save, spread, verdict
from moeops.evaluate.variants import decode_speed
from moeops.export.onnx import OnnxLM
from moeops.model.generate import torch_step
from moeops.model.io import load_model_dir

TARGETS = {"ort_int8_vs_pytorch_eager_decode_batch1": 3.0, "student_vs_teacher_prefill_latency": 3.0,
           "student_vs_teacher_decode_latency": 3.0}


def round_ratios(r: dict[str, dict]) -> dict[str, float]:
    """The ratios of one round; `r` maps model -> {prefill_ms, decode_tokens_per_s} at batch 1."""
    eager = r["student_pytorch"]["decode_tokens_per_s"]
    return {
        "ort_int8_vs_pytorch_eager_decode_batch1": r["student_ort_int8"]["decode_tokens_per_s"] / eager,
        "ort_fp32_vs_pytorch_eager_decode_batch1": r["student_ort_fp32"]["decode_tokens_per_s"] / eager,
        "ort_int4_vs_pytorch_eager_decode_batch1": r["student_ort_int4"]["decode_tokens_per_s"] / eager,
        "student_vs_teacher_prefill_latency": r["teacher_pytorch"]["prefill_ms"] / r["student_pytorch"]["prefill_ms"],
        "student_vs_teacher_decode_latency": eager / r["teacher_pytorch"]["decode_tokens_per_s"],
    }


def run(project: Path = Path("."), rounds: int = 5, prompt_len: int = 64, new_tokens: int = 32) -> dict:
    threads = torch.get_num_threads()
    teacher, student = load_model_dir(project / "models/teacher"), load_model_dir(project / "models/student")
    steps = {"teacher_pytorch": (torch_step(teacher), teacher.args.vocab_size),
             "student_pytorch": (torch_step(student), student.args.vocab_size)}
    for v in ("fp32", "int8", "int4"):
        onnx = project / "exports/onnx" / v / "model.onnx"
        steps[f"student_ort_{v}"] = (OnnxLM(onnx, threads=threads).step, student.args.vocab_size)
    samples = {name: {1: [], 8: []} for name in steps}
    for _ in range(rounds):
        for batch in (1, 8):
            for name, (step, vocab) in steps.items():
                samples[name][batch].append(decode_speed(step, vocab, batch, prompt_len, new_tokens, repeats=1))
    table = {name: {f"batch{b}": {k: statistics.median(s[k] for s in runs) for k in ("prefill_ms",
                                                                                   "decode_tokens_per_s")}
                    for b, runs in per_batch.items()} for name, per_batch in samples.items()}
    per_round = [round_ratios({name: samples[name][1][i] for name in steps}) for i in range(rounds)]
    ratios = {k: spread((r[k] for r in per_round), 3) for k in per_round[0]}
    return {"project": str(project), "rounds": rounds, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "threads": threads, "table": table,
            "table_spread": {name: {f"batch{b}": {k: spread((s[k] for s in runs), 2)
                                                  for k in ("prefill_ms", "decode_tokens_per_s")}
                                    for b, runs in per_batch.items()} for name, per_batch in samples.items()},
            "ratios": {k: v["median"] for k, v in ratios.items()}, "ratio_spread": ratios,
            "targets": TARGETS, "verdicts": {k: verdict(ratios[k], t) for k, t in TARGETS.items()},
            "note": "table: medians over rounds; ratios: per round (same round's numbers), median (min-max)"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.inference")
    ap.add_argument("--project", type=Path, default=Path("."), help="where models/ and exports/ are (default: .)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    a = ap.parse_args(argv)
    result = run(a.project, a.rounds, a.prompt_len, a.new_tokens)
    print(json.dumps({k: result[k] for k in ("table", "ratio_spread", "verdicts")}, indent=2))
    print(f"written {save('inference', 'bench.inference', argv, result)}")


if __name__ == "__main__":
    main()
