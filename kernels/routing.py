"""Top-k expert routing, DeepSeek-V3 style (scores -> optional group limit -> top-k).

Legend: T tokens, E routed experts, K top-k, G expert groups.

The per-expert bias (aux-loss-free balancing) shifts only which experts are *selected*;
the combine weights come from the unbiased scores (DeepSeek-V3, Wang et al. 2408.15664).

On CUDA `route` runs `route_triton`: one program per block of tokens does the whole routing of
its rows in registers (scores, group limit, top-k by repeated argmax, weights); its backward is a
second kernel. Ties pick the lowest expert (and group) index; torch.topk may pick another.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install runs without Triton
    triton = None


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
    if logits_TE.is_cuda and triton is not None:
        return route_triton(logits_TE, bias_E, top_k, n_group, topk_group, score_func, norm_topk_prob, scaling)
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


# ---------------------------------------------------------------------------------------------
# Triton

def route_triton(
    logits_TE: torch.Tensor,
    bias_E: torch.Tensor,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    score_func: str = "sigmoid",
    norm_topk_prob: bool = True,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`route` as two Triton kernels (forward, backward). Gradients reach the logits through
    scores_TE and topk_weights_TK; the selection (and the bias) has none."""
    if score_func not in ("sigmoid", "softmax"):
        raise ValueError(f"score_func must be sigmoid or softmax, got {score_func!r}")
    bias_E = bias_E.detach().float().contiguous()
    return _RouteTriton.apply(logits_TE.float(), bias_E, top_k, n_group, topk_group, score_func == "softmax",
                              norm_topk_prob, float(scaling))


