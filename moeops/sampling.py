"""Token sampling on numpy logits, torch-free (shared by moeops.model.generate and the server's engine)."""

from __future__ import annotations

import numpy as np


def sample_next(logits_BV: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> np.ndarray:
    """Greedy when temperature is 0; otherwise sample from the smallest set of tokens whose
    probability reaches top_p (always at least the most likely one). The draw is among the kept
    tokens in token-id order, not probability order: batching moves logits by ~1e-6, which can swap
    two near-equal tokens in the probability order and so change which token the same random draw
    lands on; in id order a seeded request samples the same tokens alone or batched."""
    if temperature <= 0:
        return logits_BV.argmax(-1)
    z_BV = logits_BV.astype(np.float64) / temperature
    probs_BV = np.exp(z_BV - z_BV.max(-1, keepdims=True))
    probs_BV /= probs_BV.sum(-1, keepdims=True)
    out = np.empty(len(probs_BV), dtype=np.int64)
    for b, probs_V in enumerate(probs_BV):
        order_V = np.argsort(-probs_V, kind="stable")
        cum_V = np.cumsum(probs_V[order_V])
        keep = int(np.searchsorted(cum_V, top_p)) + 1  # tokens up to the one that reaches top_p
        kept = np.sort(order_V[:keep])
        out[b] = rng.choice(kept, p=probs_V[kept] / probs_V[kept].sum())
    return out


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    S = max(len(p) for p in prompts)
    ids_BS = np.full((len(prompts), S), pad_id, dtype=np.int64)
    mask_BS = np.zeros((len(prompts), S), dtype=np.int64)
    for b, p in enumerate(prompts):
        ids_BS[b, S - len(p):] = p
        mask_BS[b, S - len(p):] = 1
    return ids_BS, mask_BS
