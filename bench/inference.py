"""Issue-4 speed targets, side by side in one process on the pipeline's own artifacts:

  * ONNX Runtime int8 (and fp32, int4) decode tokens/s vs PyTorch eager fp32 with the same KV
    cache, same student model, batch 1 and 8;
  * student vs teacher latency in PyTorch eager: prefill of a 64-token prompt, and per decoded token.

    python -m bench.run inference      (after `make pipeline`)

Runs are interleaved (A B C ... A B C ...) and each number is the median over the rounds.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from moeops.evaluate.variants import decode_speed
from moeops.export.onnx import OnnxLM
from moeops.model.generate import torch_step
from moeops.model.io import load_model_dir

TEACHER, STUDENT, ONNX = Path("models/teacher"), Path("models/student"), Path("exports/onnx")


def run(rounds: int = 5, prompt_len: int = 64, new_tokens: int = 32) -> dict:
    threads = torch.get_num_threads()
    teacher, student = load_model_dir(TEACHER), load_model_dir(STUDENT)
    steps = {"teacher_pytorch": (torch_step(teacher), teacher.args.vocab_size),
             "student_pytorch": (torch_step(student), student.args.vocab_size)}
    for v in ("fp32", "int8", "int4"):
        steps[f"student_ort_{v}"] = (OnnxLM(ONNX / v / "model.onnx", threads=threads).step, student.args.vocab_size)
    samples = {name: {1: [], 8: []} for name in steps}
    for _ in range(rounds):
        for batch in (1, 8):
            for name, (step, vocab) in steps.items():
                samples[name][batch].append(decode_speed(step, vocab, batch, prompt_len, new_tokens, repeats=1))
    table = {name: {f"batch{b}": {k: statistics.median(s[k] for s in runs) for k in runs[0]}
                    for b, runs in per_batch.items()} for name, per_batch in samples.items()}
    b1 = {name: t["batch1"] for name, t in table.items()}
    eager = b1["student_pytorch"]["decode_tokens_per_s"]
    ratios = {
        "ort_int8_vs_pytorch_eager_decode_batch1": b1["student_ort_int8"]["decode_tokens_per_s"] / eager,
        "ort_fp32_vs_pytorch_eager_decode_batch1": b1["student_ort_fp32"]["decode_tokens_per_s"] / eager,
        "ort_int4_vs_pytorch_eager_decode_batch1": b1["student_ort_int4"]["decode_tokens_per_s"] / eager,
        "student_vs_teacher_prefill_latency": b1["teacher_pytorch"]["prefill_ms"] / b1["student_pytorch"]["prefill_ms"],
        "student_vs_teacher_decode_latency": eager / b1["teacher_pytorch"]["decode_tokens_per_s"],
    }
    return {"rounds": rounds, "prompt_len": prompt_len, "new_tokens": new_tokens, "threads": threads,
            "table": table, "ratios": {k: round(v, 2) for k, v in ratios.items()},
            "targets": {"ort_int8_vs_pytorch_eager_decode_batch1": 3.0, "student_vs_teacher_prefill_latency": 3.0}}
