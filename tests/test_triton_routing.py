"""Routing and permute/unpermute: the Triton kernels (under TRITON_INTERPRET=1 on CPU, compiled on
CUDA) against each module's reference and its PyTorch path, outputs and gradients, over odd shapes
(one token, an expert with no rows, every row on one expert, sizes that are not multiples of the
block); and the CPU autograd gathers of permute/unpermute against torch autograd of the naive
formulation. Triton tests skip when triton is not installed; the CPU ones always run."""

import pytest
import torch
from test_kernels import ROUTING_CASES

from kernels.permute import permute, permute_reference, permute_triton, unpermute, unpermute_reference, unpermute_triton
from kernels.routing import route, route_reference, route_triton


def by_id(ids_TK, *tensors_TK):
    """Sort each token's K slots by expert id: routes agree as sets whatever the slot order."""
    order_TK = ids_TK.argsort(dim=1)
    return [t.gather(1, order_TK) for t in (ids_TK, *tensors_TK)]


def route_grads(routed, logits, gen):
    """d(logits) of a random linear function of scores_TE and the (id-sorted) weights."""
    scores, ids, weights = routed
    _, weights = by_id(ids, weights)
    grad_scores = torch.randn(scores.shape, generator=gen)
    grad_weights = torch.randn(weights.shape, generator=gen)
    return torch.autograd.grad((scores * grad_scores).sum() + (weights * grad_weights).sum(), logits)[0]


EXTRA_ROUTING = [  # T, E, K, n_group, topk_group, score_func, norm
    (70, 20, 3, 4, 2, "softmax", True),  # T spans two blocks of 64, E pads to 32
    (33, 10, 2, 5, 3, "sigmoid", True),
]


@pytest.mark.parametrize("T,E,K,G,TG,score_func,norm", ROUTING_CASES + EXTRA_ROUTING)
def test_route_triton_matches_reference_and_torch(triton, T, E, K, G, TG, score_func, norm):
    gen = torch.Generator().manual_seed(T * 100 + E)
    logits = torch.randn(T, E, generator=gen).requires_grad_()
    bias = torch.randn(E, generator=gen) * 0.1
    got = route_triton(logits, bias, K, G, TG, score_func, norm, 2.5)
    want = route(logits, bias, K, G, TG, score_func, norm, 2.5)
    ref_ids, ref_w = route_reference(logits.detach(), bias, K, G, TG, score_func, norm, 2.5)

    ids, w = by_id(got[1], got[2])
    assert ids.dtype == torch.int64 and torch.equal(ids, ref_ids) and torch.equal(ids, by_id(want[1])[0])
    torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(route_grads(got, logits, torch.Generator().manual_seed(1)),
                               route_grads(want, logits, torch.Generator().manual_seed(1)))


def test_route_triton_groups_of_one_expert_match_reference(triton):
    """A group's score is its one expert's (torch's top-2 path cannot run this; the reference can)."""
    logits = torch.randn(9, 5, generator=torch.Generator().manual_seed(4))
    bias = torch.linspace(-0.1, 0.1, 5)
    _, ids, w = route_triton(logits, bias, 2, 5, 3, "sigmoid", True, 1.0)
    ref_ids, ref_w = route_reference(logits, bias, 2, 5, 3, "sigmoid", True, 1.0)
    ids, w = by_id(ids, w)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w)


def test_route_triton_ties_pick_lowest_index(triton):
    """Equal scores everywhere: the lowest groups, then the lowest experts, as the reference."""
    logits, bias = torch.zeros(3, 8), torch.zeros(8)
    _, ids, _ = route_triton(logits, bias, 3, 4, 2, "sigmoid", True, 1.0)
    ref_ids, _ = route_reference(logits, bias, 3, 4, 2, "sigmoid", True, 1.0)
    assert ids.tolist() == ref_ids.tolist() == [[0, 1, 2]] * 3


