"""DVC stage `evaluate`: models/teacher + data/prepared/val.bin → metrics/eval.json,
plots/expert_load.png."""

from __future__ import annotations

from pathlib import Path

import torch

from moeops.cli import run_main
from moeops.config import load_section
from moeops.evaluate.metrics import evaluate_model, plot_expert_load
from moeops.io import atomic_write_json
from moeops.model.io import load_model_dir
from moeops.train.data import load_tokens

PREPARED = Path("data/prepared")
MODEL = Path("models/teacher")
METRICS = Path("metrics/eval.json")
PLOT = Path("plots/expert_load.png")


def main() -> None:
    p = load_section("evaluate")
    if p.threads:
        torch.set_num_threads(p.threads)
    model = load_model_dir(MODEL)
    val = load_tokens(PREPARED, "val")
    result = evaluate_model(model, val, MODEL / "tokenizer.json", p.batch_size, p.max_tokens, p.speed_tokens)
    plot_expert_load(result.pop("expert_share"), model.args.first_k_dense_replace, PLOT)
    atomic_write_json(METRICS, result)
    v, ref = result["val"], result["reference_bits_per_byte"]
    print(f"evaluate: val bits/byte {v['bits_per_byte']:.4f} (gzip -9 {ref['gzip_9']:.4f}, xz -9e {ref['xz_9e']:.4f}), "
          f"loss {v['loss']:.4f}, top-1 {v['top1_accuracy']:.3f} on {v['tokens']:,} tokens")


if __name__ == "__main__":
    run_main(main)
