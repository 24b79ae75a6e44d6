"""DVC stage `evaluate`: every variant on the same val split → metrics/eval.json, plots/expert_load.png.

The top-level keys describe the teacher (quality against gzip/xz, expert load, speed); `variants`
is the side-by-side table: teacher, student, baseline (PyTorch, fp32) and the ONNX Runtime models
(fp32, int8, int4) with bits-per-byte, top-1, prefill latency and decode tokens/s at batch 1 and 8,
peak RSS and file size."""

from __future__ import annotations

from pathlib import Path

import torch

from moeops.cli import run_main
from moeops.config import load_section
from moeops.evaluate.metrics import evaluate_model, plot_expert_load
from moeops.evaluate.variants import evaluate_variants
from moeops.io import atomic_write_json
from moeops.model.io import load_model_dir, verify_checksums
from moeops.train.data import load_tokens

PREPARED = Path("data/prepared")
MODEL = Path("models/teacher")
VARIANTS = {"teacher": ("torch", MODEL), "student": ("torch", Path("models/student")),
            "baseline": ("torch", Path("models/baseline")), "onnx_fp32": ("onnx", Path("exports/onnx/fp32")),
            "onnx_int8": ("onnx", Path("exports/onnx/int8")), "onnx_int4": ("onnx", Path("exports/onnx/int4"))}
METRICS = Path("metrics/eval.json")
PLOT = Path("plots/expert_load.png")


def main() -> None:
    p = load_section("evaluate")
    if p.threads:
        torch.set_num_threads(p.threads)
    # dvc.yaml makes every variant a dependency; a stage run by hand evaluates those that exist.
    present = {name: v for name, v in VARIANTS.items() if v[1].is_dir()}
    for _, path in present.values():  # a damaged or unrecorded variant fails now, not after minutes of work
        verify_checksums(path)
    model = load_model_dir(MODEL)
    val = load_tokens(PREPARED, "val")
    result = evaluate_model(model, val, MODEL / "tokenizer.json", p.batch_size, p.max_tokens, p.speed_tokens)
    plot_expert_load(result.pop("expert_share"), model.args.first_k_dense_replace, PLOT)
    del model
    result["variants"] = evaluate_variants(present, PREPARED, p.batch_size, p.max_tokens, p.decode_prompt_len,
                                           p.decode_new_tokens, p.threads)
    atomic_write_json(METRICS, result)
    v, ref = result["val"], result["reference_bits_per_byte"]
    print(f"evaluate: val bits/byte {v['bits_per_byte']:.4f} (gzip -9 {ref['gzip_9']:.4f}, xz -9e {ref['xz_9e']:.4f}), "
          f"loss {v['loss']:.4f}, top-1 {v['top1_accuracy']:.3f} on {v['tokens']:,} tokens")


if __name__ == "__main__":
    run_main(main)
