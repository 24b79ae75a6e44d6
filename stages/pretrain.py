"""DVC stage `pretrain`: data/prepared → models/teacher, metrics/pretrain.json, dvclive plots.

Re-running after Ctrl-C or kill -9 resumes from the newest complete checkpoint in
checkpoints/pretrain and ends with the same weights as an uninterrupted run. Checkpoints of other
runs (other params, data or code; e.g. a `dvc exp run` in the workspace) are parked in
checkpoints/pretrain/runs/<run id>/ and resume when their params come back; pretrain.keep_runs
bounds how many runs keep theirs (moeops/train/checkpoint.py).

With world_size > 1 (or max_restarts, or a hostfile) the stage validates everything, then
launches `python -m stages.pretrain --worker` processes (moeops/train/launch.py) and waits.

Once training has succeeded, the stage's own process scores models/teacher on the shared val
evaluation (moeops/evaluate/scoring.py: every val document capped at evaluate.max_tokens_per_doc,
windows of the model's context every evaluate.stride) and adds it to metrics/pretrain.json as "val":
what `dvc exp show` compares across the runs of an architecture search.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from moeops.cli import run_main
from moeops.config import PretrainParams, load_section
from moeops.evaluate.scoring import Document, document_bytes, score_documents, summarize, val_documents
from moeops.io import atomic_write_json
from moeops.lineage import lineage
from moeops.model.io import load_model_dir, save_model_dir
from moeops.model.transformer import param_counts
from moeops.train.data import load_meta, load_tokens
from moeops.train.launch import launch, needs_launcher
from moeops.train.loop import check_train_tokens, pretrain

PREPARED = Path("data/prepared")
OUT = Path("models/teacher")
CKPT = Path("checkpoints/pretrain")
LIVE = Path("dvclive/pretrain")
METRICS = Path("metrics/pretrain.json")
VAL_BATCH = 8


def val_metrics(model_dir: Path, docs: list[Document], max_tokens_per_doc: int, stride: int) -> dict:
    """The model in `model_dir` on the shared val evaluation."""
    model = load_model_dir(model_dir)
    seq_len = model.args.max_seq_len
    with torch.inference_mode():
        scores = score_documents(lambda x_BS: model(torch.from_numpy(x_BS)), model_dir / "tokenizer.json", docs,
                                 seq_len, stride, VAL_BATCH)
    m = summarize(scores, document_bytes(docs))
    return {"bits_per_byte": round(m["bits_per_byte"], 5), "bits_per_byte_macro": round(m["bits_per_byte_macro"], 5),
            "loss": round(m["loss"], 5), "tokens": m["tokens"], "documents": m["documents"],
            "max_tokens_per_doc": max_tokens_per_doc, "stride": min(stride, seq_len)}


def main() -> None:
    p = load_section("pretrain")
    e = load_section("evaluate")
    meta = load_meta(PREPARED)
    tokens = load_tokens(PREPARED, "train")
    if "--worker" in sys.argv:  # rank 0 writes the metrics; the launching process adds "val"
        metrics = train(p, tokens, meta)
        if metrics is not None:
            atomic_write_json(METRICS, metrics)
        return
    check_train_tokens(p, tokens)  # every check that can run before training starts
    docs = val_documents(PREPARED, e.max_tokens_per_doc)
    if needs_launcher(p):
        code = launch(p, ["-m", "stages.pretrain", "--worker"])
        if code:
            raise SystemExit(code)
        metrics = json.loads(METRICS.read_text())
    else:
        metrics = train(p, tokens, meta)
    val = val_metrics(OUT, docs, e.max_tokens_per_doc, e.stride)
    atomic_write_json(METRICS, {**metrics, "val": val})
    print(f"pretrain: {OUT} scores {val['bits_per_byte']:.4f} bits/byte on val ({val['documents']} documents, "
          f"macro {val['bits_per_byte_macro']:.4f})")


def train(p: PretrainParams, tokens: np.ndarray, meta: dict) -> dict | None:
    """Train (or resume); on rank 0 write models/teacher and return the training metrics (else None)."""
    result = pretrain(p, tokens, meta["vocab_size"], meta, CKPT, LIVE)
    if result.model is None:  # not rank 0
        return None
    inputs = [PREPARED / n for n in ("train.bin", "tokenizer.json", "meta.json")]
    save_model_dir(OUT, result.model, PREPARED / "tokenizer.json", lineage(inputs, p.model_dump(), "pretrain"))
    counts = param_counts(result.model.args)
    print(f"pretrain: {OUT} written; {counts['total']:,} params ({counts['active']:,} active), "
          f"{result.tokens_per_s:,.0f} tokens/s")
    return {
        "steps": p.steps,
        "tokens": p.steps * p.batch_size * p.seq_len * p.grad_accum,
        "final_train_loss": round(result.final_loss, 5),
        "tokens_per_s": round(result.tokens_per_s, 1),
        "train_seconds": round(result.seconds, 1),
        "resumed_from_step": result.resumed_from,
        "params_total": counts["total"],
        "params_active": counts["active"],
        "maxvio_final": [round(v, 4) for v in result.maxvio],
        "expert_load_last_steps": {"steps": result.balance_steps,
                                   "busiest_over_uniform": [round(v, 4) for v in result.busiest_over_uniform]},
        "world_size": p.world_size,
        "grad_bytes_per_step": result.grad_bytes_per_step,
        "all_to_all_bytes_per_step": result.all_to_all_bytes_per_step,
        "peak_rss_gb": round(result.peak_rss_gb, 3),
        "activation_checkpointing": result.activation_checkpointing,
        "bf16": result.bf16,  # pretrain.bf16 as resolved (auto: by the matmul peaks below)
        "matmul_peak_gflops": result.matmul_peaks_gflops,
    }


if __name__ == "__main__":
    run_main(main)
