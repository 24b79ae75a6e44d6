"""Token permutation for dropless (or capacity-limited) expert dispatch.

Legend: T tokens, D model dim, E routed experts, K top-k, N = T*K token copies, M kept copies.

`permute` sorts the T*K (token, expert) pairs by expert so each expert reads one
contiguous slice; `unpermute` puts the expert outputs back in token order and sums the
K copies of each token with its routing weights. No Python loop over tokens.

Both directions of both ops are gathers: `order_M` (sorted row -> flat token*K + k) reads token
rows into expert order, and its inverse `inverse_N` (flat token*K + k -> sorted row, -1 when the
copy was dropped) reads expert rows back into token order. So forward and backward need no
scatter-add (index_put with accumulate is slow on CPU and needs atomics on GPU) and every result
is bitwise deterministic. On CUDA the gathers are Triton kernels; elsewhere torch.index_select.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install runs without Triton
    triton = None


def sort_by_expert(topk_ids_TK: torch.Tensor, n_experts: int, capacity: int = 0):
    """Returns (order_M, counts_E, n_dropped): the flat token*K + k index of each sorted row,
    the rows per expert and how many copies the capacity dropped (the latest tokens first)."""
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
    return order_N, counts_E, n_dropped


def inverse_order(order_M: torch.Tensor, n_copies: int) -> torch.Tensor:
    """inverse_N[order_M[m]] = m; -1 for copies the capacity dropped."""
    inverse_N = torch.full((n_copies,), -1, dtype=order_M.dtype, device=order_M.device)
    # scatter_, not inverse_N[order_M] = ...: index_put is ~300x slower on CPU; indices are unique.
    return inverse_N.scatter_(0, order_M, torch.arange(order_M.numel(), dtype=order_M.dtype, device=order_M.device))


def permute(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, n_experts: int, capacity: int = 0):
    """Returns (x_MD, counts_E, order_M, n_dropped).

    order_M[i] is the flat (token*K + k) index of sorted row i. With capacity > 0 each expert keeps
    at most `capacity` rows, the earliest tokens first (rows past it are dropped: they add nothing).
    """
    if x_TD.is_cuda and triton is not None:
        return permute_triton(x_TD, topk_ids_TK, n_experts, capacity)
    K = topk_ids_TK.shape[1]
    order_M, counts_E, n_dropped = sort_by_expert(topk_ids_TK, n_experts, capacity)
    x_MD = _Permute.apply(x_TD, order_M, inverse_order(order_M, topk_ids_TK.numel()), K)
    return x_MD, counts_E, order_M, n_dropped


def unpermute(y_MD: torch.Tensor, order_M: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
    """Weighted sum of each token's expert outputs, back in token order: out_TD."""
    if y_MD.is_cuda and triton is not None:
        return unpermute_triton(y_MD, order_M, topk_weights_TK)
    T, K = topk_weights_TK.shape
    return _Unpermute.apply(y_MD, topk_weights_TK.to(y_MD.dtype), order_M, inverse_order(order_M, T * K))


def _gather_copies(y_MD: torch.Tensor, inverse_N: torch.Tensor, K: int) -> torch.Tensor:
    """y_TKD[t, k] = y_MD[inverse_N[t*K + k]], zero for a dropped copy (inverse -1)."""
    T = inverse_N.numel() // K
    if y_MD.shape[0] == inverse_N.numel():  # dropless: inverse_N is a permutation (shapes only, no sync)
        return y_MD.index_select(0, inverse_N).view(T, K, -1)
    y_TKD = y_MD.index_select(0, inverse_N.clamp(min=0)).view(T, K, -1)
    return y_TKD.masked_fill((inverse_N < 0).view(T, K, 1), 0)


