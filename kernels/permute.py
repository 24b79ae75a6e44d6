"""Token permutation for dropless (or capacity-limited) expert dispatch.

Legend: T tokens, D model dim, E routed experts, K top-k, N = T*K token copies, M kept copies.

`permute` sorts the T*K (token, expert) pairs by expert so each expert reads one
contiguous slice; `unpermute` puts the expert outputs back in token order and sums the
K copies of each token with its routing weights. No Python loop over tokens.
"""

from __future__ import annotations

import torch


def permute(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, n_experts: int, capacity: int = 0):
    """Returns (x_MD, counts_E, order_M, n_dropped).

    order_M[i] is the flat (token*K + k) index of sorted row i. With capacity > 0 each expert keeps
    at most `capacity` rows, the earliest tokens first (rows past it are dropped: they add nothing).
    """
    K = topk_ids_TK.shape[1]
    flat_ids_N = topk_ids_TK.reshape(-1)
    order_N = torch.argsort(flat_ids_N, stable=True)  # stable: earlier tokens first within an expert
    counts_E = torch.bincount(flat_ids_N, minlength=n_experts)
    n_dropped = 0
    if capacity > 0:
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        rank_N = torch.arange(order_N.numel(), device=order_N.device) - starts_E[flat_ids_N[order_N]]
        keep_N = rank_N < capacity
        n_dropped = int((~keep_N).sum())
        order_N = order_N[keep_N]
        counts_E = counts_E.clamp(max=capacity)
    return x_TD[order_N // K], counts_E, order_N, n_dropped


def unpermute(y_MD: torch.Tensor, order_M: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's expert outputs, back in token order: out_TD."""
    T, K = topk_weights_TK.shape
    w_M = topk_weights_TK.reshape(-1)[order_M].to(y_MD.dtype)
    if order_M.numel() == T * K:
        # Dropless: invert the permutation with a gather (deterministic, no atomics).
        inverse_N = torch.empty_like(order_M)
        inverse_N[order_M] = torch.arange(order_M.numel(), device=order_M.device)
        y_NKD = (y_MD * w_M[:, None])[inverse_N].view(T, K, -1)
        return y_NKD.sum(1)
    out_TD = y_MD.new_zeros(T, y_MD.shape[1])
    return out_TD.index_add(0, order_M // K, y_MD * w_M[:, None])