def _route_blocks(E: int, K: int) -> tuple[int, int, int]:
    BLOCK_E = triton.next_power_of_2(max(E, 16))
    BLOCK_T = max(1, min(64, 4096 // BLOCK_E))  # a [BLOCK_T, BLOCK_E] tile per program
    return BLOCK_T, BLOCK_E, triton.next_power_of_2(max(K, 2))


class _RouteTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, bias_E, K: int, n_group: int, topk_group: int, softmax: bool, norm: bool,
                scaling: float):
        logits_TE = logits_TE.contiguous()
        T, E = logits_TE.shape
        scores_TE = torch.empty_like(logits_TE)
        ids_TK = torch.empty(T, K, dtype=torch.int64, device=logits_TE.device)
        weights_TK = torch.empty(T, K, dtype=torch.float32, device=logits_TE.device)
        if T:
            BLOCK_T, BLOCK_E, BLOCK_K = _route_blocks(E, K)
            _route_fwd_kernel[(triton.cdiv(T, BLOCK_T),)](
                logits_TE, bias_E, scores_TE, ids_TK, weights_TK, T, E, E // n_group, scaling,
                K=K, N_GROUP=n_group, TOPK_GROUP=topk_group, SOFTMAX=softmax, NORM=norm,
                BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, BLOCK_K=BLOCK_K)
        ctx.save_for_backward(scores_TE, ids_TK)
        ctx.softmax, ctx.norm, ctx.scaling = softmax, norm, scaling
        ctx.mark_non_differentiable(ids_TK)
        return scores_TE, ids_TK, weights_TK

    @staticmethod
    def backward(ctx, grad_scores_TE, _grad_ids, grad_weights_TK):
        scores_TE, ids_TK = ctx.saved_tensors
        T, E = scores_TE.shape
        K = ids_TK.shape[1]
        grad_logits_TE = torch.empty_like(scores_TE)
        has_grad_scores = grad_scores_TE is not None
        grad_scores_TE = grad_scores_TE.contiguous() if has_grad_scores else scores_TE  # never read when absent
        if grad_weights_TK is None:
            grad_weights_TK = torch.zeros_like(scores_TE[:, :K])
        if T:
            BLOCK_T, BLOCK_E, _ = _route_blocks(E, K)
            _route_bwd_kernel[(triton.cdiv(T, BLOCK_T),)](
                scores_TE, grad_scores_TE, ids_TK, grad_weights_TK.contiguous(), grad_logits_TE, T, E,
                ctx.scaling, K=K, HAS_GRAD_SCORES=has_grad_scores, SOFTMAX=ctx.softmax, NORM=ctx.norm,
                BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E)
        return grad_logits_TE, None, None, None, None, None, None, None


if triton is not None:

    @triton.jit
    def _route_fwd_kernel(logits_ptr, bias_ptr, scores_ptr, ids_ptr, weights_ptr, T, E, per_group, scaling,
                          K: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                          SOFTMAX: tl.constexpr, NORM: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
        toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        experts = tl.arange(0, BLOCK_E)
        tok_ok = toks < T
        e_ok = experts < E
        mask = tok_ok[:, None] & e_ok[None, :]
        offs = toks.to(tl.int64)[:, None] * E + experts[None, :]
        x = tl.load(logits_ptr + offs, mask=mask, other=0.0)
        if SOFTMAX:
            x = tl.where(e_ok[None, :], x, float("-inf"))  # rows past T stay finite: no NaN anywhere
            p = tl.exp(x - tl.max(x, axis=1)[:, None])
            s = p / tl.sum(p, axis=1)[:, None]
        else:
            s = tl.where(mask, tl.sigmoid(x), 0.0)
        tl.store(scores_ptr + offs, s, mask=mask)

        neg_inf = float("-inf")
        experts_TE = experts[None, :] + tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)
        bias = tl.load(bias_ptr + experts, mask=e_ok, other=0.0)
        choice = tl.where(e_ok[None, :], s + bias[None, :], neg_inf)  # selection only: padded columns never win
        if N_GROUP > 1:
            # Group score = sum of the top-2 biased scores in the group; keep the best TOPK_GROUP groups.
            group_TE = experts_TE // per_group  # padded columns fall in groups >= N_GROUP
            group_score = tl.full([BLOCK_T, BLOCK_E], neg_inf, tl.float32)
            for g in tl.static_range(N_GROUP):
                c = tl.where(group_TE == g, choice, neg_inf)
                top1 = tl.max(c, axis=1)
                first = tl.min(tl.where(c == top1[:, None], experts_TE, BLOCK_E), axis=1)
                top2 = tl.max(tl.where(experts_TE == first[:, None], neg_inf, c), axis=1)
                top2 = tl.where(top2 == neg_inf, 0.0, top2)  # a group of one expert scores that expert
                group_score = tl.where(group_TE == g, (top1 + top2)[:, None], group_score)
            keep = experts_TE < 0  # all False
            for _ in tl.static_range(TOPK_GROUP):
                best = tl.max(group_score, axis=1)
                best_group = tl.min(tl.where(group_score == best[:, None], group_TE, N_GROUP), axis=1)
                chosen = group_TE == best_group[:, None]
                keep = keep | chosen
                group_score = tl.where(chosen, neg_inf, group_score)
            choice = tl.where(keep, choice, neg_inf)

        # Top-k by repeated argmax (ties: lowest expert index); weights from the unbiased scores.
        slots = tl.arange(0, BLOCK_K)[None, :]
        ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
        weights = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
        for k in tl.static_range(K):
            best = tl.max(choice, axis=1)
            pick = tl.min(tl.where(choice == best[:, None], experts_TE, BLOCK_E), axis=1)
            picked = experts_TE == pick[:, None]
            ids = tl.where(slots == k, pick[:, None], ids)
            weights = tl.where(slots == k, tl.sum(tl.where(picked, s, 0.0), axis=1)[:, None], weights)
            choice = tl.where(picked, neg_inf, choice)
        if NORM:
            weights = weights / (tl.sum(weights, axis=1)[:, None] + 1e-20)
        weights = weights * scaling
        out_offs = toks.to(tl.int64)[:, None] * K + slots
        out_mask = tok_ok[:, None] & (slots < K)
        tl.store(ids_ptr + out_offs, ids.to(tl.int64), mask=out_mask)
        tl.store(weights_ptr + out_offs, weights, mask=out_mask)

    @triton.jit
    def _route_bwd_kernel(scores_ptr, grad_scores_ptr, ids_ptr, grad_weights_ptr, grad_logits_ptr, T, E, scaling,
                          K: tl.constexpr, HAS_GRAD_SCORES: tl.constexpr, SOFTMAX: tl.constexpr,
                          NORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
        """grad_scores += the weights' gradient put back on the picked experts (each row's K ids are
        distinct: plain selects, no atomics), then through sigmoid / softmax to the logits."""
        toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        experts = tl.arange(0, BLOCK_E)
        tok_ok = toks < T
        mask = tok_ok[:, None] & (experts[None, :] < E)
        offs = toks.to(tl.int64)[:, None] * E + experts[None, :]
        s = tl.load(scores_ptr + offs, mask=mask, other=0.0)
        if HAS_GRAD_SCORES:
            g = tl.load(grad_scores_ptr + offs, mask=mask, other=0.0)
        else:
            g = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
        # w_k = scaling * p_k / (sum p + 1e-20) with p_k the picked unbiased scores (or scaling * p_k).
        total = tl.zeros([BLOCK_T], dtype=tl.float32)
        dot = tl.zeros([BLOCK_T], dtype=tl.float32)
        for k in tl.static_range(K):
            pick = tl.load(ids_ptr + toks.to(tl.int64) * K + k, mask=tok_ok, other=-1)
            p = tl.sum(tl.where(experts[None, :] == pick[:, None], s, 0.0), axis=1)
            gw = tl.load(grad_weights_ptr + toks.to(tl.int64) * K + k, mask=tok_ok, other=0.0) * scaling
            total += p
            dot += gw * p
        denom = total + 1e-20
        for k in tl.static_range(K):
            pick = tl.load(ids_ptr + toks.to(tl.int64) * K + k, mask=tok_ok, other=-1)
            gw = tl.load(grad_weights_ptr + toks.to(tl.int64) * K + k, mask=tok_ok, other=0.0) * scaling
            if NORM:
                gp = gw / denom - dot / (denom * denom)
            else:
                gp = gw
            g += tl.where(experts[None, :] == pick[:, None], gp[:, None], 0.0)
        if SOFTMAX:
            grad_x = s * (g - tl.sum(g * s, axis=1)[:, None])
        else:
            grad_x = g * s * (1.0 - s)
        tl.store(grad_logits_ptr + offs, grad_x, mask=mask)
