"""Fused linear + cross-entropy (kernels/linear_cross_entropy.py): the chunked PyTorch path and the
Triton chunk kernel against the unfused reference F.cross_entropy(F.linear(h, W).float(), y): the
loss and both gradients in fp32 (~1e-6 relative), one token, a vocabulary that is not a multiple
of the kernel's block, ignored rows, a chunk larger than N, bf16 autocast, a scaled loss, no_grad,
and bitwise determinism. The PyTorch tests always run; the Triton ones run under TRITON_INTERPRET=1
on CPU (set by conftest; tiny shapes) or compiled on CUDA, and skip when triton is absent."""


import pytest
import torch
from conftest import TRITON_DEVICE as DEV

from kernels.linear_cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_reference,
    linear_cross_entropy_triton,
)

CASES = [  # N, D, V, chunk_size, ignore every k-th row (0: none)
    (1, 16, 100, 1024, 0),  # one token, chunk > N
    (37, 16, 100, 8, 5),  # ragged last chunk, ignored rows, V = 64 + 36 (not a multiple of the block)
    (40, 24, 257, 16, 0),  # V one past a power of two
    (33, 16, 64, 64, 2),  # V exactly one block, chunk > N, half the rows ignored
]


def make(N, D, V, every, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=gen).to(device).requires_grad_()
    w = (torch.randn(V, D, generator=gen) * 0.5).to(device).requires_grad_()
    y = torch.randint(0, V, (N,), generator=gen)
    if every:
        y[::every] = -100
    return h, w, y.to(device)


def loss_and_grads(fn, h, w, y, scale=1.0, **kw):
    loss = fn(h, w, y, **kw)
    gh, gw = torch.autograd.grad(loss * scale, (h, w))
    return loss.detach(), gh, gw


def assert_close(got, want, rtol=2e-6):
    for g, r in zip(got, want):
        assert g.dtype == r.dtype and g.shape == r.shape
        err = (g.double() - r.double()).norm() / r.double().norm().clamp_min(1e-30)
        assert err < rtol, f"relative error {err:.2e}"


def check(fn, N, D, V, chunk, every, device="cpu"):
    h, w, y = make(N, D, V, every, device=device)
    got = loss_and_grads(fn, h, w, y, chunk_size=chunk)
    want = loss_and_grads(linear_cross_entropy_reference, h, w, y)
    assert got[0].dtype == torch.float32
    assert_close(got, want)


@pytest.mark.parametrize("N, D, V, chunk, every", CASES)
def test_torch_matches_reference(N, D, V, chunk, every):
    check(linear_cross_entropy, N, D, V, chunk, every)


@pytest.mark.parametrize("N, D, V, chunk, every", CASES)
def test_triton_matches_reference(triton, N, D, V, chunk, every):
    check(linear_cross_entropy_triton, N, D, V, chunk, every, device=DEV)


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_scaled_loss_no_grad_and_all_ignored(request, path):
    if path == "triton":
        request.getfixturevalue("triton")
    fn, dev = (linear_cross_entropy, "cpu") if path == "torch" else (linear_cross_entropy_triton, DEV)
    h, w, y = make(20, 16, 70, 3, device=dev)
    # a scaled loss (grad accumulation) scales both grads
    assert_close(loss_and_grads(fn, h, w, y, scale=-2.5, chunk_size=8),
                 loss_and_grads(linear_cross_entropy_reference, h, w, y, scale=-2.5))
    # only one input needs a gradient
    gw, = torch.autograd.grad(fn(h.detach(), w, y, chunk_size=8), (w,))
    gw_ref, = torch.autograd.grad(linear_cross_entropy_reference(h.detach(), w, y), (w,))
    assert_close([gw], [gw_ref])
    with torch.no_grad():  # evaluation: the loss alone, same value
        loss = fn(h, w, y, chunk_size=8)
    assert not loss.requires_grad
    assert torch.allclose(loss, linear_cross_entropy_reference(h, w, y), rtol=2e-6)
    # every target ignored: nan like F.cross_entropy, zero grads
    y_all = torch.full_like(y, -100)
    loss, gh, gw = loss_and_grads(fn, h, w, y_all, chunk_size=8)
    assert loss.isnan() and not gh.any() and not gw.any()


def test_bad_input():
    h, w, y = make(4, 8, 10, 0)
    with pytest.raises(ValueError, match="outside"):
        linear_cross_entropy(h, w, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match="h \\[N, D\\]"):
        linear_cross_entropy(h, w, y[:3])


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_bf16_autocast(request, path):
    """Under CPU autocast the matmuls run in bf16 like F.linear's; fp32 loss, grads in the inputs'
    dtypes, close to the reference under the same autocast and to fp32."""
    if path == "triton":
        request.getfixturevalue("triton")
    fn, dev = (linear_cross_entropy, "cpu") if path == "torch" else (linear_cross_entropy_triton, DEV)
    h, w, y = make(40, 32, 150, 6, device=dev)
    with torch.autocast(dev, torch.bfloat16):
        got = loss_and_grads(fn, h, w, y, chunk_size=16)
        want = loss_and_grads(linear_cross_entropy_reference, h, w, y)
    fp32 = loss_and_grads(linear_cross_entropy_reference, h, w, y)
    assert [t.dtype for t in got] == [torch.float32] * 3
    assert_close(got, want, rtol=2e-2)
    assert_close(got, fp32, rtol=2e-2)
    # bf16 activations (a bf16 norm output): grad_h comes back bf16, grad_W fp32
    hb = h.detach().bfloat16().requires_grad_()
    with torch.autocast(dev, torch.bfloat16):
        loss, gh, gw = loss_and_grads(fn, hb, w, y, chunk_size=16)
    assert (gh.dtype, gw.dtype) == (torch.bfloat16, torch.float32)
    assert abs(loss - fp32[0]) / fp32[0] < 2e-2


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_deterministic(request, path):
    if path == "triton":
        request.getfixturevalue("triton")
    fn, dev = (linear_cross_entropy, "cpu") if path == "torch" else (linear_cross_entropy_triton, DEV)
    h, w, y = make(37, 16, 100, 5, device=dev)
    a = loss_and_grads(fn, h, w, y, chunk_size=8)
    b = loss_and_grads(fn, h, w, y, chunk_size=8)
    for x, z in zip(a, b):
        assert torch.equal(x, z)


def test_triton_path_agrees_with_torch_path(triton):
    h, w, y = make(37, 16, 100, 5, device=DEV)
    assert_close(loss_and_grads(linear_cross_entropy_triton, h, w, y, chunk_size=8),
                 loss_and_grads(linear_cross_entropy, h, w, y, chunk_size=8))
