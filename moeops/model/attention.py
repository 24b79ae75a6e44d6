"""RMSNorm, rotary embeddings and Multi-head Latent Attention (DeepSeek-V2/V3).

Shapes: B batch, S sequence, H heads, D model dim, C kv_lora_rank (the compressed KV
latent), Q q_lora_rank, R qk_rope_head_dim, P qk_nope_head_dim, V v_head_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeops.config import ModelArgs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as transformers does) so bf16 autocast does not lose the scale. One fused
        # kernel (F.rms_norm) instead of pow, mean, add, rsqrt and mul: the same bits, 1.5x faster.
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def rope_angles(head_dim: int, seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [S, head_dim/2] for positions 0..S-1."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.arange(seq_len, dtype=torch.float32)[:, None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... and lay the result out as
    [all even | all odd], exactly like transformers' DeepseekV3 `rope_interleave=True`
    (the layout change is the same for q and k, so q·k is the interleaved-RoPE one)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class MLA(nn.Module):
    """Multi-head Latent Attention: queries through an optional low-rank bottleneck, keys and
    values through a shared latent of rank C, plus one decoupled RoPE key shared by all heads."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.nope_dim, self.rope_dim, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.kv_lora_rank = args.kv_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        if args.q_lora_rank:
            self.q_a_proj = nn.Linear(args.dim, args.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, args.norm_eps)
            self.q_b_proj = nn.Linear(args.q_lora_rank, self.n_heads * qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(args.dim, self.n_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(args.dim, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, args.norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, args.dim, bias=False)
        self.scale = qk_dim**-0.5

    def project(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Queries with RoPE applied (q_BHSX) and what the KV cache keeps per position: the normed
        latent (latent_BSC) and the rotated shared RoPE key (k_rope_BSR). `cos`/`sin` are [S, R/2]
        (positions 0..S-1) or [B, 1, S, R/2] (per-sequence positions)."""
        B, S, _ = x_BSD.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x_BSD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))
        q_nope, q_rope = q.view(B, S, self.n_heads, -1).transpose(1, 2).split([self.nope_dim, self.rope_dim], dim=-1)
        latent_BSC, k_rope_BSR = self.kv_a_proj_with_mqa(x_BSD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        q_BHSX = torch.cat([q_nope, apply_rope(q_rope, cos, sin)], dim=-1)
        k_rope_BSR = apply_rope(k_rope_BSR.unsqueeze(1), cos, sin).squeeze(1)
        return q_BHSX, self.kv_a_layernorm(latent_BSC), k_rope_BSR

    def attend(self, q_BHSX: torch.Tensor, latent_BTC: torch.Tensor, k_rope_BTR: torch.Tensor,
               mask_B1ST: torch.Tensor | None) -> torch.Tensor:
        """Attention of S queries over T cached positions (T = S and causal when mask is None)."""
        B, H, S, _ = q_BHSX.shape
        T = latent_BTC.shape[1]
        kv_BHTX = self.kv_b_proj(latent_BTC).view(B, T, H, -1).transpose(1, 2)
        k_nope, v_BHTV = kv_BHTX.split([self.nope_dim, self.v_dim], dim=-1)
        k_BHTX = torch.cat([k_nope, k_rope_BTR.unsqueeze(1).expand(B, H, T, self.rope_dim)], dim=-1)
        # PyTorch's fused (flash) attention needs v as wide as q and k; with v_dim < qk_dim it falls
        # back to the unfused math path (5x slower forward + backward at 16 x 256, 2 threads). Zero
        # columns padded onto v give zero output columns, sliced off.
        pad = q_BHSX.shape[-1] - self.v_dim
        out_BHSX = F.scaled_dot_product_attention(q_BHSX, k_BHTX, F.pad(v_BHTV, (0, pad)) if pad > 0 else v_BHTV,
                                                  attn_mask=mask_B1ST, is_causal=mask_B1ST is None, scale=self.scale)
        out_BHSV = out_BHSX[..., :self.v_dim]
        return self.o_proj(out_BHSV.transpose(1, 2).reshape(B, S, H * self.v_dim))

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q_BHSX, latent_BSC, k_rope_BSR = self.project(x_BSD, cos, sin)
        return self.attend(q_BHSX, latent_BSC, k_rope_BSR, None)

    def forward_cached(self, x_BSD, cos, sin, past_latent_BPC, past_rope_BPR, mask_B1ST):
        """Decode step: S new positions after P cached ones. Returns the output and the grown cache
        (MLA caches C + R floats per position instead of H·(qk + v) for full keys and values)."""
        q_BHSX, latent_BSC, k_rope_BSR = self.project(x_BSD, cos, sin)
        latent_BTC = torch.cat([past_latent_BPC, latent_BSC], dim=1)
        k_rope_BTR = torch.cat([past_rope_BPR, k_rope_BSR], dim=1)
        return self.attend(q_BHSX, latent_BTC, k_rope_BTR, mask_B1ST), latent_BTC, k_rope_BTR