class _Permute(torch.autograd.Function):
    """x_MD = x_TD[order_M // K]; its gradient sums each token's K rows, read back through the
    inverse permutation (a gather, k in order), not a scatter-add."""

    @staticmethod
    def forward(ctx, x_TD, order_M, inverse_N, K: int):
        ctx.save_for_backward(inverse_N)
        ctx.K = K
        return x_TD.index_select(0, order_M // K)

    @staticmethod
    def backward(ctx, grad_MD):
        (inverse_N,) = ctx.saved_tensors
        return _gather_copies(grad_MD, inverse_N, ctx.K).sum(1), None, None, None


class _Unpermute(torch.autograd.Function):
    """out_TD[t] = sum over k of w_TK[t, k] * y_MD[inverse_N[t*K + k]] (dropped copies add 0)."""

    @staticmethod
    def forward(ctx, y_MD, w_TK, order_M, inverse_N):
        ctx.save_for_backward(y_MD, w_TK, order_M, inverse_N)
        # [T, 1, K] @ [T, K, D]: one BLAS call, faster on CPU than (y_TKD * w_TK[..., None]).sum(1)
        return torch.bmm(w_TK[:, None, :], _gather_copies(y_MD, inverse_N, w_TK.shape[1])).squeeze(1)

    @staticmethod
    def backward(ctx, grad_TD):
        y_MD, w_TK, order_M, inverse_N = ctx.saved_tensors
        K = w_TK.shape[1]
        grad_MD = grad_TD.index_select(0, order_M // K)  # each sorted row's token gradient
        grad_y = grad_MD * w_TK.reshape(-1).index_select(0, order_M)[:, None] if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            dot_M = (grad_MD * y_MD).sum(-1, keepdim=True)  # in sorted order; to token order by the inverse
            grad_w = _gather_copies(dot_M, inverse_N, K).view_as(w_TK)
        return grad_y, grad_w, None, None


def permute_reference(x_TD, topk_ids_TK, n_experts: int):
    """Dropless, expert by expert then token by token: (x_MD, counts_E, order_M)."""
    T, K = topk_ids_TK.shape
    rows, order, counts = [], [], []
    for e in range(n_experts):
        n_rows = 0
        for t in range(T):
            for k in range(K):
                if int(topk_ids_TK[t, k]) == e:
                    rows.append(x_TD[t])
                    order.append(t * K + k)
                    n_rows += 1
        counts.append(n_rows)
    return torch.stack(rows), torch.tensor(counts), torch.tensor(order)


def unpermute_reference(y_MD, order_M, topk_weights_TK):
    """Row by row: out[token] += weight * row."""
    T, K = topk_weights_TK.shape
    out = [y_MD.new_zeros(y_MD.shape[1]) for _ in range(T)]
    for m in range(y_MD.shape[0]):
        t, k = divmod(int(order_M[m]), K)
        out[t] = out[t] + topk_weights_TK[t, k].to(y_MD.dtype) * y_MD[m]
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# Triton: the same gathers as kernels. Order and counts come from torch (argsort, bincount); the
# kernels move the rows. inverse_N = -1 marks a dropped copy (capacity), which reads as zero.

def permute_triton(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, n_experts: int, capacity: int = 0):
    """`permute` with Triton gathers forward and backward (any capacity)."""
    K = topk_ids_TK.shape[1]
    order_M, counts_E, n_dropped = sort_by_expert(topk_ids_TK, n_experts, capacity)
    x_MD = _PermuteTriton.apply(x_TD, order_M, inverse_order(order_M, topk_ids_TK.numel()), K)
    return x_MD, counts_E, order_M, n_dropped


def unpermute_triton(y_MD: torch.Tensor, order_M: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
    """`unpermute` with Triton kernels forward and backward (any capacity)."""
    T, K = topk_weights_TK.shape
    w_TK = topk_weights_TK.to(y_MD.dtype)
    return _UnpermuteTriton.apply(y_MD, w_TK, order_M, inverse_order(order_M, T * K))


def _blocks(D: int) -> tuple[int, int]:
    BLOCK_D = min(triton.next_power_of_2(max(D, 16)), 128)
    return 16, BLOCK_D  # rows per program, columns per program


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


class _PermuteTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, order_M, inverse_N, K: int):
        ctx.save_for_backward(inverse_N)
        ctx.K = K
        x_TD = x_TD.contiguous()
        M, D = order_M.numel(), x_TD.shape[1]
        x_MD = x_TD.new_empty(M, D)
        if M and D:
            BLOCK_M, BLOCK_D = _blocks(D)
            grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(D, BLOCK_D))
            _gather_rows_kernel[grid](x_TD, order_M, x_MD, M, D, K, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D)
        return x_MD

    @staticmethod
    def backward(ctx, grad_MD):
        (inverse_N,) = ctx.saved_tensors
        return _combine(grad_MD, inverse_N, None, ctx.K), None, None, None


class _UnpermuteTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_MD, w_TK, order_M, inverse_N):
        ctx.save_for_backward(y_MD, w_TK, order_M)
        return _combine(y_MD, inverse_N, w_TK, w_TK.shape[1])

    @staticmethod
    def backward(ctx, grad_TD):
        y_MD, w_TK, order_M = ctx.saved_tensors
        grad_TD, y_MD, w_TK = grad_TD.contiguous(), y_MD.contiguous(), w_TK.contiguous()
        M, D = y_MD.shape
        grad_y_MD = torch.empty_like(y_MD)
        grad_w_TK = torch.zeros_like(w_TK)  # a dropped copy keeps weight gradient 0
        if M and D:
            BLOCK_M, BLOCK_D = _blocks(D)
            _unpermute_bwd_kernel[(triton.cdiv(M, BLOCK_M),)](
                grad_TD, y_MD, w_TK, order_M, grad_y_MD, grad_w_TK, M, D, w_TK.shape[1],
                ACC=_acc_dtype(y_MD.dtype), BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D)
        return grad_y_MD, grad_w_TK, None, None


