"""DVC stage `evaluate`: every variant on the same val documents → metrics/eval.json,
plots/eval_documents.csv, plots/expert_load.png.

The shared evaluation (moeops/evaluate/scoring.py, as pretrain and gate score): every val document capped
at `max_tokens_per_doc` tokens, scored in windows of each model's context every `stride` tokens. `val`
is the teacher (micro and macro bits-per-byte, loss, top-1, mean context), `compressors` gzip -9, xz -9e
and PPMd o16 on exactly those bytes (concatenated, each document alone, macro), `targets` the issue's
ratios, `experts`/`speed`/`memory`/`params` the teacher; `variants` is the side-by-side table: teacher,
student, baseline (PyTorch, fp32) and the ONNX Runtime models (fp32, int8, int4) with bits-per-byte,
top-1, prefill latency and decode tokens/s at batch 1 and 8, peak RSS and file size.
plots/eval_documents.csv: each document's bits per byte for every variant and compressor."""

from __future__ import annotations

from pathlib import Path

import torch

from moeops.cli import UserError, run_main
from moeops.config import load_model_args, load_section
from moeops.evaluate.metrics import documents_table, plot_expert_load, targets
from moeops.evaluate.scoring import compressor_bits, document_bytes, summarize, val_documents
from moeops.evaluate.variants import evaluate_variants
from moeops.io import atomic_write_json, atomic_write_text
from moeops.model.io import verify_checksums
from moeops.model.transformer import param_counts

PREPARED = Path("data/prepared")
MODEL = Path("models/teacher")
VARIANTS = {"teacher": ("torch", MODEL), "student": ("torch", Path("models/student")),
            "baseline": ("torch", Path("models/baseline")), "onnx_fp32": ("onnx", Path("exports/onnx/fp32")),
            "onnx_int8": ("onnx", Path("exports/onnx/int8")), "onnx_int4": ("onnx", Path("exports/onnx/int4"))}
METRICS = Path("metrics/eval.json")
DOCUMENTS = Path("plots/eval_documents.csv")
PLOT = Path("plots/expert_load.png")


def main() -> None:
    p = load_section("evaluate")
    if p.threads:
        torch.set_num_threads(p.threads)
    if not (MODEL / "config.json").is_file():
        raise UserError(f"{MODEL / 'config.json'}: missing; run the pretrain stage")
    # dvc.yaml makes every variant a dependency; a stage run by hand evaluates those that exist.
    present = {name: v for name, v in VARIANTS.items() if v[1].is_dir()}
    for _, path in present.values():  # a damaged or unrecorded variant fails now, not after minutes of work
        verify_checksums(path)
    args = load_model_args(MODEL / "config.json")
    docs = val_documents(PREPARED, p.max_tokens_per_doc)
    compressors = compressor_bits(docs)  # the same texts for every variant
    variants = evaluate_variants(present, docs, p.batch_size, p.stride, p.decode_prompt_len, p.decode_new_tokens,
                                 p.threads, p.speed_tokens)
    scores = {name: v.pop("scores") for name, v in variants.items()}
    teacher = variants["teacher"]
    experts = teacher.pop("experts")
    plot_expert_load(experts.pop("expert_share"), args.first_k_dense_replace, PLOT)
    table = documents_table(docs, scores["teacher"]["tokens"], {name: s["bits"] for name, s in scores.items()},
                            {name: c["bits_D"] for name, c in compressors.items()})
    val = summarize(scores["teacher"], document_bytes(docs))
    result = {
        "val": {k: round(v, 6) if isinstance(v, float) else v for k, v in val.items()}
        | {"max_tokens_per_doc": p.max_tokens_per_doc, "stride": teacher["stride"]},
        "compressors": {name: {k: round(c[k], 6) for k in ("bits_per_byte", "bits_per_byte_separate",
                                                            "bits_per_byte_macro")}
                        for name, c in compressors.items()},
        "targets": targets({name: v["bits_per_byte"] for name, v in variants.items()}
                           | {name: c["bits_per_byte"] for name, c in compressors.items()}),
        "experts": experts,
        "speed": {"inference_tokens_per_s": round(teacher.pop("inference_tokens_per_s"), 1),
                  "threads": teacher["speed"]["threads"]},
        "memory": {"peak_rss_mb": teacher["peak_rss_mb"]},
        "params": param_counts(args),
        "variants": variants,
    }
    atomic_write_text(DOCUMENTS, table.to_csv(index=False))
    atomic_write_json(METRICS, result)
    v, c = result["val"], result["compressors"]
    print(f"evaluate: val bits/byte {v['bits_per_byte']:.4f} (macro {v['bits_per_byte_macro']:.4f}; gzip -9 "
          f"{c['gzip_9']['bits_per_byte']:.4f}, xz -9e {c['xz_9e']['bits_per_byte']:.4f}, PPMd o16 "
          f"{c['ppmd_o16']['bits_per_byte']:.4f}), loss {v['loss']:.4f}, top-1 {v['top1_accuracy']:.3f} on "
          f"{v['tokens']:,} tokens of {v['documents']:,} documents")


if __name__ == "__main__":
    run_main(main)
