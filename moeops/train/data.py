"""Token files written by the prepare stage, and deterministic batches from them.

A batch is a pure function of (seed, step, micro-step): resuming at step N reads exactly
the batches an uninterrupted run reads, with no sampler state to save.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from moeops.cli import UserError


def load_meta(prepared_dir: str | Path) -> dict:
    path = Path(prepared_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read ({e}); run the prepare stage first") from None
    splits = meta.get("splits") if isinstance(meta, dict) else None
    fields_ok = isinstance(splits, dict) and all(
        isinstance(splits.get(s), dict) and "n_tokens" in splits[s] for s in ("train", "val"))
    if not (fields_ok and "vocab_size" in meta and "dtype" in meta):
        raise UserError(f"{path}: needs vocab_size, dtype and splits.{{train,val}}.n_tokens; rerun the prepare stage")
    return meta


def load_tokens(prepared_dir: str | Path, split: str) -> np.ndarray:
    meta = load_meta(prepared_dir)
    path = Path(prepared_dir) / f"{split}.bin"
    try:
        tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    if len(tokens) != meta["splits"][split]["n_tokens"]:
        raise UserError(f"{path}: {len(tokens)} tokens, meta.json says {meta['splits'][split]['n_tokens']}")
    return tokens


def get_batch(tokens: np.ndarray, seed: int, step: int, micro: int, batch_size: int,
              seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of seq_len+1 tokens: inputs x_BS and next-token targets y_BS."""
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    windows = np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64)
    w = torch.from_numpy(windows)
    return w[:, :-1], w[:, 1:]
