"""DVC stage `export`: models/student + models/quantized → exports/
  onnx/{fp32,int8,int4}/  the decoder with KV cache for ONNX Runtime, from models/quantized after
                          checking each file's sha256 (each copy keeps its lineage.json) and the fp32
                          logits against PyTorch; every variant's parity is measured
  hf/                     a transformers DeepseekV3 checkpoint + tokenizer (AutoModelForCausalLM)
  triton/                 a Triton Inference Server model repository (onnxruntime backend)
  tensorrt/               a TensorRT engine cache (only on a machine with an NVIDIA GPU)
and metrics/export.json. Everything is built in a temp directory and swapped in at the end.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from moeops.cli import UserError, run_main
from moeops.config import load_section
from moeops.export.hf import export_hf
from moeops.export.onnx import OnnxLM
from moeops.export.tensorrt import build_tensorrt
from moeops.export.triton import read_io, write_triton_repo
from moeops.io import atomic_write_json, replace_dir
from moeops.model.io import load_model_dir, verify_checksums
from moeops.model.transformer import Transformer

STUDENT = Path("models/student")
QUANTIZED = Path("models/quantized")
OUT = Path("exports")
METRICS = Path("metrics/export.json")
VARIANTS = ("fp32", "int8", "int4")


class ParityError(UserError):
    exit_code = 1


def parity_lengths(max_seq_len: int, decode_steps: int) -> tuple[int, int]:
    """(prompt length, cached decode steps) of the parity check, sized to the model's context: a student
    distilled at seq_len 16 cannot take a 32-token prompt + 20 steps, so the steps are cut to fit
    (reported in metrics/export.json) rather than the export failing."""
    steps = min(decode_steps, max_seq_len - 1)
    return max(1, min(32, max_seq_len - steps)), steps


@torch.inference_mode()
def measure_parity(model: Transformer, lm: OnnxLM, decode_steps: int, batch: int = 2) -> dict:
    """max |ONNX Runtime − PyTorch fp32| logit: a prefill, then cached decode steps (as many of
    `decode_steps` as the context allows)."""
    a = model.args
    prompt, steps = parity_lengths(a.max_seq_len, decode_steps)
    ids = np.random.default_rng(0).integers(0, a.vocab_size, (batch, prompt + steps))
    full = model(torch.from_numpy(ids)).numpy()
    logits, past = lm.step(ids[:, :prompt], np.ones((batch, prompt), np.int64), None)
    prefill = float(np.abs(logits - full[:, :prompt]).max())
    decode = 0.0
    for t in range(prompt, prompt + steps):
        logits, past = lm.step(ids[:, t:t + 1], np.ones((batch, t + 1), np.int64), past)
        decode = max(decode, float(np.abs(logits[:, 0] - full[:, t]).max()))
    return {"prefill_max_abs_diff": prefill, "decode_max_abs_diff": decode, "max_abs_diff": max(prefill, decode),
            "prompt_len": prompt, "decode_steps": steps}


def check_parity(model: Transformer, onnx_dir: Path, decode_steps: int, atol: float, threads: int) -> dict:
    """Parity of every published variant against the PyTorch student, {onnx_fp32: {...}, onnx_int8: ...}.
    The fp32 graph must match within `atol` (else nothing is written); the quantized ones differ by
    design and are only measured: the gate judges its candidate's own figure."""
    parity = {}
    for variant in VARIANTS:
        parity[f"onnx_{variant}"] = measure_parity(model, OnnxLM(onnx_dir / variant / "model.onnx", threads=threads),
                                                   decode_steps)
    fp32 = parity["onnx_fp32"]
    if fp32["max_abs_diff"] > atol:
        raise ParityError(f"export: ONNX Runtime fp32 logits differ from PyTorch by {fp32['max_abs_diff']:.2e} > "
                          f"export.parity_atol {atol}; nothing written")
    fp32["atol"] = atol
    return parity


def main() -> None:
    p = load_section("export")
    if p.threads:
        torch.set_num_threads(p.threads)
    model = load_model_dir(STUDENT)  # verifies its files against their recorded checksums
    for variant in VARIANTS:
        if not (QUANTIZED / variant / "model.onnx").is_file():
            raise UserError(f"{QUANTIZED / variant / 'model.onnx'}: missing (run the quantize stage)")
        verify_checksums(QUANTIZED / variant)
        read_io(QUANTIZED / variant / "model.onnx")  # an ONNX model, external data inside its directory
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=OUT.parent, prefix=f".{OUT.name}.tmp-"))
    try:
        for variant in VARIANTS:  # the copies carry the quantize stage's lineage.json and its checksums
            shutil.copytree(QUANTIZED / variant, tmp / "onnx" / variant)
            verify_checksums(tmp / "onnx" / variant)
        parity = check_parity(model, tmp / "onnx", p.parity_decode_steps, p.parity_atol, p.threads)
        export_hf(STUDENT, tmp / "hf")
        write_triton_repo(tmp / "onnx" / p.triton_variant / "model.onnx", tmp / "triton", "moeops",
                          p.triton_max_batch_size, p.triton_max_queue_delay_us)
        tensorrt = build_tensorrt(tmp / "onnx" / "fp32" / "model.onnx", tmp / "tensorrt", p.tensorrt)
        replace_dir(tmp, OUT)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sizes = {v: (OUT / "onnx" / v / "model.onnx").stat().st_size for v in VARIANTS}
    atomic_write_json(METRICS, {"parity": parity, "parity_decode_steps": p.parity_decode_steps, "onnx_bytes": sizes,
                                "tensorrt": tensorrt, "triton_variant": p.triton_variant})
    fp32 = parity["onnx_fp32"]
    cut = f" (cut from {p.parity_decode_steps} to fit max_seq_len {model.args.max_seq_len})" \
        if fp32["decode_steps"] < p.parity_decode_steps else ""
    print(f"export: {OUT}/onnx, parity vs PyTorch over a {fp32['prompt_len']}-token prefill + "
          f"{fp32['decode_steps']} decode steps{cut}: "
          + ", ".join(f"{v} {parity[v]['max_abs_diff']:.1e}" for v in parity) + f"; {OUT}/hf, {OUT}/triton")
    if tensorrt["status"] != "built":
        print(f"export: TensorRT {tensorrt['status']}: {tensorrt['reason']}")


if __name__ == "__main__":
    run_main(main)
