"""TensorRT through ONNX Runtime's TensorRT execution provider (GPU only).

The exported model runs under the TensorRT EP with the CUDA EP as fallback: ONNX Runtime hands
TensorRT every subgraph it can compile and runs the rest (the com.microsoft MoE / QMoE nodes,
which have no TensorRT kernel) on CUDA. The compiled engines land in an engine cache directory
that later sessions reuse. On a machine without an NVIDIA GPU, or with an onnxruntime build that
has no TensorRT EP, nothing is built and the result says why; this never raises for that.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from moeops.cli import UserError
from moeops.export.triton import PAST_PREFIX  # the same KV-cache naming as the Triton warm-up
from moeops.io import replace_dir

MODES = ("auto", "off")
PREFILL_SEQ = 32  # prompt length of the timed prefill
TIMED_RUNS = 10


def nvidia_gpu() -> str | None:
    """The first NVIDIA GPU's name, or None. Not torch.cuda: the CPU torch wheel says False on a
    GPU machine, and the GPU is ONNX Runtime's to use here."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        gpus = [line for line in out.stdout.splitlines() if line.startswith("GPU ")]
        return gpus[0] if out.returncode == 0 and gpus else None
    gpus = Path("/proc/driver/nvidia/gpus")  # the driver without its tools (some containers)
    return next((p.name for p in sorted(gpus.iterdir())), None) if gpus.is_dir() else None


def skip_reason(mode: str) -> str | None:
    """Why no engine can be built here, or None when it can."""
    import onnxruntime as ort

    if mode == "off":
        return "mode off (export.tensorrt)"
    if nvidia_gpu() is None:
        return "no NVIDIA GPU"
    providers = ort.get_available_providers()
    if "TensorrtExecutionProvider" not in providers:
        build = "onnxruntime-gpu" if "CUDAExecutionProvider" in providers else "onnxruntime (CPU build)"
        return f"{build} {ort.__version__} without TensorrtExecutionProvider (install onnxruntime-gpu and TensorRT)"
    return None


def prefill_feed(inputs, outputs, seq: int = PREFILL_SEQ, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch-1 prefill for the session's inputs: random token ids (identical tokens would all
    route to the same experts), a mask of ones, an empty cache; dynamic dims -> seq, or 0 for the
    cache's length."""
    logits_dims = next((o.shape for o in outputs if o.name == "logits"), None)
    vocab = logits_dims[-1] if logits_dims and isinstance(logits_dims[-1], int) else 2
    rng = np.random.default_rng(seed)
    dtypes = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
              "tensor(float16)": np.float16, "tensor(bool)": np.bool_}
    feed = {}
    for x in inputs:
        fill = 0 if x.name.startswith(PAST_PREFIX) else seq
        shape = [1 if j == 0 else (d if isinstance(d, int) else fill) for j, d in enumerate(x.shape)]
        dtype = dtypes.get(x.type, np.float32)
        if "mask" in x.name:
            feed[x.name] = np.ones(shape, dtype)
        elif np.issubdtype(dtype, np.integer):
            feed[x.name] = rng.integers(0, vocab, shape).astype(dtype)
        else:
            feed[x.name] = np.zeros(shape, dtype)
    return feed


def trt_session(onnx_path: Path, cache_dir: Path, fp16: bool):
    import onnxruntime as ort

    trt = {"device_id": 0, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
           "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache_dir), "trt_fp16_enable": fp16}
    # enable_fallback=0: ONNX Runtime would otherwise retry on CUDA alone after a TensorRT error and
    # we would time (and report) a CUDA session as a TensorRT one.
    return ort.InferenceSession(str(onnx_path), providers=[("TensorrtExecutionProvider", trt),
                                                           ("CUDAExecutionProvider", {"device_id": 0})],
                                enable_fallback=0)


def time_prefill(session, feed: dict[str, np.ndarray], runs: int = TIMED_RUNS) -> float:
    """Median latency in milliseconds; the first run (the engine build) is not timed."""
    session.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def build_tensorrt(onnx_path: Path, out_dir: Path, mode: str = "auto", fp16: bool = False) -> dict:
    """{"status": "built", "engine_cache": out_dir, "prefill_latency_ms": ..., "gpu": ...},
    {"status": "skipped", "reason": ...} when this machine cannot build (no GPU, no TensorRT EP,
    mode off), or {"status": "failed", "reason": ...} when building on a GPU went wrong. The
    engine cache is written next to out_dir and swapped in only when the build succeeded."""
    if mode not in MODES:
        raise UserError(f"export.tensorrt: {mode!r}: expected one of {list(MODES)}")
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    try:
        reason = skip_reason(mode)
    except Exception as e:  # a broken onnxruntime install is a reason to skip, not to fail the export
        reason = f"cannot query onnxruntime ({type(e).__name__}: {e})"
    if reason:
        return {"status": "skipped", "reason": reason}

    tmp = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
        session = trt_session(onnx_path, tmp, fp16)
        if "TensorrtExecutionProvider" not in session.get_providers():
            raise RuntimeError(f"the TensorRT EP did not load (session providers: {session.get_providers()})")
        latency = time_prefill(session, prefill_feed(session.get_inputs(), session.get_outputs()))
        del session  # flush the engine and timing caches before the directory moves
        replace_dir(tmp, out_dir)
    except Exception as e:  # never raise: the ONNX export stands without an engine
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        return {"status": "failed", "reason": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    return {"status": "built", "engine_cache": str(out_dir), "prefill_latency_ms": round(latency, 3),
            "prefill_tokens": PREFILL_SEQ, "fp16": fp16, "gpu": nvidia_gpu()}
