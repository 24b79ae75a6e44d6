"""Int8 gradient all-reduce: the quantizer as pure functions, and the all-reduce on 2 gloo processes.

The distributed scenarios run once per module in one spawn of 2 CPU workers (each saves what it saw to
rank<r>.pt); the tests then check those results against exact fp32 arithmetic done here."""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moeops.train import compress
from moeops.train.compress import Int8GradAllReduce, dequantize_blocks, quantize_blocks, ring_allreduce_bytes

WORLD = 2
BLOCK = 256
# Odd sizes, blocks that straddle parameters, magnitudes that differ by 1e4 between parameters.
SHAPES = [(7, 13), (1000,), (3, 5, 17), (33,), (4, 4)]
MAGNITUDES = [1.0, 1e-3, 10.0, 0.1, 1.0]
NONE_ON = {3: {0}, 4: {0, 1}}  # param index -> ranks whose grad is None (param 4: None everywhere)
EF_STEPS = 64
BYTES_NUMEL = 100_003


# ---------------------------------------------------------------- pure functions


def test_ring_allreduce_bytes():
    assert ring_allreduce_bytes(100, 4, 1) == 0
    assert ring_allreduce_bytes(100, 4, 2) == 400
    assert ring_allreduce_bytes(1000, 2, 4) == 3000  # 2 * 3/4 * 1000 * 2


def test_quantize_integers_round_trip_exactly():
    x = torch.arange(-127, 129, dtype=torch.float32)  # 256 values, absmax 128 in the last slot
    x[-1] = 0.0
    q, scales = quantize_blocks(x, 256)
    assert q.dtype == torch.int8 and scales.tolist() == [1.0]
    assert torch.equal(dequantize_blocks(q, scales, 256), x)


def test_quantize_all_zero_block_and_error_bound():
    torch.manual_seed(0)
    x = torch.randn(4 * 64) * torch.tensor([1e-30, 0.0, 1.0, 1e4]).repeat_interleave(64)
    q, scales = quantize_blocks(x, 64)
    assert scales.shape == (4,) and scales[1] == 0
    assert torch.equal(q[64:128], torch.zeros(64, dtype=torch.int8))
    deq = dequantize_blocks(q, scales, 64)
    assert torch.isfinite(deq).all()
    assert torch.equal(deq[64:128], torch.zeros(64))
    err = (deq - x).abs().view(4, 64).amax(dim=1)
    assert (err <= scales / 2 * (1 + 1e-5)).all(), (err, scales)
    # symmetric range: the largest magnitude maps to +-127, never -128
    assert q.min() >= -127 and q.max() <= 127
    assert (q.view(4, 64).abs().amax(dim=1) == torch.tensor([127, 0, 127, 127], dtype=torch.int8)).all()


def test_quantize_block_edges():
    x = torch.tensor([3.0, -2.0, 0.5, 0.0, -7.0])
    q, scales = quantize_blocks(x, 1)  # one scale per element: exact up to fp32 rounding
    torch.testing.assert_close(dequantize_blocks(q, scales, 1), x, rtol=1e-6, atol=0)
    q, scales = quantize_blocks(torch.zeros(0), 8)
    assert q.numel() == 0 and scales.numel() == 0
    with pytest.raises(ValueError, match="multiple of 4"):
        quantize_blocks(torch.zeros(6), 4)
    with pytest.raises(ValueError):
        quantize_blocks(torch.zeros(2, 4), 4)


def test_quantize_non_finite_stays_in_its_block():
    x = torch.ones(12)
    x[1] = float("inf")
    x[9] = float("nan")
    deq = dequantize_blocks(*quantize_blocks(x, 4), 4)
    assert not torch.isfinite(deq[:4]).any() and not torch.isfinite(deq[8:]).any()
    assert torch.equal(deq[4:8], torch.ones(4))


