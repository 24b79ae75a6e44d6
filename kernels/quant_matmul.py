"""Dequantizing matmul of the quantized experts: y = x @ dequant(q)^T, forward only (inference).

Legend: M rows of x, K input features, N output features, B = K*bits/8 code bytes per row,
E experts, b block size along K.

Storage contract (moeops/compress/quantize.py, `quantize_symmetric` / `dequantize_symmetric`,
ONNX Runtime's QMoE): uint8 codes q_NB with an implicit zero point 2^(bits-1); 4 bits pack two
codes a byte, low nibble first (code k is byte k//2, nibble k%2). Scales are fp32 [N] per channel
(block_size 0, the 8-bit experts) or [N, K/b] block-wise along K (the 4-bit experts):
w[n, k] = (code[n, k] - 2^(bits-1)) * scale[n, k // b].

`dequant_matmul` (what callers use): the Triton kernel on CUDA, else PyTorch (dequantize the
weight once, then one matmul). `dequant_matmul_triton`: one kernel that loads code tiles, unpacks
nibbles, subtracts the zero point (exact small integers, in x's dtype) and accumulates tl.dot in
fp32, applying the per-block scale to each K tile's partial product (per-channel: once at the end);
no dequantized weight is ever written to memory. `grouped_dequant_matmul[_triton]`: the same over
expert-sorted rows (x_MK sorted by expert, counts_E rows each, codes q_ENB): programs own a tile
of one expert's rows, built on device from counts_E (no host sync, no per-expert launch), as in a
grouped GEMM; empty experts get no tiles. x may be fp32 (exact fp32 dots, not TF32), fp16 or
bf16 (bf16 only compiled: the Triton interpreter's tl.dot does not handle bf16, triton#11584).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the module works without triton; the Triton path is then absent
    triton = None


# ----------------------------------------------------------------- PyTorch


def dequantize(q_NB: torch.Tensor, scale: torch.Tensor, bits: int, block_size: int = 0,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes [..., N, B] + scales [..., N] or [..., N, K/b] -> weight [..., N, K] in `dtype`."""
    _check(q_NB, scale, bits, block_size)
    q = q_NB.to(torch.int16)
    if bits == 4:
        q = torch.stack([q & 0xF, q >> 4], dim=-1).flatten(-2)
    w = (q - (1 << (bits - 1))).float()
    *lead, n, k = w.shape
    if block_size:
        w = (w.view(*lead, n, k // block_size, block_size) * scale.float()[..., None]).view(*lead, n, k)
    else:
        w = w * scale.float()[..., None]
    return w.to(dtype)


def dequant_matmul(x_MK: torch.Tensor, q_NB: torch.Tensor, scale: torch.Tensor, bits: int,
                   block_size: int = 0) -> torch.Tensor:
    """y [..., N] = x [..., K] @ dequant(q_NB, scale)^T in x's dtype. Triton on CUDA, else PyTorch."""
    if x_MK.is_cuda and triton is not None:
        return dequant_matmul_triton(x_MK, q_NB, scale, bits, block_size)
    return F.linear(x_MK, dequantize(q_NB, scale, bits, block_size, x_MK.dtype))


def grouped_dequant_matmul(x_MK: torch.Tensor, counts_E: torch.Tensor, q_ENB: torch.Tensor, scale: torch.Tensor,
                           bits: int, block_size: int = 0) -> torch.Tensor:
    """Rows of x_MK sorted by expert (counts_E rows each) through their expert's quantized weight:
    y_MN. Triton on CUDA, else one dequantize + matmul per non-empty expert."""
    if x_MK.is_cuda and triton is not None:
        return grouped_dequant_matmul_triton(x_MK, counts_E, q_ENB, scale, bits, block_size)
    outs = []
    for e, x_mK in enumerate(torch.split(x_MK, counts_E.tolist())):
        if x_mK.shape[0]:
            outs.append(F.linear(x_mK, dequantize(q_ENB[e], scale[e], bits, block_size, x_MK.dtype)))
    if not outs:
        return x_MK.new_zeros(0, q_ENB.shape[1])
    return torch.cat(outs)


def dequant_matmul_reference(x_MK, q_NB, scale, bits, block_size=0):
    """Through the quantizer's own numpy inverse (`dequantize_symmetric`), then x @ w^T."""
    from moeops.compress.quantize import dequantize_symmetric  # onnx-heavy import: only when asked

    w_NK = dequantize_symmetric(q_NB.cpu().numpy(), scale.float().cpu().numpy(), bits, block_size)
    return F.linear(x_MK, torch.from_numpy(w_NK).to(x_MK.device, x_MK.dtype))


def grouped_dequant_matmul_reference(x_MK, counts_E, q_ENB, scale, bits, block_size=0):
    """Row by row: each row through its expert's dequantized weight."""
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts_E)), counts_E.cpu())
    rows = [dequant_matmul_reference(x_MK[m:m + 1], q_ENB[e], scale[e], bits, block_size)[0]
            for m, e in enumerate(expert_of_row.tolist())]
    return torch.stack(rows) if rows else x_MK.new_zeros(0, q_ENB.shape[1])


