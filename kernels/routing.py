"""Top-k expert routing, DeepSeek-V3 style (scores -> optional group limit -> top-k).

Legend: T tokens, E routed experts, K top-k, G expert groups.

The per-expert bias (aux-loss-free balancing) shifts only which experts are *selected*;
the combine weights come from the unbiased scores (DeepSeek-V3, Wang et al. 2408.15664).
"""

from __future__ import annotations

import torch


def scores_from_logits(logits_TE: torch.Tensor, score_func: str) -> torch.Tensor:
    if score_func == "sigmoid":
        return logits_TE.sigmoid()
    return logits_TE.softmax(dim=-1)


def route(
    logits_TE: torch.Tensor,
    bias_E: torch.Tensor,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    score_func: str = "sigmoid",
    norm_topk_prob: bool = True,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (scores_TE, topk_ids_TK, topk_weights_TK); logits are taken in fp32."""
    T, E = logits_TE.shape
    scores_TE = scores_from_logits(logits_TE.float(), score_func)
    choice_TE = scores_TE.detach() + bias_E  # selection only: no gradient through the choice
    if n_group > 1:
        # Group score = sum of the top-2 biased scores in the group; keep the best topk_group groups.
        group_TG = choice_TE.view(T, n_group, E // n_group).topk(2, dim=-1).values.sum(-1)
        keep_ids = group_TG.topk(topk_group, dim=-1, sorted=False).indices
        keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, keep_ids, True)
        keep_TE = keep_TG.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
        choice_TE = choice_TE.masked_fill(~keep_TE, float("-inf"))
    topk_ids_TK = choice_TE.topk(top_k, dim=-1, sorted=False).indices
    topk_weights_TK = scores_TE.gather(1, topk_ids_TK)
    if norm_topk_prob:
        topk_weights_TK = topk_weights_TK / (topk_weights_TK.sum(-1, keepdim=True) + 1e-20)
    return scores_TE, topk_ids_TK, topk_weights_TK * scaling


def route_reference(logits_TE, bias_E, top_k, n_group=1, topk_group=1, score_func="sigmoid",
                    norm_topk_prob=True, scaling=1.0):
    """Token by token, written the obvious way. Returns ids sorted ascending per token."""
    T, E = logits_TE.shape
    per_group = E // n_group
    ids, weights = [], []
    for t in range(T):
        s = logits_TE[t].float().sigmoid() if score_func == "sigmoid" else logits_TE[t].float().softmax(-1)
        c = [float(s[e] + bias_E[e]) for e in range(E)]
        groups = [sorted(c[g * per_group:(g + 1) * per_group], reverse=True) for g in range(n_group)]
        group_score = [g[0] + g[1] if len(g) > 1 else g[0] for g in groups]
        kept_groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        allowed = [e for e in range(E) if e // per_group in kept_groups]
        chosen = sorted(sorted(allowed, key=lambda e: -c[e])[:top_k])
        w = torch.stack([s[e] for e in chosen])
        if norm_topk_prob:
            w = w / (w.sum() + 1e-20)
        ids.append(torch.tensor(chosen))
        weights.append(w * scaling)
    return torch.stack(ids), torch.stack(weights)
