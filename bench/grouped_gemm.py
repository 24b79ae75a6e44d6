"""Grouped SwiGLU expert GEMM on a CUDA GPU: the Triton kernel's TFLOP/s against dense cuBLAS
matmuls of the same FLOPs. CUDA only: without a CUDA device it prints "skipped: no CUDA device"
and exits 0, writing nothing.

    python -m bench.grouped_gemm [--shapes small,large] [--repeats 5] [--iters 20] [--dtype bf16]

Ours: kernels.grouped_mlp.grouped_swiglu_triton(x_MD, counts_E, gate_up_EXD, down_EDF) over M
expert-sorted rows (counts from a seeded uniform top-k of T tokens over E experts): per row
[gate; up] = W1_e x, y = W2_e (silu(gate) * up). The peer: one dense torch.matmul pair of the same
FLOPs, M×D @ D×2F and M×F @ F×D (cuBLAS; no activation, no grouping: the ceiling a grouped GEMM
aims at). Forward (6·M·D·F FLOPs) and forward + backward (18·M·D·F: input and weight gradients)
each. Each repeat times `iters` calls of ours then of the peer with CUDA events; ratio = our
TFLOP/s / dense TFLOP/s per repeat, median (min-max); the target (>= 0.70) is met only when the
lowest per-repeat ratio meets it. Once per shape the kernel's output is checked against a
per-expert PyTorch loop in fp32.

Shapes: small = the `small` flavor's MoE layer at 16 × 256 tokens (D 256, F 128, E 16, K 4);
large = DeepSeek-V2-Lite's experts (D 2048, F 1408, E 64, K 6) at 4096 tokens.
Writes bench/results/grouped_gemm.json (or $MOEOPS_BENCH_OUT/grouped_gemm.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from bench.common import print_spread, save, spread, verdict

TARGET = 0.70  # our TFLOP/s over dense cuBLAS's, same FLOPs
SHAPES = {  # name -> (tokens T, D, F, E, K)
    "small": (4096, 256, 128, 16, 4),
    "large": (4096, 2048, 1408, 64, 6),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOL = {"bf16": 2e-2, "fp16": 5e-3, "fp32": 5e-3}  # max |ours - fp32 loop| / max |loop|; fp32 runs as TF32 in tl.dot


def routed_counts(T: int, E: int, K: int, seed: int) -> torch.Tensor:
    """Rows per expert when each of T tokens picks K distinct experts uniformly at random."""
    gen = torch.Generator().manual_seed(seed)
    topk_ids_TK = torch.rand(T, E, generator=gen).topk(K, dim=1).indices
    return torch.bincount(topk_ids_TK.flatten(), minlength=E)


def loop_reference(x_MD, counts_E, gate_up_EXD, down_EDF) -> torch.Tensor:
    """One fp32 matmul pair per expert on its slice of rows."""
    outs = []
    for e, x_mD in enumerate(torch.split(x_MD.float(), counts_E.tolist())):
        gate_mF, up_mF = F.linear(x_mD, gate_up_EXD[e].float()).chunk(2, dim=-1)
        outs.append(F.linear(F.silu(gate_mF) * up_mF, down_EDF[e].float()))
    return torch.cat(outs)


def time_ms(fn, iters: int, dev: str) -> float:
    """Mean milliseconds per call: CUDA events on a GPU (a wall clock elsewhere: the interpreter smoke test)."""
    if dev != "cuda":
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) * 1e3 / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def shape_fns(grouped, T, D, F_, E, K, dtype, seed: int, dev: str) -> tuple[dict, int, float]:
    """{(impl, mode): fn} for one shape, its row count M, and the kernel's relative error against the fp32 loop."""
    counts_E = routed_counts(T, E, K, seed).to(dev)
    M = int(counts_E.sum())
    gen = torch.Generator(device=dev).manual_seed(seed)
    rnd = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen, device=dev) * scale).to(dtype)  # noqa: E731
    x_MD, g_MD = rnd(M, D), rnd(M, D)
    gate_up_EXD, down_EDF = rnd(E, 2 * F_, D, scale=D**-0.5), rnd(E, D, F_, scale=F_**-0.5)
    a_MD, b_MF = rnd(M, D), rnd(M, F_)  # the dense peer's two operands and weights
    w1_DX, w2_FD = rnd(D, 2 * F_, scale=D**-0.5), rnd(F_, D, scale=F_**-0.5)
    g1_MX, g2_MD = rnd(M, 2 * F_), rnd(M, D)

    with torch.no_grad():
        y = grouped(x_MD, counts_E, gate_up_EXD, down_EDF)
        ref = loop_reference(x_MD, counts_E, gate_up_EXD, down_EDF)
        err = float((y.float() - ref).abs().max() / ref.abs().max())

    leaves = [t.requires_grad_(True) for t in (x_MD, gate_up_EXD, down_EDF, a_MD, b_MF, w1_DX, w2_FD)]

    def clear():
        for t in leaves:
            t.grad = None

    def ours_fwd():
        with torch.no_grad():
            grouped(x_MD, counts_E, gate_up_EXD, down_EDF)

    def dense_fwd():
        with torch.no_grad():
            a_MD @ w1_DX
            b_MF @ w2_FD

    def ours_fwd_bwd():
        grouped(x_MD, counts_E, gate_up_EXD, down_EDF).backward(g_MD)
        clear()

    def dense_fwd_bwd():
        torch.autograd.backward([a_MD @ w1_DX, b_MF @ w2_FD], [g1_MX, g2_MD])
        clear()

    fns = {("ours", "fwd"): ours_fwd, ("dense", "fwd"): dense_fwd,
           ("ours", "fwd+bwd"): ours_fwd_bwd, ("dense", "fwd+bwd"): dense_fwd_bwd}
    return fns, M, err