def _combine(y_MD: torch.Tensor, inverse_N: torch.Tensor, w_TK: torch.Tensor | None, K: int) -> torch.Tensor:
    """out_TD[t] = sum_k w_TK[t, k] * y_MD[inverse_N[t*K + k]] (w = 1 when None; dropped copies add 0)."""
    y_MD = y_MD.contiguous()
    T, D = inverse_N.numel() // K, y_MD.shape[1]
    out_TD = y_MD.new_empty(T, D)
    if T and D:
        BLOCK_T, BLOCK_D = _blocks(D)
        grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(D, BLOCK_D))
        has_w = w_TK is not None
        w_TK = w_TK.contiguous() if has_w else y_MD  # any pointer when unweighted: never read
        _combine_kernel[grid](y_MD, inverse_N, w_TK, out_TD, T, D, K=K, HAS_W=has_w,
                              ACC=_acc_dtype(y_MD.dtype), BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D)
    return out_TD


if triton is not None:

    @triton.jit
    def _gather_rows_kernel(x_ptr, order_ptr, out_ptr, M, D, K, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[m, :] = x[order[m] // K, :]"""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        row_ok = rows < M
        mask = row_ok[:, None] & (cols[None, :] < D)
        src = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64) // K
        vals = tl.load(x_ptr + src[:, None] * D + cols[None, :], mask=mask)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], vals, mask=mask)

    @triton.jit
    def _combine_kernel(y_ptr, inverse_ptr, w_ptr, out_ptr, T, D, K: tl.constexpr, HAS_W: tl.constexpr,
                        ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[t, :] = sum over k of w[t, k] * y[inverse[t*K + k], :], k in order; no atomics."""
        toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        tok_ok = toks < T
        col_ok = cols[None, :] < D
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=ACC)
        for k in tl.static_range(K):
            n = toks.to(tl.int64) * K + k
            src = tl.load(inverse_ptr + n, mask=tok_ok, other=-1).to(tl.int64)
            kept = src >= 0
            y = tl.load(y_ptr + src[:, None] * D + cols[None, :], mask=kept[:, None] & col_ok, other=0.0)
            if HAS_W:
                w = tl.load(w_ptr + n, mask=tok_ok & kept, other=0.0)
                y = y * w[:, None]  # rounded in the input dtype, as torch's y * w
            acc += y.to(ACC)
        tl.store(out_ptr + toks.to(tl.int64)[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=tok_ok[:, None] & col_ok)

    @triton.jit
    def _unpermute_bwd_kernel(grad_ptr, y_ptr, w_ptr, order_ptr, grad_y_ptr, grad_w_ptr, M, D, K,
                              ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """grad_y[m] = grad[token(m)] * w[order[m]];  grad_w[order[m]] = dot(grad[token(m)], y[m]).
        Each grad_w entry is written by exactly one row: no atomics."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        n = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        tok = n // K
        w = tl.load(w_ptr + n, mask=row_ok, other=0.0)
        dot = tl.zeros([BLOCK_M], dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (cols[None, :] < D)
            g = tl.load(grad_ptr + tok[:, None] * D + cols[None, :], mask=mask, other=0.0)
            y = tl.load(y_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=mask, other=0.0)
            tl.store(grad_y_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], g * w[:, None], mask=mask)
            dot += tl.sum(g.to(ACC) * y.to(ACC), axis=1)
        tl.store(grad_w_ptr + n, dot.to(grad_w_ptr.dtype.element_ty), mask=row_ok)
