"""Every variant of the model on the same val windows and the same timing protocol: PyTorch model
directories (teacher, student, baseline) and ONNX Runtime models (fp32, int8, int4).

Each variant is measured in a fresh process so that its peak RSS is its own.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from moeops.config import load_model_args
from moeops.evaluate.metrics import byte_lengths, peak_rss_mb, score_windows, token_bytes
from moeops.io import sha256_file
from moeops.model.generate import Step, torch_step
from moeops.model.transformer import param_counts
from moeops.train.data import load_tokens


def decode_speed(step: Step, vocab_size: int, batch: int, prompt_len: int, new_tokens: int,
                 repeats: int = 3) -> dict:
    """Prefill latency of a [batch, prompt_len] prompt, decode tokens/s over new_tokens cached
    steps (greedy feeding of random tokens costs the same): medians of `repeats` after a warm-up;
    and the 95th percentile of one decode step's latency over all those steps."""
    rng = np.random.default_rng(0)
    prompt_BS = rng.integers(0, vocab_size, (batch, prompt_len))
    next_B1 = rng.integers(0, vocab_size, (batch, 1))
    prefill, decode, steps = [], [], []
    for r in range(repeats + 1):
        mask_BT = np.ones((batch, prompt_len), np.int64)
        t0 = time.perf_counter()
        _, past = step(prompt_BS, mask_BT, None)
        t1 = time.perf_counter()
        step_times = []
        for _ in range(new_tokens):
            mask_BT = np.ones((batch, mask_BT.shape[1] + 1), np.int64)
            s0 = time.perf_counter()
            _, past = step(next_B1, mask_BT, past)
            step_times.append(time.perf_counter() - s0)
        t2 = time.perf_counter()
        if r:  # the first round warms up
            prefill.append(t1 - t0)
            decode.append(t2 - t1)
            steps += step_times
    return {"prefill_ms": round(1000 * float(np.median(prefill)), 2),
            "decode_tokens_per_s": round(batch * new_tokens / float(np.median(decode)), 1),
            "decode_step_p95_ms": round(1000 * float(np.percentile(steps, 95)), 3)}


def _load(kind: str, path: Path) -> tuple[Step, object, Path]:
    """(step, full-sequence logits function, weights file) of one variant, its files checked against
    the sha256 its lineage.json recorded."""
    from moeops.model.io import load_model_dir, verify_checksums

    if kind == "onnx":
        from moeops.export.onnx import OnnxLM

        verify_checksums(path)
        lm = OnnxLM(path / "model.onnx", threads=torch.get_num_threads())
        full = lambda x_BS: lm.step(x_BS, np.ones_like(x_BS), None)[0]  # noqa: E731
        return lm.step, full, path / "model.onnx"
    model = load_model_dir(path)

    @torch.inference_mode()
    def full(x_BS):
        return model(torch.from_numpy(x_BS))

    return torch_step(model), full, path / "model.safetensors"


def decode_lengths(max_seq_len: int, prompt_len: int, new_tokens: int) -> tuple[int, int]:
    """(prompt, new tokens) of the speed protocol, cut to fit the model's context (a student distilled
    at a short seq_len) instead of overrunning it."""
    new_tokens = max(1, min(new_tokens, max_seq_len - 1))
    return max(1, min(prompt_len, max_seq_len - new_tokens)), new_tokens


def evaluate_variant(kind: str, path: Path, prepared_dir: Path, batch_size: int, max_tokens: int, prompt_len: int,
                     new_tokens: int, threads: int) -> dict:
    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.manual_seed(0)
    args = load_model_args(path / "config.json")
    weights = path / ("model.onnx" if kind == "onnx" else "model.safetensors")
    sha256 = sha256_file(weights) if weights.is_file() else None  # before loading: the bytes then timed
    step, full, weights = _load(kind, path)
    val = load_tokens(prepared_dir, "val")
    s = score_windows(full, val, byte_lengths(token_bytes(path / "tokenizer.json"), args.vocab_size),
                      args.max_seq_len, batch_size, max_tokens)
    prompt_len, new_tokens = decode_lengths(args.max_seq_len, prompt_len, new_tokens)
    speed = {f"batch{b}": decode_speed(step, args.vocab_size, b, prompt_len, new_tokens) for b in (1, 8)}
    return {
        "runtime": "onnxruntime" if kind == "onnx" else "pytorch",
        "bits_per_byte": round(s["bits_per_byte"], 6),
        "loss": round(s["loss"], 6),
        "top1_accuracy": round(s["top1_accuracy"], 6),
        "tokens": s["tokens"],
        "speed": speed | {"prompt_len": prompt_len, "new_tokens": new_tokens, "threads": torch.get_num_threads()},
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "file_bytes": weights.stat().st_size,
        "model_sha256": sha256,  # the very file timed: the gate refuses a stale figure
        "params_total": param_counts(args)["total"],
    }


def evaluate_variants(variants: dict[str, tuple[str, Path]], prepared_dir: Path, batch_size: int, max_tokens: int,
                      prompt_len: int, new_tokens: int, threads: int) -> dict[str, dict]:
    """{name: (kind "torch"|"onnx", directory)} → {name: metrics}, one fresh process per variant."""
    ctx = multiprocessing.get_context("spawn")
    out = {}
    for name, (kind, path) in variants.items():
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            out[name] = pool.submit(evaluate_variant, kind, path, prepared_dir, batch_size, max_tokens, prompt_len,
                                    new_tokens, threads).result()
        print(f"evaluate: {name:<10} {out[name]['bits_per_byte']:.4f} bits/byte, "
              f"decode {out[name]['speed']['batch1']['decode_tokens_per_s']:,.0f} tok/s (batch 1)")
    return out
