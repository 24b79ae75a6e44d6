"""Evaluation of a model directory on the val split: loss, perplexity, bits-per-byte, top-1
accuracy, expert load, dropped tokens, inference speed, memory; plus gzip -9 and xz -9e on
exactly the bytes the model was scored on, as reference points."""

from __future__ import annotations

import gzip
import json
import lzma
import math
import resource
import shutil
import subprocess
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from moeops.cli import UserError
from moeops.model.transformer import (
    Transformer,
    expert_loads,
    max_violation,
    param_counts,
    reset_expert_stats,
)


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of the GPT-2 byte-level alphabet used by tokenizers' ByteLevel pre-tokenizer."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer_path: str | Path) -> list[bytes]:
    """The raw bytes of every token id (special tokens: b"")."""
    try:
        spec = json.loads(Path(tokenizer_path).read_text())
        specials = {t["id"] for t in spec.get("added_tokens", [])}
        vocab = spec["model"]["vocab"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{tokenizer_path}: not a byte-level BPE tokenizer.json ({e})") from None
    table = [b""] * (max(vocab.values()) + 1)
    u2b = _unicode_to_byte()
    for tok, i in vocab.items():
        if i not in specials:
            table[i] = bytes(u2b[c] for c in tok)
    return table


def compressed_bits_per_byte(data: bytes) -> dict[str, float]:
    """gzip -9 and xz -9e (the command-line tools when present, else the same presets in Python)."""
    out = {}
    for name, argv, fallback in (
        ("gzip_9", ["gzip", "-9", "-c", "-n"], lambda d: gzip.compress(d, 9, mtime=0)),
        ("xz_9e", ["xz", "-9e", "-c"], lambda d: lzma.compress(d, preset=9 | lzma.PRESET_EXTREME)),
    ):
        if shutil.which(argv[0]):
            size = len(subprocess.run(argv, input=data, capture_output=True, check=True).stdout)
        else:
            size = len(fallback(data))
        out[name] = 8 * size / max(1, len(data))
    return out


def byte_lengths(table: list[bytes], vocab_size: int) -> np.ndarray:
    return np.array([len(b) for b in table] + [0] * max(0, vocab_size - len(table)), dtype=np.int64)


def score_windows(logits_fn, tokens: np.ndarray, byte_len: np.ndarray, seq_len: int, batch_size: int,
                  max_tokens: int) -> dict:
    """Non-overlapping windows of seq_len+1 tokens; every target token is scored once.
    `logits_fn(x_BS int64 array) -> logits_BSV` is any model: PyTorch or ONNX Runtime."""
    if len(tokens) < 2:
        raise UserError(f"val split has {len(tokens)} tokens; at least 2 are needed to score")
    seq_len = min(seq_len, len(tokens) - 1)
    n_windows = max(1, min((len(tokens) - 1) // seq_len, math.ceil(max_tokens / seq_len)))
    starts = np.arange(n_windows) * seq_len
    nats, correct, count, n_bytes = 0.0, 0, 0, 0
    targets_seen = []
    for i in tqdm(range(0, n_windows, batch_size), desc="eval", unit="batch", mininterval=1.0):
        w = np.stack([tokens[s:s + seq_len + 1] for s in starts[i:i + batch_size]]).astype(np.int64)
        x_BS, y_BS = w[:, :-1], torch.from_numpy(w[:, 1:])
        logits_BSV = torch.as_tensor(logits_fn(x_BS)).float()
        nats += float(F.cross_entropy(logits_BSV.flatten(0, 1), y_BS.flatten(), reduction="sum"))
        correct += int((logits_BSV.argmax(-1) == y_BS).sum())
        count += y_BS.numel()
        n_bytes += int(byte_len[w[:, 1:]].sum())
        targets_seen.append(w[:, 1:].reshape(-1))
    loss = nats / count
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": nats / math.log(2) / max(1, n_bytes),
        "top1_accuracy": correct / count,
        "tokens": count,
        "bytes": n_bytes,
        "targets": np.concatenate(targets_seen),
    }


@torch.no_grad()
def score(model: Transformer, tokens: np.ndarray, byte_len: np.ndarray, seq_len: int, batch_size: int,
          max_tokens: int) -> dict:
    """score_windows of a PyTorch model, plus its expert load on the val split."""
    reset_expert_stats(model)
    out = score_windows(lambda x_BS: model(torch.from_numpy(x_BS)), tokens, byte_len, seq_len, batch_size, max_tokens)
    loads = expert_loads(model)
    routed = sum(float(load.sum()) for load in loads)
    dropped = sum(m.dropped_tokens for m in model.moe_layers())
    return out | {
        "expert_share": [(load / load.sum()).tolist() if load.sum() > 0 else [] for load in loads],
        "maxvio": [max_violation(load) for load in loads],
        "dropped_fraction": dropped / routed if routed else 0.0,
    }


@torch.no_grad()
def inference_speed(model: Transformer, vocab_size: int, seq_len: int, batch_size: int, n_tokens: int,
                    repeats: int = 3) -> float:
    """Forward (prefill) tokens/s on about n_tokens random tokens (whole sequences of seq_len):
    median of `repeats` timed runs after a warm-up."""
    batch = max(1, n_tokens // seq_len)
    x_BS = torch.randint(0, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    model(x_BS)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(x_BS)
        times.append(time.perf_counter() - t)
    return x_BS.numel() / sorted(times)[len(times) // 2]


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from
    the parent across fork + exec, so a freshly spawned worker would report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def evaluate_model(model: Transformer, val_tokens: np.ndarray, tokenizer_path: Path, batch_size: int,
                   max_tokens: int, speed_tokens: int) -> dict:
    table = token_bytes(tokenizer_path)
    byte_len = byte_lengths(table, model.args.vocab_size)
    seq_len = model.args.max_seq_len
    s = score(model, val_tokens, byte_len, seq_len, batch_size, max_tokens)
    val_bytes = b"".join(table[t] for t in s.pop("targets").tolist())
    ref = compressed_bits_per_byte(val_bytes)
    counts = param_counts(model.args)
    return {
        "val": {k: round(s[k], 6) for k in ("loss", "perplexity", "bits_per_byte", "top1_accuracy")}
        | {"tokens": s["tokens"], "bytes": s["bytes"]},
        "reference_bits_per_byte": {k: round(v, 6) for k, v in ref.items()},
        "experts": {"maxvio_per_layer": [round(v, 4) for v in s["maxvio"]],
                    "dropped_fraction": round(s["dropped_fraction"], 6)},
        "speed": {"inference_tokens_per_s": round(inference_speed(model, model.args.vocab_size, seq_len,
                                                                  batch_size, speed_tokens), 1),
                  "threads": torch.get_num_threads()},
        "memory": {"peak_rss_mb": round(peak_rss_mb(), 1)},
        "params": counts,
        "expert_share": s["expert_share"],
    }


def plot_expert_load(expert_share: list[list[float]], first_moe_layer: int, path: Path) -> None:
    """Heat map of each MoE layer's share of routed tokens per expert (uniform = 1/E)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    shares = np.array(expert_share) if expert_share and expert_share[0] else np.zeros((1, 1))
    fig, ax = plt.subplots(figsize=(max(4, shares.shape[1] * 0.4), 1 + shares.shape[0] * 0.5))
    im = ax.imshow(shares * shares.shape[1], cmap="viridis", aspect="auto")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(shares.shape[0]), [str(first_moe_layer + i) for i in range(shares.shape[0])])
    ax.set_title("routed-token share × n_experts (1 = uniform)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