def test_route_triton_grad_through_scores_only_and_weights_only(triton):
    logits = torch.randn(6, 8, generator=torch.Generator().manual_seed(2)).requires_grad_()
    bias = torch.zeros(8)
    for pick in (0, 2):  # scores_TE alone (the balance loss), weights alone (the combine)
        got = route_triton(logits, bias, 2, 2, 1, "softmax", True, 1.5)[pick]
        want = route(logits, bias, 2, 2, 1, "softmax", True, 1.5)[pick]
        if pick == 2:
            got, want = got.sum(1), want.sum(1)  # slot order differs; the per-token sum does not
        grad_out = torch.linspace(-1, 1, got.numel()).view_as(got)
        torch.testing.assert_close(torch.autograd.grad((got * grad_out).sum(), logits)[0],
                                   torch.autograd.grad((want * grad_out).sum(), logits)[0])


def test_huge_bias_routes_every_token_to_one_expert_and_permute_follows(triton):
    """All rows land on expert 2 and experts 0, 1, 3 get none; weights still come from the
    unbiased scores, and the Triton dispatch equals the torch one."""
    gen = torch.Generator().manual_seed(3)
    T, E, D = 21, 4, 24
    logits = torch.randn(T, E, generator=gen).requires_grad_()
    bias = torch.tensor([0.0, 0.0, 1e4, 0.0])
    scores, ids, w = route_triton(logits, bias, 1, norm_topk_prob=False)
    assert ids.flatten().tolist() == [2] * T
    torch.testing.assert_close(w[:, 0], scores[:, 2])

    x = torch.randn(T, D, generator=gen)
    x_MD, counts, order, dropped = permute_triton(x, ids, E)
    assert counts.tolist() == [0, 0, T, 0] and dropped == 0
    assert torch.equal(x_MD, x)
    torch.testing.assert_close(unpermute_triton(x_MD, order, w), unpermute(x_MD, order, w))


def make_dispatch(T, E, K, D, all_on_one=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen)
    if all_on_one:
        ids = torch.stack([torch.arange(K)] * T)  # every token on experts 0..K-1
    else:
        ids = torch.stack([torch.randperm(E - 1, generator=gen)[:K] for _ in range(T)])  # expert E-1 idle
    return x, ids, torch.rand(T, K, generator=gen)


def same(a, b) -> bool:
    """Bitwise-equal tensors (same dtype, shape, values) or equal Python values."""
    return torch.equal(a, b) and a.dtype == b.dtype if torch.is_tensor(a) else a == b


def fake_experts(x_MD):
    """A row-wise op standing in for the experts: the gradient into permute's output is not all ones."""
    return x_MD * torch.linspace(0.5, 1.5, x_MD.shape[1], dtype=x_MD.dtype) + 0.25


