"""ONNX Runtime over an exported moeops decoder, torch-free (the server imports this, never torch).

Graph IO (L layers, C kv_lora_rank, R qk_rope_head_dim, V vocab; batch, seq, past dynamic):
  inputs   input_ids [B, S] int64, attention_mask [B, P+S] int64 (0 = left padding),
           past_latent.{i} [B, P, C], past_rope.{i} [B, P, R] float32
  outputs  logits [B, S, V], present_latent.{i} [B, P+S, C], present_rope.{i} [B, P+S, R]
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from moeops.cli import UserError


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask"]
    outputs = ["logits"]
    for i in range(n_layers):
        inputs += [f"past_latent.{i}", f"past_rope.{i}"]
        outputs += [f"present_latent.{i}", f"present_rope.{i}"]
    return inputs, outputs


def ort_errors() -> tuple[type[Exception], ...]:
    """ONNX Runtime's exceptions for a model it cannot load or run (pybind11 classes deriving from
    Exception, not from RuntimeError)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as st

    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
             "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail", "NotFound")
    return tuple(getattr(st, n) for n in names if hasattr(st, n))


def first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


PROVIDERS_ENV = "MOEOPS_ORT_PROVIDERS"


class ProviderError(UserError, ValueError):
    """$MOEOPS_ORT_PROVIDERS names a provider this onnxruntime lacks: a ValueError to callers, one line
    and exit 2 from a stage (a UserError)."""


def _nvidia_gpu() -> bool:
    """Asked only of an onnxruntime-gpu build (nvidia-smi -L, ~50 ms: sessions are few)."""
    from moeops.export.tensorrt import nvidia_gpu  # torch-free; imported here (moeops.export imports this module)

    return nvidia_gpu() is not None


def session_providers() -> list[str]:
    """The execution providers sessions ask for, in order. $MOEOPS_ORT_PROVIDERS (a comma list, e.g.
    "CPUExecutionProvider") when set, each name one that this onnxruntime build offers (else a
    ProviderError, a ValueError naming the variable and the provider); otherwise CUDA then CPU when the
    build has the CUDA EP (onnxruntime-gpu) and an NVIDIA GPU is present (the GPU build lists the CUDA
    EP on any machine); otherwise CPU only, as before."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = os.environ.get(PROVIDERS_ENV, "").strip()
    if wanted:
        names = [p.strip() for p in wanted.split(",") if p.strip()]
        for name in names:
            if name not in available:
                raise ProviderError(f"{PROVIDERS_ENV}: {name!r} is not a provider of this onnxruntime "
                                    f"{ort.__version__} (available: {', '.join(available)})")
        return names
    if "CUDAExecutionProvider" in available and _nvidia_gpu():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(path: str | Path, threads: int = 0):
    """An ONNX Runtime session on `session_providers()` (CPU unless onnxruntime-gpu sees a GPU, or
    $MOEOPS_ORT_PROVIDERS says otherwise); a file that is not a loadable ONNX model (corrupted, truncated,
    another format, an invalid graph) is a one-line UserError naming it."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: missing")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = session_providers()
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except ort_errors() as e:
        raise UserError(f"{path}: not a loadable ONNX model ({type(e).__name__}: {first_line(e)})") from None


class OnnxLM:
    """An exported decoder in ONNX Runtime; `step` is a moeops.model.generate Step."""

    def __init__(self, path: str | Path, threads: int = 0):
        self.path = Path(path)
        self.session = make_session(path, threads)
        shape = {i.name: i.shape for i in self.session.get_inputs()}
        self.n_layers = sum(n.startswith("past_latent.") for n in shape)
        self.input_names, self.output_names = io_names(self.n_layers)
        outputs = {o.name for o in self.session.get_outputs()}
        if not self.n_layers or set(self.input_names) != set(shape) or not set(self.output_names) <= outputs:
            raise UserError(f"{self.path}: not a moeops decoder (inputs {sorted(shape)}; expected input_ids, "
                            "attention_mask, past_latent.<i>, past_rope.<i>)")
        self.latent_dim = shape["past_latent.0"][2]
        self.rope_dim = shape["past_rope.0"][2]

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        out = []
        for _ in range(self.n_layers):
            out += [np.zeros((batch, 0, self.latent_dim), np.float32), np.zeros((batch, 0, self.rope_dim), np.float32)]
        return out

    def step(self, ids_BS: np.ndarray, mask_BT: np.ndarray, past) -> tuple[np.ndarray, list[np.ndarray]]:
        past = self.empty_cache(ids_BS.shape[0]) if past is None else past
        feed = dict(zip(self.input_names, [ids_BS.astype(np.int64), mask_BT.astype(np.int64), *past]))
        try:
            logits, *present = self.session.run(self.output_names, feed)
        except ort_errors() as e:
            raise UserError(f"{self.path}: ONNX Runtime cannot run it ({type(e).__name__}: {first_line(e)})") \
                from None
        return logits, present
