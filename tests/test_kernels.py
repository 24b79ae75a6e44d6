"""Each op in kernels/ against its naive per-token reference: outputs and gradients over odd
shapes (one token, an expert with no tokens, all tokens on one expert)."""

import pytest
import torch
import torch.nn.functional as F

from kernels.grouped_mlp import grouped_swiglu, grouped_swiglu_reference
from kernels.permute import permute, unpermute
from kernels.routing import route, route_reference

ROUTING_CASES = [  # T, E, K, n_group, topk_group, score_func, norm
    (1, 4, 1, 1, 1, "sigmoid", True),
    (7, 8, 2, 1, 1, "sigmoid", True),
    (13, 8, 3, 4, 2, "sigmoid", True),
    (5, 16, 4, 4, 1, "sigmoid", False),
    (9, 6, 2, 1, 1, "softmax", False),
    (11, 12, 3, 3, 2, "softmax", True),
]


@pytest.mark.parametrize("T,E,K,G,TG,score_func,norm", ROUTING_CASES)
def test_route_matches_reference(T, E, K, G, TG, score_func, norm):
    gen = torch.Generator().manual_seed(T * 100 + E)
    logits = torch.randn(T, E, generator=gen)
    bias = torch.randn(E, generator=gen) * 0.1
    scores, ids, w = route(logits, bias, K, G, TG, score_func, norm, 2.5)
    ref_ids, ref_w = route_reference(logits, bias, K, G, TG, score_func, norm, 2.5)
    order = ids.argsort(dim=1)
    torch.testing.assert_close(ids.gather(1, order), ref_ids)
    torch.testing.assert_close(w.gather(1, order), ref_w)
    assert scores.shape == (T, E)


def test_group_limit_keeps_selection_inside_kept_groups():
    logits = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    _, ids, _ = route(logits, torch.zeros(16), top_k=4, n_group=4, topk_group=2)
    groups_per_token = (ids // 4).sort(dim=1).values
    assert all(len(set(row.tolist())) <= 2 for row in groups_per_token)


def test_bias_changes_selection_but_not_weights():
    logits = torch.zeros(3, 4)
    logits[:, 0] = 1.0  # expert 0 scores highest...
    bias = torch.tensor([-10.0, 0.0, 0.0, 5.0])  # ...but the bias pushes selection to expert 3
    scores, ids, w = route(logits, bias, top_k=1, norm_topk_prob=False)
    assert ids.flatten().tolist() == [3, 3, 3]
    torch.testing.assert_close(w.flatten(), scores[:, 3])  # weight from the unbiased score


def naive_moe(x_TD, ids_TK, w_TK, gate_up, down):
    """One token, one expert at a time."""
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(ids_TK.shape[1]):
            e = int(ids_TK[t, k])
            g, u = (gate_up[e] @ x_TD[t]).chunk(2)
            out[t] = out[t] + w_TK[t, k] * (down[e] @ (F.silu(g) * u))
    return out


def dispatch(x_TD, ids_TK, w_TK, gate_up, down, capacity=0):
    x_MD, counts, order, dropped = permute(x_TD, ids_TK, gate_up.shape[0], capacity)
    return unpermute(grouped_swiglu(x_MD, counts, gate_up, down), order, w_TK), dropped


def make_case(T, E, K, D=8, F_=5, all_on_one=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen, dtype=torch.float64)
    if all_on_one:
        ids = torch.stack([torch.arange(K)] * T)  # every token on experts 0..K-1; the rest idle
    else:
        ids = torch.stack([torch.randperm(E - 1, generator=gen)[:K] for _ in range(T)])  # expert E-1 idle
    w = torch.rand(T, K, generator=gen, dtype=torch.float64)
    gate_up = torch.randn(E, 2 * F_, D, generator=gen, dtype=torch.float64) * 0.3
    down = torch.randn(E, D, F_, generator=gen, dtype=torch.float64) * 0.3
    return x, ids, w, gate_up, down


@pytest.mark.parametrize("T,E,K,all_on_one", [(1, 4, 1, False), (1, 4, 2, False), (17, 6, 2, False),
                                              (9, 5, 1, True), (12, 8, 3, True)])
def test_dispatch_matches_naive_outputs_and_grads(T, E, K, all_on_one):
    case = make_case(T, E, K, all_on_one=all_on_one)
    leaves = [t.clone().requires_grad_() for t in (case[0], case[2], case[3], case[4])]
    out, dropped = dispatch(leaves[0], case[1], leaves[1], leaves[2], leaves[3])
    ref_leaves = [t.clone().requires_grad_() for t in (case[0], case[2], case[3], case[4])]
    ref = naive_moe(ref_leaves[0], case[1], ref_leaves[1], ref_leaves[2], ref_leaves[3])
    torch.testing.assert_close(out, ref)
    assert dropped == 0
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    (ref * grad_out).sum().backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad)


def test_capacity_drops_latest_tokens_of_an_overloaded_expert():
    x, ids, w, gate_up, down = make_case(10, 4, 1, all_on_one=True)  # all 10 tokens on expert 0
    out, dropped = dispatch(x, ids, w, gate_up, down, capacity=3)
    assert dropped == 7
    ref = naive_moe(x[:3], ids[:3], w[:3], gate_up, down)
    torch.testing.assert_close(out[:3], ref)
    assert out[3:].abs().max() == 0


@pytest.mark.parametrize("counts", [[3, 0, 2], [0, 0, 4], [1]])
def test_grouped_swiglu_matches_reference(counts):
    gen = torch.Generator().manual_seed(1)
    E, D, F_ = len(counts), 6, 4
    x = torch.randn(sum(counts), D, generator=gen, dtype=torch.float64)
    gate_up = torch.randn(E, 2 * F_, D, generator=gen, dtype=torch.float64)
    down = torch.randn(E, D, F_, generator=gen, dtype=torch.float64)
    c = torch.tensor(counts)
    torch.testing.assert_close(grouped_swiglu(x, c, gate_up, down), grouped_swiglu_reference(x, c, gate_up, down))