def test_world_one_only_divides():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    a, b = torch.nn.Parameter(torch.zeros(3, 5)), torch.nn.Parameter(torch.zeros(7))
    a.grad = torch.randn(3, 5)
    expected = a.grad / 4
    hook = Int8GradAllReduce([a, b], divisor=4)
    hook()
    assert torch.equal(a.grad, expected) and torch.equal(b.grad, torch.zeros(7))
    assert hook.bytes_sent == 0 and hook.fp32_bytes == 0


# ---------------------------------------------------------------- 2 gloo processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_grads(rank: int, seed: int) -> list[torch.Tensor | None]:
    gen = torch.Generator().manual_seed(1000 * seed + rank)
    grads = [torch.randn(shape, generator=gen) * mag for shape, mag in zip(SHAPES, MAGNITUDES)]
    return [None if rank in NONE_ON.get(i, ()) else g for i, g in enumerate(grads)]


def _params(grads: list[torch.Tensor | None]) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in SHAPES]
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()
    return params


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    res: dict = {}
    try:
        # accuracy, determinism (a second fresh instance on the same input), and divisor=1 (a sum)
        grads = _rank_grads(rank, seed=1)
        outs = []
        for divisor in (None, None, 1):
            params = _params(grads)
            Int8GradAllReduce(params, block=BLOCK, divisor=divisor)()
            outs.append([p.grad.clone() for p in params])
        res["inputs"], res["mean"], res["mean_again"], res["sum"] = grads, outs[0], outs[1], outs[2]

        # error feedback: the same gradient every step
        grads = _rank_grads(rank, seed=2)
        params = _params(grads)
        hook = Int8GradAllReduce(params, block=BLOCK)
        total = None
        for step in range(EF_STEPS):
            for p, g in zip(params, grads):
                p.grad = None if g is None else g.clone()
            hook()
            flat = torch.cat([p.grad.reshape(-1).double() for p in params])
            if step == 0:
                res["ef_first"] = flat.clone()
            total = flat if total is None else total + flat
        res["ef_inputs"], res["ef_running_mean"] = grads, total / EF_STEPS

        # bytes on the wire for a large buffer, and what the collectives were actually handed
        params = [torch.nn.Parameter(torch.zeros(BYTES_NUMEL))]
        params[0].grad = torch.randn(BYTES_NUMEL)
        hook = Int8GradAllReduce(params, block=BLOCK)
        handed = []  # (collective, dtype, bytes of the tensor this rank sends from)
        real_a2a, real_gather = dist.all_to_all_single, compress._all_gather

        def a2a(output, input, *args, **kw):
            handed.append(("all_to_all", str(input.dtype), input.numel() * input.element_size()))
            return real_a2a(output, input, *args, **kw)

        def gather(output, input, *args, **kw):
            handed.append(("all_gather", str(input.dtype), input.numel() * input.element_size()))
            return real_gather(output, input, *args, **kw)

        dist.all_to_all_single, compress._all_gather = a2a, gather
        try:
            hook()
            hook()
        finally:
            dist.all_to_all_single, compress._all_gather = real_a2a, real_gather
        res["bytes_sent"], res["fp32_bytes"], res["handed"] = hook.bytes_sent, hook.fp32_bytes, handed

        # a non-finite step shows up in the output and does not poison the next one
        params = [torch.nn.Parameter(torch.zeros(1000))]
        hook = Int8GradAllReduce(params, block=BLOCK)
        params[0].grad = torch.ones(1000)
        if rank == 0:
            params[0].grad[5] = float("inf")
        hook()
        res["overflow_out"] = params[0].grad.clone()
        params[0].grad = torch.full((1000,), 0.5)
        hook()
        res["after_overflow_out"] = params[0].grad.clone()
        res["residuals_finite"] = bool(torch.isfinite(hook.worker_residual_N).all()
                                       and torch.isfinite(hook.server_residual_C).all())
    finally:
        dist.destroy_process_group()
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("compress")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _flat(grads: list[torch.Tensor | None]) -> torch.Tensor:
    return torch.cat([torch.zeros(s).reshape(-1) if g is None else g.reshape(-1) for s, g in zip(SHAPES, grads)])