def run(shapes: list[str], repeats: int, iters: int, dtype_name: str, grouped, seed: int = 0,
        dev: str = "cuda") -> dict:
    dtype = DTYPES[dtype_name]
    # fp32: tl.dot runs it as TF32 on tensor cores; let cuBLAS do the same, or the peer is handicapped
    torch.backends.cuda.matmul.allow_tf32 = dtype == torch.float32
    per_shape, ratio_spread = {}, {}
    for name in shapes:
        T, D, F_, E, K = SHAPES[name]
        fns, M, err = shape_fns(grouped, T, D, F_, E, K, dtype, seed, dev)
        if err > TOL[dtype_name]:
            raise AssertionError(f"grouped_swiglu_triton disagrees with the per-expert loop on {name}: "
                                 f"rel err {err:.3g} > {TOL[dtype_name]:g}")
        for fn in fns.values():  # warm-up: Triton compiles and autotunes here
            fn()
            fn()
        ms = {k: [] for k in fns}
        for _ in range(repeats):
            for k, fn in fns.items():
                ms[k].append(time_ms(fn, iters, dev))
        flops = {"fwd": 6 * M * D * F_, "fwd+bwd": 18 * M * D * F_}
        tflops = {f"{impl} {mode}": spread((flops[mode] / (t * 1e-3) / 1e12 for t in v), 2)
                  for (impl, mode), v in ms.items()}
        for mode in flops:
            ratio_spread[f"{name} {mode}"] = spread(
                (d / o for o, d in zip(ms[("ours", mode)], ms[("dense", mode)])), 3)
        per_shape[name] = {"tokens": T, "rows": M, "dim": D, "inter_dim": F_, "experts": E, "top_k": K,
                           "flops": flops, "rel_err_vs_fp32_loop": err, "tflops": tflops,
                           "ms": {f"{impl} {mode}": round(sorted(v)[len(v) // 2], 4) for (impl, mode), v in ms.items()}}
    targets = {k: {"target": TARGET, "higher_is_better": True} for k in ratio_spread}
    return {"gpu": torch.cuda.get_device_name() if dev == "cuda" else None, "dtype": dtype_name,
            "tf32": dtype == torch.float32, "repeats": repeats, "iters_per_repeat": iters,
            "shapes": per_shape, "ratios": {k: v["median"] for k, v in ratio_spread.items()},
            "ratio_spread": ratio_spread, "targets": targets,
            "verdicts": {k: verdict(v, TARGET) for k, v in ratio_spread.items()},
            "note": "ratio = our TFLOP/s / dense cuBLAS TFLOP/s of the same FLOPs (M×D @ D×2F and M×F @ F×D, "
                    "no activation), per repeat; fwd+bwd includes input and weight gradients on both sides"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.grouped_gemm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="small,large", help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20, help="calls per repeat and implementation")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    a = ap.parse_args(argv)
    shapes = [s.strip() for s in a.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or not shapes:
        raise SystemExit(f"error: --shapes: unknown {unknown or shapes}; one or more of {', '.join(SHAPES)}")
    if a.repeats < 1 or a.iters < 1:
        raise SystemExit("error: --repeats and --iters must be >= 1")
    if not torch.cuda.is_available():
        print("skipped: no CUDA device (torch.cuda.is_available() is False): the Triton grouped GEMM "
              "benchmark runs on a GPU only; nothing written")
        return
    from kernels import grouped_mlp

    grouped = getattr(grouped_mlp, "grouped_swiglu_triton", None)
    if grouped_mlp.triton is None or grouped is None:
        why = "triton is not importable" if grouped_mlp.triton is None else "it has no grouped_swiglu_triton"
        print(f"error: kernels.grouped_mlp: {why} (pip install triton)", file=sys.stderr)
        raise SystemExit(1)
    result = run(shapes, a.repeats, a.iters, a.dtype, grouped)
    print(json.dumps({k: {"rows": v["rows"], "tflops": {n: s["median"] for n, s in v["tflops"].items()},
                          "rel_err": v["rel_err_vs_fp32_loop"]} for k, v in result["shapes"].items()}, indent=2))
    print_spread(result, f"grouped GEMM / dense cuBLAS, {a.dtype}", width=24)
    print(f"written {save('grouped_gemm', 'bench.grouped_gemm', argv, result)}")


if __name__ == "__main__":
    main()
