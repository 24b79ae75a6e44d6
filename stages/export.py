"""DVC stage `export`: models/student + models/quantized → exports/
  onnx/{fp32,int8,int4}/  the decoder with KV cache for ONNX Runtime, from models/quantized after
                          checking each file's sha256 and the fp32 logits against PyTorch
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
from moeops.export.triton import write_triton_repo
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


@torch.inference_mode()
def check_parity(model: Transformer, lm: OnnxLM, decode_steps: int, atol: float, batch: int = 2) -> dict:
    """ONNX Runtime vs PyTorch fp32 logits: a prefill, then `decode_steps` cached steps."""
    a = model.args
    prompt = max(1, min(32, a.max_seq_len - decode_steps))
    ids = np.random.default_rng(0).integers(0, a.vocab_size, (batch, prompt + decode_steps))
    full = model(torch.from_numpy(ids)).numpy()
    logits, past = lm.step(ids[:, :prompt], np.ones((batch, prompt), np.int64), None)
    prefill = float(np.abs(logits - full[:, :prompt]).max())
    decode = 0.0
    for t in range(prompt, prompt + decode_steps):
        logits, past = lm.step(ids[:, t:t + 1], np.ones((batch, t + 1), np.int64), past)
        decode = max(decode, float(np.abs(logits[:, 0] - full[:, t]).max()))
    if max(prefill, decode) > atol:
        raise ParityError(f"export: ONNX Runtime logits differ from PyTorch by {max(prefill, decode):.2e} > "
                          f"export.parity_atol {atol}; nothing written")
    return {"prefill_max_abs_diff": prefill, "decode_max_abs_diff": decode, "decode_steps": decode_steps,
            "atol": atol}


def main() -> None:
    p = load_section("export")
    if p.threads:
        torch.set_num_threads(p.threads)
    model = load_model_dir(STUDENT)  # verifies model.safetensors against its recorded checksum
    for variant in VARIANTS:
        if not (QUANTIZED / variant / "model.onnx").is_file():
            raise UserError(f"{QUANTIZED / variant / 'model.onnx'}: missing (run the quantize stage)")
        verify_checksums(QUANTIZED / variant)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=OUT.parent, prefix=f".{OUT.name}.tmp-"))
    try:
        for variant in VARIANTS:
            shutil.copytree(QUANTIZED / variant, tmp / "onnx" / variant)
        parity = check_parity(model, OnnxLM(tmp / "onnx" / "fp32" / "model.onnx", threads=p.threads),
                              p.parity_decode_steps, p.parity_atol)
        export_hf(STUDENT, tmp / "hf")
        write_triton_repo(tmp / "onnx" / p.triton_variant / "model.onnx", tmp / "triton", "moeops",
                          p.triton_max_batch_size, p.triton_max_queue_delay_us)
        tensorrt = build_tensorrt(tmp / "onnx" / "fp32" / "model.onnx", tmp / "tensorrt", p.tensorrt)
        replace_dir(tmp, OUT)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sizes = {v: (OUT / "onnx" / v / "model.onnx").stat().st_size for v in VARIANTS}
    atomic_write_json(METRICS, {"parity": parity, "onnx_bytes": sizes, "tensorrt": tensorrt,
                                "triton_variant": p.triton_variant})
    print(f"export: {OUT}/onnx (fp32 parity prefill {parity['prefill_max_abs_diff']:.1e}, "
          f"{p.parity_decode_steps} decode steps {parity['decode_max_abs_diff']:.1e}), {OUT}/hf, {OUT}/triton")
    if tensorrt["status"] != "built":
        print(f"export: TensorRT {tensorrt['status']}: {tensorrt['reason']}")


if __name__ == "__main__":
    run_main(main)
