"""DVC stage `pretrain`: data/prepared → models/teacher, metrics/pretrain.json, dvclive plots.

Re-running after Ctrl-C or kill -9 resumes from the newest complete checkpoint in
checkpoints/pretrain and ends with the same weights as an uninterrupted run. Checkpoints of other
runs (other params, data or code; e.g. a `dvc exp run` in the workspace) are parked in
checkpoints/pretrain/runs/<run id>/ and resume when their params come back; pretrain.keep_runs
bounds how many runs keep theirs (moeops/train/checkpoint.py).

With world_size > 1 (or max_restarts, or a hostfile) the stage validates everything, then
launches `python -m stages.pretrain --worker` processes (moeops/train/launch.py) and waits.
"""

from __future__ import annotations

import sys
from pathlib import Path

from moeops.cli import run_main
from moeops.config import load_section
from moeops.io import atomic_write_json
from moeops.lineage import lineage
from moeops.model.io import save_model_dir
from moeops.model.transformer import param_counts
from moeops.train.data import load_meta, load_tokens
from moeops.train.launch import launch, needs_launcher
from moeops.train.loop import check_train_tokens, pretrain

PREPARED = Path("data/prepared")
OUT = Path("models/teacher")
CKPT = Path("checkpoints/pretrain")
LIVE = Path("dvclive/pretrain")
METRICS = Path("metrics/pretrain.json")


def main() -> None:
    p = load_section("pretrain")
    meta = load_meta(PREPARED)
    tokens = load_tokens(PREPARED, "train")
    if "--worker" not in sys.argv and needs_launcher(p):
        check_train_tokens(p, tokens)  # every check that can run before the processes start
        code = launch(p, ["-m", "stages.pretrain", "--worker"])
        if code:
            raise SystemExit(code)
        return
    result = pretrain(p, tokens, meta["vocab_size"], meta, CKPT, LIVE)
    if result.model is None:  # not rank 0
        return
    inputs = [PREPARED / n for n in ("train.bin", "tokenizer.json", "meta.json")]
    save_model_dir(OUT, result.model, PREPARED / "tokenizer.json", lineage(inputs, p.model_dump(), "pretrain"))
    counts = param_counts(result.model.args)
    atomic_write_json(METRICS, {
        "steps": p.steps,
        "tokens": p.steps * p.batch_size * p.seq_len * p.grad_accum,
        "final_train_loss": round(result.final_loss, 5),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "train_seconds": round(result.seconds, 1),
        "resumed_from_step": result.resumed_from,
        "params_total": counts["total"],
        "params_active": counts["active"],
        "maxvio_final": [round(v, 4) for v in result.maxvio],
        "world_size": p.world_size,
        "grad_bytes_per_step": result.grad_bytes_per_step,
        "all_to_all_bytes_per_step": result.all_to_all_bytes_per_step,
        "peak_rss_gb": round(result.peak_rss_gb, 3),
        "activation_checkpointing": result.activation_checkpointing,
        "bf16": result.bf16,  # pretrain.bf16 as resolved (auto: by the matmul peaks below)
        "matmul_peak_gflops": result.matmul_peaks_gflops,
    })
    print(f"pretrain: {OUT} written; {counts['total']:,} params ({counts['active']:,} active), "
          f"{result.tokens_per_s:,.0f} tokens/s")


if __name__ == "__main__":
    run_main(main)
