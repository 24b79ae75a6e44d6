"""DVC stage `quantize`: models/student → models/quantized/{fp32,int8,int4}/ (model.onnx, config.json,
tokenizer.json, lineage.json with every file's sha256) and metrics/quantize.json (sizes, ratios to the
fp32 ONNX, op census).

ONNX Runtime quantizes ONNX graphs, so the student is first exported to fp32 ONNX
(moeops.export.onnx.export_onnx; the export stage checks it against PyTorch and publishes it) and
each variant is quantized from it (moeops.compress.quantize). The int4 block size is checked against
the student's weights before the export, and both variants are written into a temporary directory
swapped in with one rename: a failure leaves the previous models/quantized untouched.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from moeops.cli import run_main
from moeops.compress.quantize import check_block_size, quantize_int4, quantize_int8
from moeops.config import load_section
from moeops.export.onnx import export_onnx
from moeops.io import atomic_write_json, replace_dir, sha256_file
from moeops.lineage import lineage
from moeops.model.io import load_model_dir

STUDENT = Path("models/student")
OUT = Path("models/quantized")
METRICS = Path("metrics/quantize.json")
# the ops that carry quantized weights (+ MatMul: what stayed fp32), reported per variant
REPORTED_OPS = ("QMoE", "MatMulNBits", "MatMulInteger", "GatherBlockQuantized", "MatMul", "MoE", "Gather")


def describe(variant_dir: Path, model_dir: Path, record: dict) -> None:
    """config.json and tokenizer.json from the student; lineage.json with the sha256 of every file of the
    variant (model.onnx, any external data, config.json, tokenizer.json), which the export stage and the
    gate verify."""
    for name in ("config.json", "tokenizer.json"):
        shutil.copyfile(model_dir / name, variant_dir / name)
    checksums = {f.name: sha256_file(f) for f in sorted(variant_dir.iterdir())
                 if f.is_file() and f.name != "lineage.json"}
    atomic_write_json(variant_dir / "lineage.json", record | {"checksums": checksums})


def quantize_model_dir(model_dir: Path, out_dir: Path, block_size: int, accuracy_level: int, params: dict) -> dict:
    """model_dir (a moeops model directory) → out_dir/{int8,int4}/; returns the metrics."""
    model = load_model_dir(model_dir)
    check_block_size({n: tuple(t.shape) for n, t in model.named_parameters()}, block_size)  # before the export
    inputs = [model_dir / n for n in ("model.safetensors", "config.json", "tokenizer.json")]
    record = lineage(inputs, params, "quantize")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        fp32 = tmp / "fp32" / "model.onnx"
        fp32.parent.mkdir()
        t = time.perf_counter()
        export_onnx(model, fp32)
        describe(tmp / "fp32", model_dir, record | {"variant": "fp32"})
        print(f"quantize: exported fp32 ONNX ({fp32.stat().st_size / 1e6:.2f} MB, {time.perf_counter() - t:.1f}s)")
        metrics = {"fp32_bytes": fp32.stat().st_size, "int4_block_size": block_size,
                   "int4_accuracy_level": accuracy_level}
        for variant, fn in (("int8", lambda s, d: quantize_int8(s, d)),
                            ("int4", lambda s, d: quantize_int4(s, d, block_size, accuracy_level))):
            t = time.perf_counter()
            summary = fn(fp32, tmp / variant / "model.onnx")
            describe(tmp / variant, model_dir, record | {"variant": variant})
            metrics[variant] = {"bytes": summary["bytes"], "size_ratio": round(summary["size_ratio"], 4),
                                "qmoe_bits": summary["qmoe_bits"],
                                "ops": {op: summary["ops"][op] for op in REPORTED_OPS if op in summary["ops"]}}
            print(f"quantize: {variant} {summary['bytes'] / 1e6:.2f} MB ({summary['size_ratio']:.1%} of fp32, "
                  f"{time.perf_counter() - t:.1f}s)")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return metrics


def main() -> None:
    p = load_section("quantize")
    if p.threads:
        torch.set_num_threads(p.threads)
    metrics = quantize_model_dir(STUDENT, OUT, p.int4_block_size, p.int4_accuracy_level, p.model_dump())
    atomic_write_json(METRICS, metrics)
    print(f"quantize: {OUT}/fp32, {OUT}/int8 and {OUT}/int4 written")


if __name__ == "__main__":
    run_main(main)
