"""Int8 data-parallel gradient all-reduce with per-block scales and error feedback, used in place
of DeepSpeed's fp32 gradient all-reduce when ZeRO is off.

Algorithm: a compressed reduce-scatter followed by a compressed all-gather, as in 1-bit Adam's
compressed_allreduce, with int8 values and one fp32 scale per `block` elements instead of signs.
Let n be the group size and N the flat gradient length padded up to a multiple of n*block, so each
of the n chunks (C = N/n elements) holds whole blocks.

1. worker:  x = flat(grads) + worker_residual; per block, scale = absmax/127 (0 for an all-zero
   block), q = round(x/scale) clamped to [-127, 127]; worker_residual = x - q*scale.
2. reduce-scatter: chunk i (its int8 values and its fp32 scales) goes to rank i (all_to_all_single);
   rank i dequantizes the n copies of its chunk, sums them in rank order and divides by `divisor`.
3. server:  y = that chunk + server_residual; requantize per block; server_residual = y - q*scale.
4. all-gather the int8 chunks and their scales (all_gather_single); every rank dequantizes the same bytes, so all
   ranks end with bitwise identical gradients.

Error feedback: what quantization drops in one step is added back in the next, so over T steps the
sum of the outputs differs from the exact sum only by the current residuals (bounded), not by T
rounding errors. One step is within about absmax/127 of the exact mean per block (half a step from
each of the two quantizations).

Byte accounting, per call and per rank, not counting the chunk a rank keeps for itself, summed over
the tensors passed to the collectives (numel * element_size): each of the two phases sends n-1
chunks of C int8 values plus C/block fp32 scales, so
    bytes_sent = 2*(n-1)/n * N * (1 + 4/block)
against 2*(n-1)/n * numel * 4 for a ring fp32 all-reduce (`ring_allreduce_bytes`): about
(1 + 4/256)/4 = 25.4% at block 256, plus padding (fewer than n*block elements).

Non-finite gradients (an fp16 overflow step) still come out non-finite, through the scales, so a
loss scaler sees them; residual entries that would turn non-finite keep their previous value, so a
skipped step does not poison the steps after it.

Shape suffixes: N padded flat length, B = N/block blocks, W group size, C = N/W chunk length,
S = C/block blocks per chunk, K = block.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch 2.13 renamed all_gather_into_tensor (now deprecated with a FutureWarning) to all_gather_single.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

QMAX = 127  # symmetric int8 range [-127, 127]; -128 unused so that q and -q are both representable


def ring_allreduce_bytes(numel: int, itemsize: int, world: int) -> int:
    """Bytes one rank sends in a ring all-reduce (reduce-scatter + all-gather): 2*(n-1)/n*numel*itemsize."""
    if world <= 1:
        return 0
    return 2 * (world - 1) * numel * itemsize // world


def quantize_blocks(x_N: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block symmetric int8: returns (q_N int8, scales_B fp32) with x ~= q * scale of its block.
    An all-zero block gets scale 0 and q 0. `x_N` is 1-D with a length that is a multiple of `block`."""
    if x_N.dim() != 1 or x_N.numel() % block:
        raise ValueError(f"quantize_blocks needs 1-D input of a multiple of {block} elements, got {tuple(x_N.shape)}")
    x_BK = x_N.float().view(-1, block)
    scales_B = x_BK.abs().amax(dim=1) / QMAX
    # Divide by 1 where the scale is 0 (or NaN): q is then 0 (or garbage), and q * scale keeps the block
    # exactly zero (or non-finite, which is what an overflow should look like downstream).
    safe_B = torch.where(scales_B > 0, scales_B, torch.ones_like(scales_B))
    q_BK = torch.round(x_BK / safe_B[:, None]).nan_to_num_(0.0).clamp_(-QMAX, QMAX)
    return q_BK.to(torch.int8).view(-1), scales_B


