"""Every variant of the model on the same val documents (moeops/evaluate/scoring.py: each capped, in
strided windows of the variant's own context) and the same timing protocol: PyTorch model directories
(teacher, student, baseline) and ONNX Runtime models (fp32, int8, int4).

Each variant is measured in a fresh process so that its peak RSS is its own; the teacher is scored once,
in its process, which also reports its expert load and prefill speed.
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
from moeops.evaluate.metrics import expert_stats, inference_speed, peak_rss_mb, unpadded_logits
from moeops.evaluate.scoring import Document, LogitsFn, document_bytes, score_documents, summarize
from moeops.io import sha256_file
from moeops.model.generate import Step, torch_step
from moeops.model.transformer import Transformer, param_counts, reset_expert_stats


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


def _load(kind: str, path: Path) -> tuple[Step, LogitsFn, Transformer | None]:
    """(step, full-sequence logits function, the PyTorch model or None) of one variant, its files checked
    against the sha256 its lineage.json recorded."""
    from moeops.model.io import load_model_dir, verify_checksums

    if kind == "onnx":
        from moeops.export.onnx import OnnxLM

        verify_checksums(path)
        lm = OnnxLM(path / "model.onnx", threads=torch.get_num_threads())
        return lm.step, lambda x_BS: lm.step(x_BS, np.ones_like(x_BS), None)[0], None
    model = load_model_dir(path)
    return torch_step(model), unpadded_logits(model), model


def decode_lengths(max_seq_len: int, prompt_len: int, new_tokens: int) -> tuple[int, int]:
    """(prompt, new tokens) of the speed protocol, cut to fit the model's context (a student distilled
    at a short seq_len) instead of overrunning it."""
    new_tokens = max(1, min(new_tokens, max_seq_len - 1))
    return max(1, min(prompt_len, max_seq_len - new_tokens)), new_tokens


def evaluate_variant(kind: str, path: Path, docs: list[Document], batch_size: int, stride: int, prompt_len: int,
                     new_tokens: int, threads: int, speed_tokens: int = 0) -> dict:
    """One variant's figures and its raw per-document `scores` (score_documents). speed_tokens > 0 (the
    teacher): also the PyTorch model's expert load on these documents and its prefill tokens/s."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.manual_seed(0)
    args = load_model_args(path / "config.json")
    weights = path / ("model.onnx" if kind == "onnx" else "model.safetensors")
    sha256 = sha256_file(weights) if weights.is_file() else None  # before loading: the bytes then timed
    step, logits, model = _load(kind, path)
    if model is not None:
        reset_expert_stats(model)
    scores = score_documents(logits, path / "tokenizer.json", docs, args.max_seq_len, stride, batch_size)
    extra = {}
    if speed_tokens and model is not None:
        extra = {"experts": expert_stats(model),
                 "inference_tokens_per_s": inference_speed(model, args.vocab_size, args.max_seq_len, batch_size,
                                                           speed_tokens)}
    prompt_len, new_tokens = decode_lengths(args.max_seq_len, prompt_len, new_tokens)
    speed = {f"batch{b}": decode_speed(step, args.vocab_size, b, prompt_len, new_tokens) for b in (1, 8)}
    return {
        "runtime": "onnxruntime" if kind == "onnx" else "pytorch",
        "stride": min(stride, args.max_seq_len),  # the stride this model's context allows
        "speed": speed | {"prompt_len": prompt_len, "new_tokens": new_tokens, "threads": torch.get_num_threads()},
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "file_bytes": weights.stat().st_size,
        "model_sha256": sha256,  # the very file timed: the gate refuses a stale figure
        "params_total": param_counts(args)["total"],
        "scores": scores,
    } | extra


def quality(scores: dict[str, np.ndarray], bytes_D: np.ndarray) -> dict:
    """A variant's figures in eval.json from its per-document scores, unrounded: the gate scores its
    candidate the same way and must find the same bits-per-byte to the last digit."""
    s = summarize(scores, bytes_D)
    return {k: s[k] for k in ("bits_per_byte", "bits_per_byte_macro", "loss", "top1_accuracy", "context_mean",
                              "tokens")}


def evaluate_variants(variants: dict[str, tuple[str, Path]], docs: list[Document], batch_size: int, stride: int,
                      prompt_len: int, new_tokens: int, threads: int, speed_tokens: int) -> dict[str, dict]:
    """{name: (kind "torch"|"onnx", directory)} → {name: metrics + its raw `scores`}, one fresh process per
    variant, every one on the same documents; the teacher's process also measures expert load and
    prefill speed (speed_tokens)."""
    ctx = multiprocessing.get_context("spawn")
    bytes_D = document_bytes(docs)
    out = {}
    for name, (kind, path) in variants.items():
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            r = pool.submit(evaluate_variant, kind, path, docs, batch_size, stride, prompt_len, new_tokens, threads,
                            speed_tokens if name == "teacher" else 0).result()
        out[name] = quality(r["scores"], bytes_D) | r
        print(f"evaluate: {name:<10} {out[name]['bits_per_byte']:.4f} bits/byte "
              f"(macro {out[name]['bits_per_byte_macro']:.4f}), "
              f"decode {out[name]['speed']['batch1']['decode_tokens_per_s']:,.0f} tok/s (batch 1)")
    return out
