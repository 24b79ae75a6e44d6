"""Fused linear + cross-entropy: the lm_head matmul and the token loss without the [N, V] logits.

Legend: N tokens (rows), D model dim, V vocabulary, c rows of one chunk.

`loss = F.cross_entropy(F.linear(h_ND, weight_VD).float(), target_N)` materializes fp32 logits
[N, V] and, in backward, a gradient of the same size: at N=4096, V=8192 that is 2 x 128 MB of
memory traffic per step. Liger-Kernel's FusedLinearCrossEntropy walks N in chunks instead; per
chunk it computes logits_cV = h_cD @ W^T, the loss, and at once the logits' gradient
g_cV = softmax - onehot, overwriting the logits in place, then grad_h_cD = s_c * (g_cV @ W) and
grad_W += g_cV^T @ (s_c * h_cD), with s_c = 1/n_valid (0 on ignored rows) applied on the [c, D]
side rather than over the [c, V] chunk. Forward thus does all the work; backward only scales the
saved grads by grad_output (the loss is a scalar). Peak extra memory: one [c, V] fp32 buffer
reused by every chunk, plus grad_W.

Precision: the logits, logsumexp, loss and g are fp32. The matmuls run in the compute dtype: the
autocast dtype when autocast is on for h's device (as F.linear would), else h's dtype; grad_W is
accumulated in fp32 over chunks and returned in W's dtype, grad_h in h's dtype.

Deterministic: chunks are visited in a fixed order and nothing uses atomics (CPU and the Triton
path alike; cuBLAS matmuls are deterministic at fixed shapes).

Targets equal to `ignore_index` contribute neither loss nor gradient; the loss is the mean over
the others (nan when there are none, like F.cross_entropy; the grads are then zero).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the module works without triton; the Triton path is then absent
    triton = None

# Measured fwd+bwd at N=4096, D=256, V=8192 (the small flavor's lm_head + loss), fp32, 2 threads,
# AMD EPYC (AVX2), min of 7, two runs: unfused 758 / 870 ms; fused with chunks of 256..4096 rows
# 539-646 / 564-613 ms, flat from 256 to 2048, 1024 the best of the second run (1.54x).
DEFAULT_CHUNK_SIZE = 1024


def linear_cross_entropy_reference(h_ND: torch.Tensor, weight_VD: torch.Tensor, target_N: torch.Tensor,
                                   ignore_index: int = -100) -> torch.Tensor:
    """The unfused two-liner the fused op must match."""
    return F.cross_entropy(F.linear(h_ND, weight_VD).float(), target_N, ignore_index=ignore_index)


def linear_cross_entropy(h_ND: torch.Tensor, weight_VD: torch.Tensor, target_N: torch.Tensor,
                         chunk_size: int = DEFAULT_CHUNK_SIZE, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of (h_ND @ weight_VD^T) against target_N, fp32 scalar, never holding more
    than [chunk_size, V] logits. Triton per-chunk kernel on CUDA, PyTorch elsewhere."""
    use_triton = h_ND.is_cuda and triton is not None
    return _LinearCrossEntropy.apply(h_ND, weight_VD, target_N, chunk_size, ignore_index, use_triton,
                                     torch.is_grad_enabled())


def linear_cross_entropy_triton(h_ND: torch.Tensor, weight_VD: torch.Tensor, target_N: torch.Tensor,
                                chunk_size: int = DEFAULT_CHUNK_SIZE, ignore_index: int = -100) -> torch.Tensor:
    """Same as `linear_cross_entropy`, always through the Triton chunk kernel (CPU tensors run it
    under TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("linear_cross_entropy_triton needs triton")
    return _LinearCrossEntropy.apply(h_ND, weight_VD, target_N, chunk_size, ignore_index, True,
                                     torch.is_grad_enabled())


def _compute_dtype(h_ND: torch.Tensor) -> torch.dtype:
    dev = h_ND.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return h_ND.dtype


def _logits_f32(x_cD: torch.Tensor, w_VD: torch.Tensor, out_cV: torch.Tensor) -> torch.Tensor:
    """x_cD @ w_VD^T as fp32 logits (in `out_cV`, a reused buffer, where it can: a fresh [c, V]
    tensor per chunk costs page faults on CPU). Low-precision inputs accumulate in fp32 inside
    cuBLAS on CUDA (out_dtype); on CPU the matmul's own result is rounded to its dtype, then widened."""
    if x_cD.dtype == torch.float32:
        return torch.mm(x_cD, w_VD.t(), out=out_cV)
    if x_cD.is_cuda:
        return torch.mm(x_cD, w_VD.t(), out_dtype=torch.float32)
    return out_cV.copy_(torch.mm(x_cD, w_VD.t()))