def run_dispatch(permute_fn, unpermute_fn, x, ids, w, E, capacity, grad_out_TD):
    """permute -> fake experts -> unpermute; outputs and gradients."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    x_MD, counts, order, dropped = permute_fn(x, ids, E, capacity)
    y_MD = fake_experts(x_MD)
    out = unpermute_fn(y_MD, order, w)
    grads = torch.autograd.grad((out * grad_out_TD).sum(), [x, w, y_MD])
    return (x_MD, counts, order, dropped, out), grads


DISPATCH_CASES = [  # T, E, K, D, all_on_one, capacity
    (1, 4, 1, 8, False, 0),  # one token
    (1, 4, 2, 8, False, 0),
    (19, 6, 2, 40, False, 0),  # T not a multiple of 16, D not of 16; expert 5 has no rows
    (17, 5, 1, 130, True, 0),  # every row on expert 0; D spans two blocks of 128
    (12, 8, 3, 8, True, 0),
    (10, 4, 1, 16, True, 3),  # capacity: 7 of 10 rows dropped
    (23, 6, 2, 24, False, 6),
]


@pytest.mark.parametrize("T,E,K,D,all_on_one,capacity", DISPATCH_CASES)
def test_permute_unpermute_triton_equal_torch_path(triton, T, E, K, D, all_on_one, capacity):
    x, ids, w = make_dispatch(T, E, K, D, all_on_one)
    grad_out = torch.randn(T, D, generator=torch.Generator().manual_seed(5))
    (x_MD, counts, order, dropped, out), grads = run_dispatch(permute_triton, unpermute_triton, x, ids, w, E,
                                                               capacity, grad_out)
    want, want_grads = run_dispatch(permute, unpermute, x, ids, w, E, capacity, grad_out)
    assert all(same(a, b) for a, b in zip((x_MD, counts, order, dropped), want))
    # The CPU path combines with one BLAS bmm, whose rounding (FMA or not) depends on the CPU.
    torch.testing.assert_close(out, want[4])
    assert torch.equal(grads[0], want_grads[0]) and torch.equal(grads[2], want_grads[2])  # d x, d y: gathers
    torch.testing.assert_close(grads[1], want_grads[1])  # d w: a dot over D, summed in another order
    assert (dropped > 0) == (capacity > 0)
    if not capacity:
        ref_x_MD, ref_counts, ref_order = permute_reference(x, ids, E)
        assert torch.equal(x_MD, ref_x_MD) and torch.equal(counts, ref_counts) and torch.equal(order, ref_order)
    torch.testing.assert_close(out, unpermute_reference(fake_experts(x_MD), order, w))


def test_permute_unpermute_triton_float64_and_repeatable(triton):
    x, ids, w = (t.double() if t.is_floating_point() else t for t in make_dispatch(9, 4, 2, 20))
    grad_out = torch.randn(9, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    first = run_dispatch(permute_triton, unpermute_triton, x, ids, w, 4, 0, grad_out)
    again = run_dispatch(permute_triton, unpermute_triton, x, ids, w, 4, 0, grad_out)
    want = run_dispatch(permute, unpermute, x, ids, w, 4, 0, grad_out)
    assert first[1][0].dtype == torch.float64
    assert all(same(a, b) for a, b in zip(first[0] + first[1], again[0] + again[1]))
    for a, b in zip(first[1], want[1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# --- the CPU autograd Functions (no Triton needed) ---------------------------------------------

def naive_dispatch(x, ids, w, E, capacity):
    """The gather formulation left to torch autograd (its backward scatter-adds)."""
    T, K = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    if capacity:
        counts = torch.bincount(flat, minlength=E)
        rank = torch.arange(order.numel()) - (torch.cumsum(counts, 0) - counts)[flat[order]]
        order = order[rank < capacity]
    x_MD = x[order // K]
    out = torch.zeros_like(x).index_add(0, order // K, fake_experts(x_MD) * w.reshape(-1)[order][:, None])
    return out


@pytest.mark.parametrize("T,E,K,D,all_on_one,capacity", DISPATCH_CASES)
def test_cpu_permute_unpermute_match_naive_autograd(T, E, K, D, all_on_one, capacity):
    x, ids, w = (t.double() if t.is_floating_point() else t for t in make_dispatch(T, E, K, D, all_on_one))
    grad_out = torch.randn(T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    _, grads = run_dispatch(permute, unpermute, x, ids, w, E, capacity, grad_out)
    x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = naive_dispatch(x2, ids, w2, E, capacity)
    want = torch.autograd.grad((out * grad_out).sum(), [x2, w2])
    torch.testing.assert_close(grads[0], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[1], want[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("capacity", [0, 2])
def test_cpu_permute_unpermute_gradcheck(capacity):
    x, ids, w = (t.double() if t.is_floating_point() else t for t in make_dispatch(5, 4, 2, 3, seed=8))
    order = permute(x, ids, 4, capacity)[2]
    y = torch.randn(order.numel(), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    assert torch.autograd.gradcheck(lambda x_: permute(x_, ids, 4, capacity)[0], (x.requires_grad_(),))
    assert torch.autograd.gradcheck(lambda y_, w_: unpermute(y_, order, w_), (y.requires_grad_(), w.requires_grad_()))


def test_cpu_permute_unpermute_bitwise_repeatable():
    x, ids, w = make_dispatch(40, 6, 3, 16, seed=10)
    grad_out = torch.randn(40, 16, generator=torch.Generator().manual_seed(11))
    first = run_dispatch(permute, unpermute, x, ids, w, 6, 0, grad_out)
    again = run_dispatch(permute, unpermute, x, ids, w, 6, 0, grad_out)
    assert all(same(a, b) for a, b in zip(first[0] + first[1], again[0] + again[1]))
