"""Grouped SwiGLU expert MLP over expert-sorted rows.

Legend: M rows sorted by expert, D model dim, E experts, F expert hidden dim, X = 2F
(fused [gate; up]), T row tiles (each a BLOCK_M slice of one expert's rows).
Weights use transformers' fused DeepseekV3 layout: gate_up_EXD [E, 2F, D], down_EDF [E, D, F].

`grouped_swiglu` is what the model calls. On CUDA with triton importable it runs
`grouped_swiglu_triton` (grouped GEMMs in the ScatterMoE / MegaBlocks way: no padding, no
per-expert launch); elsewhere one matmul pair per expert on its contiguous slice
(torch._grouped_mm has no CPU backward in torch 2.13; for a padded torch.bmm see
`grouped_swiglu`). Empty experts cost nothing on either path.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path needs no triton
    triton = None


def grouped_swiglu(x_MD: torch.Tensor, counts_E: torch.Tensor, gate_up_EXD: torch.Tensor,
                   down_EDF: torch.Tensor) -> torch.Tensor:
    """y_MD: each row through its expert's SwiGLU MLP (rows sorted by expert, counts_E per expert).

    CUDA (fp32 / bf16 / fp16) with triton: `grouped_swiglu_triton`. Elsewhere a loop of F.linear
    pairs over the experts' slices. Against one torch.bmm over rows padded to the busiest expert
    (E=16, D=256, F=128, M=16384 top-4 rows, fwd+bwd, best of 15) the loop was as fast or faster:
    bmm took 1.06x / 1.34x / 1.73x the loop's time on 2 threads (balanced / mild / strong
    imbalance), 1.04x-1.83x on 1 thread. So the loop stays, with its bitwise results and no
    E x busiest-expert padded copies."""
    if x_MD.is_cuda and triton is not None and x_MD.dtype in _TRITON_DTYPES:
        return grouped_swiglu_triton(x_MD, counts_E, gate_up_EXD, down_EDF)
    outs = []
    for e, x_mD in enumerate(torch.split(x_MD, counts_E.tolist())):
        if x_mD.shape[0] == 0:
            continue
        gate_mF, up_mF = F.linear(x_mD, gate_up_EXD[e]).chunk(2, dim=-1)
        outs.append(F.linear(F.silu(gate_mF) * up_mF, down_EDF[e]))
    if not outs:
        return x_MD.new_zeros(0, down_EDF.shape[1])
    return torch.cat(outs)


def grouped_swiglu_reference(x_MD, counts_E, gate_up_EXD, down_EDF):
    """Row by row."""
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts_E)), counts_E.cpu())
    rows = []
    for m in range(x_MD.shape[0]):
        e = int(expert_of_row[m])
        gate, up = (gate_up_EXD[e] @ x_MD[m]).chunk(2)
        rows.append(down_EDF[e] @ (F.silu(gate) * up))
    return torch.stack(rows) if rows else x_MD.new_zeros(0, down_EDF.shape[1])


# ---------------------------------------------------------------------------------------- Triton

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_swiglu_triton(x_MD: torch.Tensor, counts_E: torch.Tensor, gate_up_EXD: torch.Tensor,
                          down_EDF: torch.Tensor) -> torch.Tensor:
    """The Triton path (autograd-aware). Inputs fp32, bf16 or fp16; under autocast all operands
    are cast to the autocast dtype first (as F.linear does), otherwise to their common dtype."""
    if triton is None:
        raise RuntimeError("grouped_swiglu_triton needs triton")
    dev = x_MD.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
    else:
        dtype = torch.promote_types(torch.promote_types(x_MD.dtype, gate_up_EXD.dtype), down_EDF.dtype)
    if dtype not in _TRITON_DTYPES:
        raise TypeError(f"grouped_swiglu_triton: dtype {dtype} (fp32, bf16 or fp16 only)")
    x_MD, gate_up_EXD, down_EDF = x_MD.to(dtype), gate_up_EXD.to(dtype), down_EDF.to(dtype)
    # Keep the pre-activations only when a backward can come (Function.forward runs without grad).
    store_h = torch.is_grad_enabled() and any(t.requires_grad for t in (x_MD, gate_up_EXD, down_EDF))
    with torch.autocast(dev, enabled=False):
        return _GroupedSwiGLU.apply(x_MD, counts_E, gate_up_EXD, down_EDF, store_h)


if triton is not None:
    # Read when the kernels are decorated, like triton itself does.
    _INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    # Rows per tile: the tile table depends on it, so it is fixed (not autotuned). Under the
    # interpreter small blocks make tiny test shapes span several tiles and K steps.
    BLOCK_M = 16 if _INTERPRET else 64
    _ROW_CONFIGS = ([triton.Config({"BLOCK_N": 16, "BLOCK_K": 16})] if _INTERPRET else
                    [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                     for bn, bk, w, s in ((128, 64, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4), (64, 32, 4, 5))])
    # gate_up keeps two accumulators (gate and up): its BLOCK_N is half the others'.
    _GATE_UP_CONFIGS = (_ROW_CONFIGS if _INTERPRET else
                        [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                         for bn, bk, w, s in ((64, 64, 8, 3), (64, 64, 4, 3), (32, 64, 4, 4), (64, 32, 4, 4))])
    _WGRAD_CONFIGS = ([triton.Config({"BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_R": 16})] if _INTERPRET else
                      [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_R": br}, num_warps=w, num_stages=s)
                       for bn, bk, br, w, s in ((128, 128, 32, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3),
                                                (64, 64, 64, 4, 4))])

    # Triton 3.8's interpreter multiplies bf16 tiles' raw bits in tl.dot, so under it the operands
    # go to fp32 first: the same exact products a GPU's bf16 MMA forms, summed in fp32.
    _UPCAST_DOTS = tl.constexpr(_INTERPRET)

    @triton.jit
    def _dot(a, b, acc, PRECISION: tl.constexpr):
        if _UPCAST_DOTS:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=PRECISION)

    # Pointer arithmetic: a 64-bit scalar base per tile (row m0, expert e), 32-bit offsets inside
    # the tile: M * D or E * X * D may pass 2**31, one tile's span does not.

    @triton.autotune(configs=_GATE_UP_CONFIGS, key=["D", "F", "STORE_H"])
    @triton.jit
    def _gate_up_kernel(x_ptr, w_ptr, h_ptr, a_ptr, tile_e_ptr, tile_m0_ptr, tile_m1_ptr, D, F,
                        stride_xm, stride_xd, stride_we, stride_wx, stride_wd, stride_hm, stride_am,
                        STORE_H: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One tile of one expert's rows x one block of F columns: gate and up accumulate side by
        side over D; the epilogue stores h = [gate | up] (when backward needs it) and
        a = silu(gate) * up."""
        tile = tl.program_id(0)
        m0 = tl.load(tile_m0_ptr + tile)
        m1 = tl.load(tile_m1_ptr + tile)
        if m0 >= m1:  # past the last tile (the grid is an upper bound when counts live on the GPU)
            return
        e = tl.load(tile_e_ptr + tile).to(tl.int64)
        rs = tl.arange(0, BLOCK_M)
        row_ok = rs < (m1 - m0).to(tl.int32)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < F
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + m0 * stride_xm + (rs[:, None] * stride_xm + ks[None, :] * stride_xd)
        wg_ptrs = w_ptr + e * stride_we + (cols[None, :] * stride_wx + ks[:, None] * stride_wd)  # [BK, BN]
        wu_ptrs = wg_ptrs + F * stride_wx
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k_ok = ks < D - k0
            x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & col_ok[None, :]
            acc_g = _dot(x, tl.load(wg_ptrs, mask=w_mask, other=0.0), acc_g, PRECISION)
            acc_u = _dot(x, tl.load(wu_ptrs, mask=w_mask, other=0.0), acc_u, PRECISION)
            x_ptrs += BLOCK_K * stride_xd
            wg_ptrs += BLOCK_K * stride_wd
            wu_ptrs += BLOCK_K * stride_wd
        # Round gate/up to the I/O dtype first: backward recomputes a from the stored h, and this
        # keeps the two a's identical (and matches F.linear's rounded outputs).
        gate = acc_g.to(a_ptr.dtype.element_ty)
        up = acc_u.to(a_ptr.dtype.element_ty)
        mask = row_ok[:, None] & col_ok[None, :]
        if STORE_H:
            h_ptrs = h_ptr + m0 * stride_hm + (rs[:, None] * stride_hm + cols[None, :])
            tl.store(h_ptrs, gate, mask=mask)
            tl.store(h_ptrs + F, up, mask=mask)
        g = gate.to(tl.float32)
        a = g * tl.sigmoid(g) * up.to(tl.float32)
        a_ptrs = a_ptr + m0 * stride_am + (rs[:, None] * stride_am + cols[None, :])
        tl.store(a_ptrs, a.to(a_ptr.dtype.element_ty), mask=mask)

    @triton.autotune(configs=_ROW_CONFIGS, key=["N", "K", "SWIGLU_BWD"])
    @triton.jit
    def _grouped_mm_kernel(a_ptr, w_ptr, out_ptr, h_ptr, act_ptr, tile_e_ptr, tile_m0_ptr, tile_m1_ptr, N, K,
                           stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_om, stride_hm,
                           stride_actm, SWIGLU_BWD: tl.constexpr, PRECISION: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[m, n] = sum_k a[m, k] * w[e(m), n, k] for one row tile x one block of N (the
        weight's orientation is in its strides). With SWIGLU_BWD, out is d(act) and the epilogue
        turns it into dh = [dgate | dup] (stored in out_ptr, width 2N) and recomputes
        act = silu(gate) * up from h (stored in act_ptr) for the down-projection's weight grad."""
        tile = tl.program_id(0)
        m0 = tl.load(tile_m0_ptr + tile)
        m1 = tl.load(tile_m1_ptr + tile)
        if m0 >= m1:
            return
        e = tl.load(tile_e_ptr + tile).to(tl.int64)
        rs = tl.arange(0, BLOCK_M)
        row_ok = rs < (m1 - m0).to(tl.int32)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + m0 * stride_am + (rs[:, None] * stride_am + ks[None, :] * stride_ak)
        w_ptrs = w_ptr + e * stride_we + (cols[None, :] * stride_wn + ks[:, None] * stride_wk)  # [BK, BN]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = ks < K - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _dot(a, w, acc, PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk
        mask = row_ok[:, None] & col_ok[None, :]
        out_ptrs = out_ptr + m0 * stride_om + (rs[:, None] * stride_om + cols[None, :])
        dtype = out_ptr.dtype.element_ty
        if SWIGLU_BWD:
            h_ptrs = h_ptr + m0 * stride_hm + (rs[:, None] * stride_hm + cols[None, :])
            g = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(h_ptrs + N, mask=mask, other=0.0).to(tl.float32)
            da = acc.to(dtype).to(tl.float32)  # rounded like F.linear's grad before silu's backward
            sig = tl.sigmoid(g)
            silu = g * sig
            tl.store(out_ptrs, (da * u * sig * (1.0 + g * (1.0 - sig))).to(dtype), mask=mask)
            tl.store(out_ptrs + N, (da * silu).to(dtype), mask=mask)
            act_ptrs = act_ptr + m0 * stride_actm + (rs[:, None] * stride_actm + cols[None, :])
            tl.store(act_ptrs, (silu * u).to(dtype), mask=mask)
        else:
            tl.store(out_ptrs, acc.to(dtype), mask=mask)

    @triton.autotune(configs=_WGRAD_CONFIGS, key=["N", "K"])
    @triton.jit
    def _grouped_wgrad_kernel(g_ptr, a_ptr, dw_ptr, offs_ptr, N, K, stride_gm, stride_gn, stride_am, stride_ak,
                              stride_de, stride_dn, stride_dk, PRECISION: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        """dw[e, n, k] = sum over expert e's rows m of g[m, n] * a[m, k]. Each program owns one
        (N, K) tile of one expert's weight and walks that expert's rows in order: no atomics, the
        same bits every run. An expert with no rows gets zeros."""
        e = tl.program_id(0).to(tl.int64)
        r0 = tl.load(offs_ptr + e)
        n_rows = (tl.load(offs_ptr + e + 1) - r0).to(tl.int32)
        ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
        n_ok = ns < N
        k_ok = ks < K
        rs = tl.arange(0, BLOCK_R)
        g_ptrs = g_ptr + r0 * stride_gm + (rs[None, :] * stride_gm + ns[:, None] * stride_gn)  # [BN, BR]
        a_ptrs = a_ptr + r0 * stride_am + (rs[:, None] * stride_am + ks[None, :] * stride_ak)  # [BR, BK]
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for i in range(0, n_rows, BLOCK_R):
            r_ok = rs < n_rows - i
            g_t = tl.load(g_ptrs, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            a = tl.load(a_ptrs, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            acc = _dot(g_t, a, acc, PRECISION)
            g_ptrs += BLOCK_R * stride_gm
            a_ptrs += BLOCK_R * stride_am
        dw_ptrs = dw_ptr + e * stride_de + (ns[:, None] * stride_dn + ks[None, :] * stride_dk)
        tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


def _precision() -> str:
    """fp32 dots as torch would do them: TF32 only when torch allows it for matmuls."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _tile_table(counts_E: torch.Tensor, M: int, device: torch.device, exact: bool | None = None):
    """(tile_e_T, tile_m0_T, tile_m1_T, offs_E1): tile t covers rows [m0, m1) of expert e, at most
    BLOCK_M of them, so no tile straddles two experts and an empty expert has no tile. offs_E1
    (E + 1 entries) are the experts' first rows. Built with tensor ops on the counts' device: with
    counts on the GPU no host sync, the grid is the bound M // BLOCK_M + min(E, M) and the spare
    tiles are empty (m0 == m1). `exact` (default: counts not on the GPU) reads the tile count."""
    if exact is None:
        exact = not counts_E.is_cuda
    counts_E = counts_E.to(device=device, dtype=torch.int64)
    E = counts_E.numel()
    offs_E1 = torch.zeros(E + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts_E, 0, out=offs_E1[1:])
    offs_E1.clamp_(max=M)  # counts on the GPU go unchecked (a check would sync): never read past x
    tiles_E = (counts_E + BLOCK_M - 1) // BLOCK_M
    tile_end_E = torch.cumsum(tiles_E, 0)
    n_tiles = (int(tile_end_E[-1]) if E else 0) if exact else M // BLOCK_M + min(E, M)
    t_T = torch.arange(n_tiles, dtype=torch.int64, device=device)
    e_T = torch.searchsorted(tile_end_E, t_T, right=True).clamp_(max=max(E - 1, 0))
    m0_T = offs_E1[e_T] + (t_T - (tile_end_E[e_T] - tiles_E[e_T])) * BLOCK_M
    m1_T = offs_E1[e_T + 1]
    m0_T = torch.where(t_T < tile_end_E[-1], m0_T, m1_T) if E else m0_T  # spare tiles: empty
    return e_T.to(torch.int32), m0_T, m1_T, offs_E1


def _row_grid(n_tiles: int, n: int):
    return lambda meta: (n_tiles, triton.cdiv(n, meta["BLOCK_N"]))


def _wgrad(g_MN: torch.Tensor, a_MK: torch.Tensor, offs_E1: torch.Tensor, dw_ENK: torch.Tensor) -> torch.Tensor:
    E, N, K = dw_ENK.shape
    grid = lambda meta: (E, triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(K, meta["BLOCK_K"]))  # noqa: E731
    _grouped_wgrad_kernel[grid](g_MN, a_MK, dw_ENK, offs_E1, N, K, g_MN.stride(0), g_MN.stride(1),
                                a_MK.stride(0), a_MK.stride(1), *dw_ENK.stride(), PRECISION=_precision())
    return dw_ENK


class _GroupedSwiGLU(torch.autograd.Function):
    """Forward: h_MX = x_MD @ gate_up[e]^T with SwiGLU in the epilogue (a_MF), then
    y_MD = a_MF @ down[e]^T. Saved for backward: x_MD and the pre-activations h_MX = [gate | up]
    (not a_MF: backward recomputes it from h in the same kernel that forms dh).
    Backward: da = dy @ down[e] with the SwiGLU backward fused (dh_MX, and a_MF recomputed),
    dx = dh @ gate_up[e], d(down)[e] = dy_e^T a_e and d(gate_up)[e] = dh_e^T x_e per expert.
    Accumulation in fp32; no atomics, so results are bitwise deterministic."""

    @staticmethod
    def forward(ctx, x_MD, counts_E, gate_up_EXD, down_EDF, store_h):
        x_MD = x_MD.contiguous()
        M, D = x_MD.shape
        E, X, _ = gate_up_EXD.shape
        F_ = X // 2
        if not counts_E.is_cuda and int(counts_E.sum()) != M:
            raise ValueError(f"grouped_swiglu: counts sum to {int(counts_E.sum())}, x has {M} rows")
        tile_e, tile_m0, tile_m1, offs_E1 = _tile_table(counts_E, M, x_MD.device)
        n_tiles = tile_e.numel()
        h_MX = x_MD.new_empty(M, X) if store_h else None
        a_MF = x_MD.new_empty(M, F_)
        y_MD = x_MD.new_empty(M, D)
        if n_tiles:
            _gate_up_kernel[_row_grid(n_tiles, F_)](
                x_MD, gate_up_EXD, h_MX if store_h else a_MF, a_MF, tile_e, tile_m0, tile_m1, D, F_,
                x_MD.stride(0), x_MD.stride(1), *gate_up_EXD.stride(), X if store_h else 0, a_MF.stride(0),
                STORE_H=store_h, PRECISION=_precision(), BLOCK_M=BLOCK_M)
            _grouped_mm_kernel[_row_grid(n_tiles, D)](
                a_MF, down_EDF, y_MD, y_MD, y_MD, tile_e, tile_m0, tile_m1, D, F_,
                a_MF.stride(0), a_MF.stride(1), *down_EDF.stride(), y_MD.stride(0), 0, 0,
                SWIGLU_BWD=False, PRECISION=_precision(), BLOCK_M=BLOCK_M)
        ctx.save_for_backward(x_MD, h_MX, gate_up_EXD, down_EDF, tile_e, tile_m0, tile_m1, offs_E1)
        return y_MD

    @staticmethod
    def backward(ctx, dy_MD):
        x_MD, h_MX, gate_up_EXD, down_EDF, tile_e, tile_m0, tile_m1, offs_E1 = ctx.saved_tensors
        dy_MD = dy_MD.contiguous().to(x_MD.dtype)
        M, D = x_MD.shape
        X = h_MX.shape[1]
        F_ = X // 2
        n_tiles = tile_e.numel()
        prec = _precision()
        dh_MX = x_MD.new_empty(M, X)
        a_MF = x_MD.new_empty(M, F_)
        if n_tiles:  # da = dy @ down[e] (down read as [e, f, d]) -> dh, a
            _grouped_mm_kernel[_row_grid(n_tiles, F_)](
                dy_MD, down_EDF, dh_MX, h_MX, a_MF, tile_e, tile_m0, tile_m1, F_, D,
                dy_MD.stride(0), dy_MD.stride(1), down_EDF.stride(0), down_EDF.stride(2), down_EDF.stride(1),
                dh_MX.stride(0), h_MX.stride(0), a_MF.stride(0), SWIGLU_BWD=True, PRECISION=prec, BLOCK_M=BLOCK_M)
        dx_MD = d_gate_up = d_down = None
        if ctx.needs_input_grad[0]:
            dx_MD = x_MD.new_empty(M, D)
            if n_tiles:  # dx = dh @ gate_up[e] (gate_up read as [e, d, x])
                _grouped_mm_kernel[_row_grid(n_tiles, D)](
                    dh_MX, gate_up_EXD, dx_MD, dx_MD, dx_MD, tile_e, tile_m0, tile_m1, D, X,
                    dh_MX.stride(0), dh_MX.stride(1), gate_up_EXD.stride(0), gate_up_EXD.stride(2),
                    gate_up_EXD.stride(1), dx_MD.stride(0), 0, 0, SWIGLU_BWD=False, PRECISION=prec,
                    BLOCK_M=BLOCK_M)
        if ctx.needs_input_grad[2]:
            d_gate_up = _wgrad(dh_MX, x_MD, offs_E1, torch.empty_like(gate_up_EXD))
        if ctx.needs_input_grad[3]:
            d_down = _wgrad(dy_MD, a_MF, offs_E1, torch.empty_like(down_EDF))
        return dx_MD, None, d_gate_up, d_down, None