def _ce_chunk_torch(logits_cV: torch.Tensor, target_c: torch.Tensor, valid_c: torch.Tensor,
                    grad: bool) -> torch.Tensor:
    """Loss per row of fp32 logits (0 on ignored rows); with `grad`, overwrites logits_cV with
    softmax - onehot (unscaled; rows of ignored targets hold finite junk that the caller zeroes).
    Separate passes rather than torch.logsumexp, which measured slower on CPU."""
    safe_c = torch.where(valid_c, target_c, 0)
    x_y_c = logits_cV.gather(1, safe_c[:, None])[:, 0]
    m_c1 = logits_cV.amax(dim=1, keepdim=True)
    e_cV = logits_cV.sub_(m_c1).exp_()
    sum_c1 = e_cV.sum(dim=1, keepdim=True)
    loss_c = (m_c1[:, 0] + sum_c1[:, 0].log() - x_y_c) * valid_c
    if grad:
        e_cV.div_(sum_c1)
        e_cV[torch.arange(len(safe_c), device=e_cV.device), safe_c] -= 1.0
    return loss_c


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, weight_VD, target_N, chunk_size, ignore_index, use_triton, grad_enabled):
        if h_ND.dim() != 2 or weight_VD.dim() != 2 or target_N.shape != h_ND.shape[:1]:
            raise ValueError(f"linear_cross_entropy: h [N, D], weight [V, D], target [N]; got "
                             f"{tuple(h_ND.shape)}, {tuple(weight_VD.shape)}, {tuple(target_N.shape)}")
        if chunk_size < 1:
            raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
        N, V = h_ND.shape[0], weight_VD.shape[0]
        cdt = _compute_dtype(h_ND)
        # needs_input_grad stays True under no_grad: without grad mode only the loss is computed
        need_h, need_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        valid_N = target_N != ignore_index
        n_valid = int(valid_N.sum())
        if n_valid and not bool(((target_N >= 0) & (target_N < V))[valid_N].all()):
            raise ValueError(f"linear_cross_entropy: a target is outside [0, {V})")
        # d loss / d logits[n] = (softmax - onehot) * scale_N[n]: 1/n_valid, 0 on ignored rows. The
        # scale goes on the [c, D] side of the two gradient matmuls, not over the [c, V] chunk.
        scale_N = valid_N.float() / max(n_valid, 1)
        with torch.autocast(h_ND.device.type, enabled=False):
            x_ND, w_VD = h_ND.to(cdt), weight_VD.to(cdt)
            loss_N = torch.empty(N, dtype=torch.float32, device=h_ND.device)
            grad_h_ND = torch.empty_like(h_ND) if need_h else None
            grad_w_VD = torch.zeros(weight_VD.shape, dtype=torch.float32, device=h_ND.device) if need_w else None
            buf_cV = torch.empty(min(chunk_size, N), V, dtype=torch.float32, device=h_ND.device)
            for s in range(0, N, chunk_size):
                e = min(s + chunk_size, N)
                logits_cV = _logits_f32(x_ND[s:e], w_VD, buf_cV[:e - s])
                if use_triton:
                    loss_N[s:e] = _ce_chunk_triton(logits_cV, target_N[s:e], ignore_index, need_h or need_w)
                else:
                    loss_N[s:e] = _ce_chunk_torch(logits_cV, target_N[s:e], valid_N[s:e], need_h or need_w)
                if not (need_h or need_w):
                    continue
                g_cV = logits_cV.to(cdt)  # now softmax - onehot
                scale_c1 = scale_N[s:e, None]
                if need_h:
                    grad_h_ND[s:e] = _mm_f32(g_cV, w_VD).mul_(scale_c1)  # scaled in fp32: 1/n in bf16 is off
                if need_w:
                    xs_cD = (x_ND[s:e] * scale_c1).to(cdt)  # scaled in fp32, then to the matmul dtype
                    if cdt == torch.float32:
                        grad_w_VD.addmm_(g_cV.t(), xs_cD)
                    else:  # fp32 running sum of low-precision matmuls
                        grad_w_VD += _mm_f32(g_cV.t(), xs_cD)
        loss = loss_N.sum() / n_valid if n_valid else loss_N.sum() * float("nan")
        ctx.save_for_backward(grad_h_ND, grad_w_VD.to(weight_VD.dtype) if need_w else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h_ND, grad_w_VD = ctx.saved_tensors
        if grad_loss.item() != 1.0:  # a scaled loss (grad accumulation, loss scaling)
            grad_h_ND = grad_h_ND * grad_loss.to(grad_h_ND.dtype) if grad_h_ND is not None else None
            grad_w_VD = grad_w_VD * grad_loss.to(grad_w_VD.dtype) if grad_w_VD is not None else None
        return grad_h_ND, grad_w_VD, None, None, None, None, None


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as fp32; low-precision a, b accumulate in fp32 inside cuBLAS on CUDA (out_dtype), on
    CPU the result is rounded to their dtype, then widened."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).float()


# ----------------------------------------------------------------- Triton

if triton is not None:

    @triton.jit
    def _ce_chunk_kernel(logits_ptr, stride_row, target_ptr, loss_ptr, n_cols, ignore_index,
                         HAS_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
        """One program per row of the fp32 logits chunk: online max / sum of exp over the row
        (one read), the loss lse - x_y, then a second read that overwrites the row with
        softmax - onehot (Liger-Kernel's liger_cross_entropy_kernel, hard labels; the 1/n_valid
        scale is applied by the caller on the [c, D] side). Ignored rows: loss 0, row zeroed."""
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride_row
        y = tl.load(target_ptr + row)
        if y == ignore_index:
            for start in range(0, n_cols, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                tl.store(row_ptr + offs, tl.zeros([BLOCK_V], tl.float32), mask=offs < n_cols)
            tl.store(loss_ptr + row, 0.0)
            return
        m = -float("inf")
        d = 0.0
        for start in range(0, n_cols, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            x = tl.load(row_ptr + offs, mask=offs < n_cols, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
        x_y = tl.load(row_ptr + y).to(tl.float32)
        tl.store(loss_ptr + row, lse - x_y)
        if HAS_GRAD:
            for start in range(0, n_cols, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                x = tl.load(row_ptr + offs, mask=offs < n_cols, other=0.0).to(tl.float32)
                g = tl.exp(x - lse)
                g = tl.where(offs == y, g - 1.0, g)
                tl.store(row_ptr + offs, g, mask=offs < n_cols)


def _ce_chunk_triton(logits_cV: torch.Tensor, target_c: torch.Tensor, ignore_index: int,
                     grad: bool) -> torch.Tensor:
    c, V = logits_cV.shape
    loss_c = torch.empty(c, dtype=torch.float32, device=logits_cV.device)
    if c:
        # small blocks under the interpreter so tiny test vocabularies still span several blocks
        block_v = min(triton.next_power_of_2(V), 4096 if logits_cV.is_cuda else 64)
        _ce_chunk_kernel[(c,)](logits_cV, logits_cV.stride(0), target_c.contiguous(), loss_c, V,
                               ignore_index, HAS_GRAD=grad, BLOCK_V=block_v)
    return loss_c