def dequantize_blocks(q_N: torch.Tensor, scales_B: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of `quantize_blocks`: fp32 q * scale of its block, 1-D."""
    return (q_N.view(-1, block).float() * scales_B[:, None]).view(-1)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _update_residual(residual: torch.Tensor, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, block: int):
    """residual = x - dequantized, keeping the old entry wherever the new one is not finite."""
    new = x - dequantize_blocks(q, scales, block)
    residual.copy_(torch.where(torch.isfinite(new), new, residual))


class Int8GradAllReduce:
    """Average the .grad of `params` over process group `group` (divide by `divisor`, default the group size),
    sending int8 values + one fp32 scale per `block` elements, with error feedback.

    Call it after backward, in place of the fp32 all-reduce: every p.grad becomes the (approximate) group mean,
    identical on all ranks; a p.grad of None counts as zeros and is replaced by a tensor. Every rank must pass
    the same parameters in the same order. Keeps two fp32 residuals (N and N/W elements) on the params' device.
    With a group of size 1 (or torch.distributed not initialized) it only divides, and counts no bytes."""

    def __init__(self, params: list[torch.nn.Parameter], group=None, block: int = 256, divisor: int | None = None):
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self.params = list(params)
        self.group = group
        self.block = block
        distributed = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size(group) if distributed else 1
        self.rank = dist.get_rank(group) if distributed else 0
        self.divisor = self.world if divisor is None else divisor
        if self.divisor <= 0:
            raise ValueError(f"divisor must be positive, got {self.divisor}")
        self.numel = sum(p.numel() for p in self.params)
        unit = self.world * block
        self.padded = -(-self.numel // unit) * unit  # N
        self.chunk = self.padded // self.world  # C
        device = self.params[0].device if self.params else torch.device("cpu")
        self.worker_residual_N = torch.zeros(self.padded if self.world > 1 else 0, device=device)
        self.server_residual_C = torch.zeros(self.chunk if self.world > 1 else 0, device=device)
        self.bytes_sent = 0
        self.fp32_bytes = 0

    @torch.no_grad()
    def __call__(self) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        if self.world == 1 or self.numel == 0:
            for g in grads:
                g.div_(self.divisor)
            return

        W, C, K = self.world, self.chunk, self.block
        x_N = torch.zeros(self.padded, dtype=torch.float32, device=self.worker_residual_N.device)
        offset = 0
        for g in grads:
            x_N[offset : offset + g.numel()].copy_(g.reshape(-1))
            offset += g.numel()

        # 1. worker quantization with error feedback
        x_N += self.worker_residual_N
        q_N, scales_B = quantize_blocks(x_N, K)
        _update_residual(self.worker_residual_N, x_N, q_N, scales_B, K)

        # 2. reduce-scatter: chunk i of every rank goes to rank i; sum in rank order (deterministic)
        recv_q_N, recv_scales_B = torch.empty_like(q_N), torch.empty_like(scales_B)
        works = [dist.all_to_all_single(recv_q_N, q_N, group=self.group, async_op=True),
                 dist.all_to_all_single(recv_scales_B, scales_B, group=self.group, async_op=True)]
        for work in works:
            work.wait()
        parts_WC = dequantize_blocks(recv_q_N, recv_scales_B, K).view(W, C)
        y_C = parts_WC[0].clone()
        for i in range(1, W):
            y_C += parts_WC[i]
        y_C /= self.divisor

        # 3. server requantization of this rank's chunk with error feedback
        y_C += self.server_residual_C
        q_C, scales_S = quantize_blocks(y_C, K)
        _update_residual(self.server_residual_C, y_C, q_C, scales_S, K)

        # 4. all-gather the quantized chunks; every rank decodes the same bytes
        out_q_N, out_scales_B = torch.empty_like(q_N), torch.empty_like(scales_B)
        works = [_all_gather(out_q_N, q_C, group=self.group, async_op=True),
                 _all_gather(out_scales_B, scales_S, group=self.group, async_op=True)]
        for work in works:
            work.wait()
        out_N = dequantize_blocks(out_q_N, out_scales_B, K)
        offset = 0
        for g in grads:
            g.copy_(out_N[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

        # Counted from the tensors handed to the collectives: all_to_all sends every chunk of its
        # inputs but this rank's own; all_gather sends this rank's chunk to each of the W - 1 others.
        self.bytes_sent += sum(_nbytes(t) for t in (q_N, scales_B)) * (W - 1) // W
        self.bytes_sent += sum(_nbytes(t) for t in (q_C, scales_S)) * (W - 1)
        self.fp32_bytes += ring_allreduce_bytes(self.numel, 4, W)