def _check(q: torch.Tensor, scale: torch.Tensor, bits: int, block_size: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"dequant_matmul: bits must be 4 or 8, got {bits}")
    if q.dtype != torch.uint8:
        raise ValueError(f"dequant_matmul: codes must be uint8, got {q.dtype}")
    k = q.shape[-1] * 8 // bits
    if block_size:
        if block_size < 16 or block_size & (block_size - 1) or k % block_size:
            raise ValueError(f"dequant_matmul: block_size {block_size} must be a power of two >= 16 dividing K={k}")
        want = (*q.shape[:-1], k // block_size)
    else:
        want = tuple(q.shape[:-1])
    if tuple(scale.shape) != want:
        raise ValueError(f"dequant_matmul: scales {tuple(scale.shape)} do not fit codes {tuple(q.shape)} "
                         f"(bits {bits}, block_size {block_size}): expected {want}")


# ----------------------------------------------------------------- Triton

if triton is not None:

    @triton.jit
    def _dequant_matmul_kernel(x_ptr, q_ptr, s_ptr, y_ptr, tiles_ptr, N, K,
                               stride_xm, stride_qe, stride_qn, stride_se, stride_sn, stride_ym,
                               BITS: tl.constexpr, ZERO: tl.constexpr, SCALE_BLOCK: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               PRECISION: tl.constexpr):
        """Program (t, j): rows [start, end) of tile t (all of expert e), columns j*BLOCK_N... .
        SCALE_BLOCK 0: per-channel scales, applied once to the accumulator; else one scale per
        SCALE_BLOCK codes along K (a multiple of BLOCK_K), applied to each tile's partial dot."""
        t = tl.program_id(0)
        e = tl.load(tiles_ptr + 3 * t).to(tl.int64)
        start = tl.load(tiles_ptr + 3 * t + 1)
        end = tl.load(tiles_ptr + 3 * t + 2)
        if start >= end:  # a padding tile of the device-built table
            return
        offs_m = start + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < end
        n_mask = offs_n < N
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm                     # [BM, 1]
        q_cols = q_ptr + e * stride_qe + offs_n.to(tl.int64)[None, :] * stride_qn     # [1, BN]
        s_cols = s_ptr + e * stride_se + offs_n.to(tl.int64) * stride_sn              # [BN]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            wmask = k_mask[:, None] & n_mask[None, :]
            if BITS == 4:
                byte = tl.load(q_cols + (offs_k // 2)[:, None], mask=wmask, other=0).to(tl.int32)
                code = (byte >> ((offs_k % 2) * 4)[:, None]) & 0xF
            else:
                code = tl.load(q_cols + offs_k[:, None], mask=wmask, other=0).to(tl.int32)
            w = (code - ZERO).to(x.dtype)  # [BK, BN], exact: |w| <= 128
            part = tl.dot(x, w, input_precision=PRECISION)
            if SCALE_BLOCK > 0:
                s = tl.load(s_cols + k0 // SCALE_BLOCK, mask=n_mask, other=0.0).to(tl.float32)
                acc += part * s[None, :]
            else:
                acc += part
        if SCALE_BLOCK == 0:
            acc = acc * tl.load(s_cols, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _tile_table(counts_E: torch.Tensor, M: int, block_m: int) -> torch.Tensor:
    """[T, 3] int32 (expert, row start, row end) of BLOCK_M row tiles that never straddle experts,
    built on device; T = cdiv(M, block_m) + E bounds the real count, the rest are empty tiles."""
    counts = counts_E.to(torch.int64)
    E = len(counts)
    tiles_E = (counts + block_m - 1) // block_m
    tile_end_E = tiles_E.cumsum(0)
    row_end_E = counts.cumsum(0)
    p = torch.arange((M + block_m - 1) // block_m + E, device=counts.device)
    e = torch.searchsorted(tile_end_E, p, right=True)
    real = e < E
    e = e.clamp(max=E - 1)
    local = p - (tile_end_E[e] - tiles_E[e])
    start = row_end_E[e] - counts[e] + local * block_m
    end = torch.minimum(start + block_m, row_end_E[e])
    start, end = torch.where(real, start, 0), torch.where(real, end, 0)
    return torch.stack([e, start, end], dim=1).to(torch.int32).contiguous()


def _launch(x_MK: torch.Tensor, counts_E: torch.Tensor, q_ENB: torch.Tensor, scale: torch.Tensor, bits: int,
            block_size: int) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("dequant_matmul_triton needs triton")
    _check(q_ENB, scale, bits, block_size)
    E, N, B = q_ENB.shape
    K = B * 8 // bits
    M = x_MK.shape[0]
    if x_MK.shape[1] != K:
        raise ValueError(f"dequant_matmul: x has K={x_MK.shape[1]}, the codes hold K={K}")
    x_MK = x_MK.contiguous()
    q_ENB, scale = q_ENB.contiguous(), scale.contiguous()
    y_MN = torch.empty(M, N, dtype=x_MK.dtype, device=x_MK.device)
    if M == 0 or N == 0:
        return y_MN
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    block_n = 64 if N > 32 else 32
    block_k = min(block_size, 64) if block_size else 64  # block-wise: K tiles never straddle a scale block
    tiles = _tile_table(counts_E.to(x_MK.device), M, block_m)
    grid = (tiles.shape[0], triton.cdiv(N, block_n))
    _dequant_matmul_kernel[grid](
        x_MK, q_ENB, scale, y_MN, tiles, N, K,
        x_MK.stride(0), q_ENB.stride(0), q_ENB.stride(1), scale.stride(0), scale.stride(1), y_MN.stride(0),
        BITS=bits, ZERO=1 << (bits - 1), SCALE_BLOCK=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, PRECISION="ieee" if x_MK.dtype == torch.float32 else "tf32")
    return y_MN


def dequant_matmul_triton(x_MK: torch.Tensor, q_NB: torch.Tensor, scale: torch.Tensor, bits: int,
                          block_size: int = 0) -> torch.Tensor:
    """`dequant_matmul` through the Triton kernel (CPU tensors run it under TRITON_INTERPRET=1).
    fp32 x uses exact fp32 dots (input_precision ieee), not TF32."""
    lead = x_MK.shape[:-1]
    x2 = x_MK.reshape(-1, x_MK.shape[-1])
    counts = torch.tensor([x2.shape[0]], device=x_MK.device)
    y = _launch(x2, counts, q_NB[None], scale[None], bits, block_size)
    return y.reshape(*lead, q_NB.shape[0])


def grouped_dequant_matmul_triton(x_MK: torch.Tensor, counts_E: torch.Tensor, q_ENB: torch.Tensor,
                                  scale: torch.Tensor, bits: int, block_size: int = 0) -> torch.Tensor:
    """`grouped_dequant_matmul` through the Triton kernel; counts_E must sum to M."""
    return _launch(x_MK, counts_E, q_ENB, scale, bits, block_size)
