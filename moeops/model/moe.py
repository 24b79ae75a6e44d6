"""DeepSeekMoE: shared experts that every token uses plus fine-grained routed experts
with top-k routing and auxiliary-loss-free load balancing.

Legend: B batch, S sequence, T = B*S tokens, D model dim, E routed experts, K top-k,
M routed rows kept (T*K when dropless), F expert hidden dim, X = 2F (fused gate|up).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels.grouped_mlp import grouped_swiglu
from kernels.permute import permute, unpermute
from kernels.routing import route
from moeops.config import ModelArgs


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers and the shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Scores tokens against experts. `e_score_correction_bias` is the aux-loss-free balancing
    bias: a buffer (not a parameter, so the optimizer never touches it) changed only by
    `update_router_bias` after each optimizer step."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))
        self.register_buffer("e_score_correction_bias", torch.zeros(args.n_routed_experts))
        # Routed-token counts since the last bias update (not saved: a step's worth of state).
        self.register_buffer("tokens_per_expert", torch.zeros(args.n_routed_experts), persistent=False)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x_TD.device.type, enabled=False):  # routing in fp32, as DeepSeek-V3
            return F.linear(x_TD.float(), self.weight.float())


class Experts(nn.Module):
    """Routed experts stored as fused 3-D tensors (transformers' DeepseekV3Experts layout).
    `experts(x_MD, counts_E)` runs each expert on its slice of the expert-sorted rows; expert
    parallelism (moeops/train/parallel.py) swaps this module for one with the same call."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        E, D, F_ = args.n_routed_experts, args.dim, args.moe_inter_dim
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * F_, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, F_))

    def forward(self, x_MD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        return grouped_swiglu(x_MD, counts_E, self.gate_up_proj, self.down_proj)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.gate = Router(args)
        self.experts = Experts(args)
        n_shared = args.n_shared_experts
        self.shared_experts = MLP(args.dim, args.moe_inter_dim * n_shared) if n_shared else None
        self.aux_loss = torch.zeros(())
        self.dropped_tokens = 0  # token copies dropped by the capacity limit since the last reset
        self.count_stats = True  # False while activation checkpointing recomputes a forward

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        a = self.args
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        logits_TE = self.gate(x_TD)
        scores_TE, topk_ids_TK, topk_weights_TK = route(
            logits_TE, self.gate.e_score_correction_bias, a.top_k, a.n_group, a.topk_group, a.score_func,
            a.norm_topk_prob, a.routed_scaling_factor)
        capacity = math.ceil(a.capacity_factor * B * S * a.top_k / a.n_routed_experts) if a.capacity_factor else 0
        x_MD, counts_E, order_M, n_dropped = permute(x_TD, topk_ids_TK, a.n_routed_experts, capacity)
        y_MD = self.experts(x_MD, counts_E)
        out_TD = unpermute(y_MD, order_M, topk_weights_TK.to(y_MD.dtype))
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)

        if self.count_stats:
            self.gate.tokens_per_expert += torch.bincount(topk_ids_TK.reshape(-1), minlength=a.n_routed_experts)
            self.dropped_tokens += n_dropped
        self.aux_loss = self.balance_losses(logits_TE, scores_TE, topk_ids_TK, B, S) if self.training else 0.0
        return out_TD.view(B, S, D)

    def balance_losses(self, logits_TE, scores_TE, topk_ids_TK, B: int, S: int):
        """Complementary sequence-wise balance loss (DeepSeek-V3 eq. 17-20) and router z-loss."""
        a = self.args
        loss = logits_TE.new_zeros(())
        if a.seq_aux_alpha > 0:
            E, K = a.n_routed_experts, a.top_k
            probs_BSE = (scores_TE / scores_TE.sum(-1, keepdim=True)).view(B, S, E)
            hits_BE = torch.zeros(B, E, device=logits_TE.device).scatter_add_(
                1, topk_ids_TK.view(B, S * K), torch.ones(B, S * K, device=logits_TE.device))
            frac_BE = hits_BE * E / (K * S)
            loss = loss + a.seq_aux_alpha * (frac_BE * probs_BSE.mean(1)).sum(1).mean()
        if a.z_loss_alpha > 0:
            loss = loss + a.z_loss_alpha * torch.logsumexp(logits_TE, dim=-1).pow(2).mean()
        return loss
