"""Dequantizing matmul (kernels/quant_matmul.py) on codes made by the quantizer itself
(moeops.compress.quantize.quantize_symmetric): the PyTorch path and the Triton kernel against
dequantize_symmetric + matmul, 8-bit per-channel and 4-bit block-wise, odd M / N, K one block,
K not a multiple of the kernel's K tile, one row, no rows; and the grouped variant over
expert-sorted rows (an expert with no rows, all rows on one expert). The PyTorch tests always run;
the Triton ones run under TRITON_INTERPRET=1 on CPU (set by conftest; tiny shapes) or compiled on
CUDA, and skip when triton is absent."""


import numpy as np
import pytest
import torch
from conftest import TRITON_DEVICE as DEV
from conftest import TRITON_INTERPRET as INTERPRET

from kernels.quant_matmul import (
    dequant_matmul,
    dequant_matmul_reference,
    dequant_matmul_triton,
    dequantize,
    grouped_dequant_matmul,
    grouped_dequant_matmul_reference,
    grouped_dequant_matmul_triton,
)
from moeops.compress.quantize import dequantize_symmetric, quantize_symmetric

CASES = [  # bits, block_size, M, N, K
    (8, 0, 5, 7, 48),  # per-channel, odd M and N, K < one K tile
    (8, 0, 1, 70, 100),  # one row, N over two column tiles, K ragged over two K tiles
    (8, 0, 33, 9, 64),  # M over two row tiles
    (4, 16, 3, 9, 16),  # block-wise, K = one block
    (4, 32, 17, 65, 96),  # three blocks, N ragged
    (4, 128, 2, 5, 256),  # blocks larger than the K tile
    (8, 32, 4, 5, 64),  # 8-bit block-wise (the int8 MatMul layout)
    (4, 0, 3, 6, 20),  # 4-bit per-channel
]


def quantized(shape, bits, block_size, seed=0):
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    q, s = quantize_symmetric(w, bits, block_size)
    return torch.from_numpy(q), torch.from_numpy(s)


def x_rows(M, K, seed=1, device="cpu"):
    return torch.randn(M, K, generator=torch.Generator().manual_seed(seed)).to(device)


def close(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    big = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-5, atol=1e-5 * max(1.0, big))


@pytest.mark.parametrize("bits, block_size, M, N, K", CASES)
def test_dequantize_matches_quantizer(bits, block_size, M, N, K):
    q, s = quantized((N, K), bits, block_size)
    want = dequantize_symmetric(q.numpy(), s.numpy(), bits, block_size)
    assert torch.equal(dequantize(q, s, bits, block_size), torch.from_numpy(want))


@pytest.mark.parametrize("bits, block_size, M, N, K", CASES)
def test_torch_matches_reference(bits, block_size, M, N, K):
    q, s = quantized((N, K), bits, block_size)
    x = x_rows(M, K)
    close(dequant_matmul(x, q, s, bits, block_size), dequant_matmul_reference(x, q, s, bits, block_size))


@pytest.mark.parametrize("bits, block_size, M, N, K", CASES)
def test_triton_matches_reference(triton, bits, block_size, M, N, K):
    q, s = quantized((N, K), bits, block_size)
    x = x_rows(M, K)
    want = dequant_matmul_reference(x, q, s, bits, block_size)
    close(dequant_matmul_triton(x.to(DEV), q.to(DEV), s.to(DEV), bits, block_size), want)


def test_triton_leading_dims_and_no_rows(triton):
    q, s = quantized((6, 32), 4, 16)
    q, s = q.to(DEV), s.to(DEV)
    x = x_rows(6, 32, device=DEV).view(2, 3, 32)
    y = dequant_matmul_triton(x, q, s, 4, 16)
    assert y.shape == (2, 3, 6)
    close(y, dequant_matmul(x.cpu(), q.cpu(), s.cpu(), 4, 16))
    assert dequant_matmul_triton(x[:0, 0], q, s, 4, 16).shape == (0, 6)


def test_bad_scales_and_bits():
    q, s = quantized((6, 32), 4, 16)
    with pytest.raises(ValueError, match="scales"):
        dequant_matmul(x_rows(2, 32), q, s[:, :1], 4, 16)
    with pytest.raises(ValueError, match="block_size"):
        dequant_matmul(x_rows(2, 32), q, s, 4, 24)
    with pytest.raises(ValueError, match="bits"):
        dequant_matmul(x_rows(2, 32), q, s, 3, 16)


GROUPED = [  # counts_E, bits, block_size, N, K
    ([3, 0, 17, 1], 4, 16, 9, 32),  # a middle expert empty, one expert over two row tiles
    ([0, 0, 21, 0], 8, 0, 7, 40),  # all rows on one expert
    ([1, 0, 0], 8, 0, 5, 16),  # one row
    ([0, 0, 0], 4, 16, 5, 16),  # no rows at all
]


@pytest.mark.parametrize("counts, bits, block_size, N, K", GROUPED)
def test_grouped(request, counts, bits, block_size, N, K):
    q, s = quantized((len(counts), N, K), bits, block_size)
    c = torch.tensor(counts)
    x = x_rows(int(c.sum()), K)
    want = grouped_dequant_matmul_reference(x, c, q, s, bits, block_size)
    assert want.shape == (int(c.sum()), N)
    close(grouped_dequant_matmul(x, c, q, s, bits, block_size), want)
    request.getfixturevalue("triton")
    close(grouped_dequant_matmul_triton(x.to(DEV), c.to(DEV), q.to(DEV), s.to(DEV), bits, block_size), want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits, block_size", [(8, 0), (4, 32)])
def test_triton_half_precision(triton, dtype, bits, block_size):
    """Low-precision x: codes minus the zero point are exact in x's dtype, the dot accumulates in
    fp32, y comes back in x's dtype."""
    if dtype == torch.bfloat16 and INTERPRET:
        pytest.skip("the Triton interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584)")
    q, s = quantized((33, 64), bits, block_size)
    x = x_rows(7, 64).to(dtype)
    want = dequant_matmul_reference(x.float(), q, s, bits, block_size)
    y = dequant_matmul_triton(x.to(DEV), q.to(DEV), s.to(DEV), bits, block_size)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float().cpu(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
