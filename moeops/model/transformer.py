"""The DeepSeek-V3 decoder in miniature. Parameter names and shapes follow transformers'
DeepseekV3ForCausalLM state dict (5.x layout), so weights move between the two unchanged
(see moeops/model/hf.py).

Shapes: B batch, S sequence, D model dim, V vocab.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kernels.linear_cross_entropy import linear_cross_entropy
from moeops.config import ModelArgs
from moeops.model.attention import MLA, RMSNorm, rope_angles
from moeops.model.moe import MLP, MoE


class Block(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = MLA(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args.dim, args.inter_dim) if layer_id < args.first_k_dense_replace else MoE(args)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x_BSD = x_BSD + self.self_attn(self.input_layernorm(x_BSD), cos, sin)
        return x_BSD + self.mlp(self.post_attention_layernorm(x_BSD))

    def forward_cached(self, x_BSD, cos, sin, past_latent, past_rope, mask_B1ST):
        h_BSD, latent, rope = self.self_attn.forward_cached(self.input_layernorm(x_BSD), cos, sin, past_latent,
                                                            past_rope, mask_B1ST)
        x_BSD = x_BSD + h_BSD
        return x_BSD + self.mlp(self.post_attention_layernorm(x_BSD)), latent, rope


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)


class Transformer(nn.Module):
    """`Transformer(args)(tokens_BS) -> logits_BSV`. Auxiliary balance losses of the last
    training forward are in `aux_loss()`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        cos, sin = rope_angles(args.qk_rope_head_dim, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens_BS: torch.Tensor, targets_BS: torch.Tensor | None = None) -> torch.Tensor:
        """Logits, or with `targets_BS` the mean cross-entropy, computed in chunks of rows by
        kernels/linear_cross_entropy.py without ever holding the [B·S, V] logits (the lm_head and
        the loss are about 45% of a training step's FLOPs at the default size)."""
        S = tokens_BS.shape[1]
        if S > self.args.max_seq_len:
            raise ValueError(f"sequence length {S} > max_seq_len {self.args.max_seq_len}")
        x_BSD = self.model.embed_tokens(tokens_BS)
        cos, sin = self.rope_cos[:S], self.rope_sin[:S]
        for layer in self.model.layers:
            x_BSD = layer(x_BSD, cos, sin)
        h_BSD = self.model.norm(x_BSD)
        if targets_BS is None:
            return self.lm_head(h_BSD)
        return linear_cross_entropy(h_BSD.flatten(0, 1), self.lm_head.weight, targets_BS.flatten())

    def forward_cached(self, tokens_BS: torch.Tensor, attention_mask_BT: torch.Tensor,
                       past: list[tuple[torch.Tensor, torch.Tensor]]):
        """Incremental decoding with the MLA cache: `past[i]` = (latent [B, P, C], rope key [B, P, R])
        of layer i; `attention_mask_BT` (T = P + S) is 1 for real tokens and 0 for left padding.
        Returns logits_BSV and the grown cache. Positions count real tokens only, so a left-padded
        row gets the same logits as the unpadded sequence."""
        S = tokens_BS.shape[1]
        P = past[0][0].shape[1]
        positions_BT = (attention_mask_BT.cumsum(-1) - 1).clamp(min=0)
        positions_BS = positions_BT[:, P:]
        cos = self.rope_cos[positions_BS].unsqueeze(1)  # [B, 1, S, R/2]
        sin = self.rope_sin[positions_BS].unsqueeze(1)
        key_T = torch.arange(P + S, device=tokens_BS.device)
        query_S1 = (P + torch.arange(S, device=tokens_BS.device)).unsqueeze(-1)
        # Causal over real keys; every query also sees itself, so a padding row never attends to
        # nothing (an all-masked row would be NaN and poison the cache of later layers).
        allowed_BST = ((key_T <= query_S1) & attention_mask_BT.bool().unsqueeze(1)) | (key_T == query_S1)
        mask_B1ST = allowed_BST.unsqueeze(1)
        x_BSD = self.model.embed_tokens(tokens_BS)
        present = []
        for layer, (past_latent, past_rope) in zip(self.model.layers, past):
            x_BSD, latent, rope = layer.forward_cached(x_BSD, cos, sin, past_latent, past_rope, mask_B1ST)
            present.append((latent, rope))
        return self.lm_head(self.model.norm(x_BSD)), present

    def empty_cache(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        a = self.args
        return [(torch.zeros(batch, 0, a.kv_lora_rank), torch.zeros(batch, 0, a.qk_rope_head_dim))
                for _ in range(a.n_layers)]

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]

    def aux_loss(self) -> torch.Tensor | float:
        return sum((m.aux_loss for m in self.moe_layers()), 0.0)


def init_weights(model: Transformer, seed: int) -> None:
    """Normal(0, init_std) everywhere, output projections scaled by 1/sqrt(2·n_layers) (GPT-2),
    norms at 1, balancing bias at 0. Deterministic for a given seed."""
    std = model.args.init_std
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # RMSNorm gains (incl. q_a/kv_a_layernorm)
                p.fill_(1.0)
            else:
                scale = 1 / math.sqrt(2 * model.args.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight",
                                                                                  "experts.down_proj")) else 1.0
                p.copy_(torch.randn(p.shape, generator=gen) * std * scale)
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.zero_()


def build_model(args: ModelArgs, seed: int = 0) -> Transformer:
    model = Transformer(args)
    init_weights(model, seed)
    return model


def param_counts(args: ModelArgs) -> dict[str, int]:
    """Total parameters and parameters active per token (top_k of the routed experts)."""
    with torch.device("meta"):
        model = Transformer(args)
    total = sum(p.numel() for p in model.parameters())
    per_expert = 3 * args.dim * args.moe_inter_dim
    inactive = len(model.moe_layers()) * (args.n_routed_experts - args.top_k) * per_expert
    return {"total": total, "active": total - inactive}


# ------------------------------------------------------------ balancing and expert statistics


@torch.no_grad()
def update_router_bias(model: Transformer, speed: float) -> None:
    """Aux-loss-free balancing, after each optimizer step: bias += γ·sign(mean_load − load).
    Resets the per-step token counts."""
    for moe in model.moe_layers():
        load_E = moe.gate.tokens_per_expert
        if speed > 0 and load_E.sum() > 0:
            moe.gate.e_score_correction_bias += speed * torch.sign(load_E.mean() - load_E)
        load_E.zero_()


def expert_loads(model: Transformer) -> list[torch.Tensor]:
    """Routed-token counts per MoE layer since the last reset."""
    return [moe.gate.tokens_per_expert.clone() for moe in model.moe_layers()]


def max_violation(load_E: torch.Tensor) -> float:
    """MaxVio = max load / mean load − 1 (0 = perfectly balanced)."""
    mean = load_E.float().mean()
    return float(load_E.max() / mean - 1) if mean > 0 else 0.0


def reset_expert_stats(model: Transformer) -> None:
    for moe in model.moe_layers():
        moe.gate.tokens_per_expert.zero_()
        moe.dropped_tokens = 0