def _padded_blocks(x: torch.Tensor) -> torch.Tensor:
    unit = WORLD * BLOCK
    return torch.nn.functional.pad(x, (0, -x.numel() % unit)).view(-1, BLOCK)


def test_mean_close_to_exact_and_identical_on_all_ranks(runs):
    inputs = [_flat(r["inputs"]) for r in runs]
    exact = sum(inputs) / WORLD
    out = _flat(runs[0]["mean"])
    for r in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0]["mean"], r["mean"])), "ranks disagree"
    assert [tuple(g.shape) for g in runs[0]["mean"]] == SHAPES  # None grads were materialized
    # per block: half a quantization step from the workers, half from the server -> absmax/127 overall
    absmax_B = torch.stack([_padded_blocks(x).abs().amax(dim=1) for x in inputs]).amax(dim=0)
    err_B = _padded_blocks(out - exact).abs().amax(dim=1)
    assert (err_B <= absmax_B / 127 * 1.001).all(), (err_B / absmax_B * 127).max()


def test_deterministic(runs):
    for r in runs:
        assert all(torch.equal(a, b) for a, b in zip(r["mean"], r["mean_again"]))


def test_divisor_one_gives_sum(runs):
    inputs = [_flat(r["inputs"]) for r in runs]
    exact = sum(inputs)
    absmax_B = torch.stack([_padded_blocks(x).abs().amax(dim=1) for x in inputs]).amax(dim=0)
    err_B = _padded_blocks(_flat(runs[0]["sum"]) - exact).abs().amax(dim=1)
    # workers' errors add up (2 * half a step), the server's step is up to twice as large (sum, not mean)
    assert (err_B <= 2 * absmax_B / 127 * 1.001).all()


def test_error_feedback_running_mean_converges(runs):
    exact = (sum(_flat(r["ef_inputs"]) for r in runs) / WORLD).double()
    first = (runs[0]["ef_first"] - exact).abs().max().item()
    running = (runs[0]["ef_running_mean"] - exact).abs().max().item()
    assert first > 0
    assert running < 0.1 * first, (running, first, running / first)


def test_bytes_at_least_70_percent_fewer(runs):
    sent, fp32 = runs[0]["bytes_sent"], runs[0]["fp32_bytes"]
    padded = -(-BYTES_NUMEL // (WORLD * BLOCK)) * WORLD * BLOCK
    assert fp32 == 2 * ring_allreduce_bytes(BYTES_NUMEL, 4, WORLD)  # two calls
    assert sent == 2 * 2 * (WORLD - 1) * (padded // WORLD) * (1 + 4 / BLOCK)
    assert sent <= 0.30 * fp32, sent / fp32


def test_bytes_equal_what_the_collectives_were_handed(runs):
    """Counted independently from the tensors each rank passed to all_to_all (it keeps 1/W of its
    input) and all_gather (its input goes to W - 1 ranks): int8 values and fp32 scales only."""
    for r in runs:
        handed = r["handed"]
        assert {(kind, dtype) for kind, dtype, _ in handed} == {
            (kind, dtype) for kind in ("all_to_all", "all_gather") for dtype in ("torch.int8", "torch.float32")}
        assert len(handed) == 2 * 4  # two calls, four collectives each
        wire = sum(n * (WORLD - 1) // WORLD if kind == "all_to_all" else n * (WORLD - 1) for kind, _, n in handed)
        assert r["bytes_sent"] == wire


def test_overflow_propagates_and_recovers(runs):
    for r in runs:
        assert not torch.isfinite(r["overflow_out"]).all()
        assert torch.isfinite(r["overflow_out"][BLOCK:]).all()  # only the block holding the inf
        assert r["residuals_finite"]
        torch.testing.assert_close(r["after_overflow_out"], torch.full((1000,), 0.5), rtol=0, atol=1 / 127)
