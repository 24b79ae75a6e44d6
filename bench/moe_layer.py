"""MoE layer forward + backward throughput: ours (moeops.model.moe.MoE) vs transformers'
DeepseekV3MoE and DeepSpeed's MoE layer at the same config, tokens, dtype and threads,
interleaved in one process.

    python -m bench.moe_layer [--flavor small] [--batch 16] [--seq 256] [--repeats 5]
                              [--device cuda|cpu] [--dtype fp32|bf16] [--iters N]

The peers:
- transformers: DeepseekV3MoE built from moeops.model.hf's config mapping, with the experts
  implementation DeepseekV3ForCausalLM picks by default (grouped_mm; --hf-experts to change it),
  and our weights copied in: both compute the same function, and the script asserts once that
  their outputs and input gradients agree (relative max error under a bound per device/dtype).
- DeepSpeed: deepspeed.moe.layer.MoE with an expert of the same SwiGLU shape (our MLP, D -> F),
  the same E and top-k, dropless (drop_tokens=False) and without random token selection, plus the
  same shared expert MLP added outside it (DeepSpeed's layer has none), so it does the same matmul
  work. Its gate is its own (softmax top-k, GShard dispatch to an E x capacity buffer): a
  different function, so only the shape and finiteness of its output are checked. At ep_size 1 it
  never touches a process group (no all-to-all), so none is created.

On CUDA our layer runs the Triton kernels by itself (kernels/: the dispatch picks Triton for CUDA
tensors when triton is importable); the result records which path each kernel module took.
Each repeat times `iters` forward + backward steps of each layer back to back (input gradient
included, parameter gradients cleared each step); ratio = peer step time / ours, per repeat,
reported as median (min-max). Targets (GPU): >= 2x transformers and >= 3x DeepSpeed, met only
when the lowest per-repeat ratio meets it; on CPU the ratios are reported with verdict "GPU only".
Writes bench/results/moe_layer.json (or $MOEOPS_BENCH_OUT/moe_layer.json).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import time

import torch
from torch import nn

from bench.common import print_spread, save, spread, verdict
from moeops.config import ModelArgs, make_model_args
from moeops.model.hf import hf_config_dict
from moeops.model.moe import MLP, MoE

TARGETS = {"vs_transformers": 2.0, "vs_deepspeed": 3.0}  # speedup of ours, forward + backward, on a GPU
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Max |ours - transformers| / max |transformers| over the output and the input gradient. CUDA fp32 is
# looser than CPU: Triton's tl.dot takes fp32 inputs as TF32 on tensor cores.
PARITY_TOL = {("cpu", "fp32"): 1e-5, ("cuda", "fp32"): 5e-3, ("cpu", "bf16"): 3e-2, ("cuda", "bf16"): 3e-2}


def init_moe(moe: MoE, args: ModelArgs, seed: int) -> None:
    """Normal(0, init_std), down projections scaled by 1/sqrt(2·n_layers), as build_model does; a small
    random balancing bias so the bias path is exercised (and copied to the peer) too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            scale = 1 / math.sqrt(2 * args.n_layers) if "down_proj" in name else 1.0
            p.copy_(torch.randn(p.shape, generator=gen) * args.init_std * scale)
        moe.gate.e_score_correction_bias.copy_(torch.randn(args.n_routed_experts, generator=gen) * 1e-3)


def transformers_moe(args: ModelArgs, experts_impl: str) -> nn.Module:
    import transformers
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    fields = {k: v for k, v in hf_config_dict(args).items() if k not in ("model_type", "architectures")}
    config = transformers.DeepseekV3Config(**fields)
    config._experts_implementation = experts_impl  # what PreTrainedModel.__init__ sets on a whole model
    return DeepseekV3MoE(config)


class DeepSpeedWithShared(nn.Module):
    """DeepSpeed's MoE layer (its output only; not its aux loss or counts) + the shared expert."""

    def __init__(self, args: ModelArgs, seed: int):
        super().__init__()
        from deepspeed.moe.layer import MoE as DeepSpeedMoE

        torch.manual_seed(seed)  # DeepSpeed's layers initialize from the global generator
        self.moe = DeepSpeedMoE(args.dim, MLP(args.dim, args.moe_inter_dim), num_experts=args.n_routed_experts,
                                ep_size=1, k=args.top_k, drop_tokens=False, use_rts=False,
                                top2_2nd_expert_sampling=False)
        n_shared = args.n_shared_experts
        self.shared = MLP(args.dim, args.moe_inter_dim * n_shared) if n_shared else None
        for p in self.parameters():  # the same scale as ours (DeepSpeed's defaults are nn.Linear's)
            nn.init.normal_(p, std=args.init_std)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        out = self.moe(x_BSD)[0]
        return out + self.shared(x_BSD) if self.shared is not None else out


def kernel_paths(device: str) -> dict[str, str]:
    """Which implementation our layer's kernel modules dispatch to on `device` (the convention in
    kernels/: Triton for CUDA tensors when triton is importable and the module has a Triton path)."""
    out = {}
    for name in ("routing", "permute", "grouped_mlp"):
        mod = importlib.import_module(f"kernels.{name}")
        has_triton = getattr(mod, "triton", None) is not None and any(n.endswith("_triton") for n in vars(mod))
        out[name] = "triton" if device == "cuda" and has_triton else "pytorch"
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check_parity(ours: nn.Module, theirs: nn.Module, x_BSD: torch.Tensor, g_BSD: torch.Tensor, tol: float) -> dict:
    """Output and input-gradient agreement of two layers that compute the same function; raises when over tol."""
    grads, outs = [], []
    for layer in (ours, theirs):
        x = x_BSD.detach().clone().requires_grad_(True)
        out = layer(x)
        out.backward(g_BSD)
        outs.append(out.detach())
        grads.append(x.grad)
        layer.zero_grad(set_to_none=True)
    result = {"output_rel_err": rel_err(outs[0], outs[1]), "input_grad_rel_err": rel_err(grads[0], grads[1]),
              "tolerance": tol}
    if max(result["output_rel_err"], result["input_grad_rel_err"]) > tol:
        raise AssertionError(f"moeops MoE and transformers' DeepseekV3MoE disagree: output rel err "
                             f"{result['output_rel_err']:.3g}, input grad rel err {result['input_grad_rel_err']:.3g} "
                             f"(tolerance {tol:g})")
    return result


def make_step(layer: nn.Module, x_BSD: torch.Tensor, g_BSD: torch.Tensor):
    """One forward + backward with the input's gradient (as a layer inside a network needs it)."""
    def step():
        x = x_BSD.detach().requires_grad_(True)
        layer(x).backward(g_BSD)
        layer.zero_grad(set_to_none=True)
    return step


def run(flavor: str, batch: int, seq: int, repeats: int, threads: int, device: str, dtype: str, iters: int,
        hf_experts: str = "grouped_mm", seed: int = 0) -> dict:
    torch.set_num_threads(threads)
    args = make_model_args(flavor)
    dt = DTYPES[dtype]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    ours = MoE(args)
    init_moe(ours, args, seed)
    theirs = transformers_moe(args, hf_experts)
    theirs.load_state_dict(ours.state_dict())
    deepspeed_layer = DeepSpeedWithShared(args, seed)
    layers = {"moeops": ours, "transformers": theirs, "deepspeed": deepspeed_layer}
    for layer in layers.values():
        layer.to(device=device, dtype=dt).train()

    gen = torch.Generator().manual_seed(seed + 1)
    x_BSD = torch.randn(batch, seq, args.dim, generator=gen).to(device=device, dtype=dt)
    g_BSD = torch.randn(batch, seq, args.dim, generator=gen).to(device=device, dtype=dt)  # upstream gradient

    parity = check_parity(ours, theirs, x_BSD, g_BSD, PARITY_TOL[(device, dtype)])
    x = x_BSD.detach().clone().requires_grad_(True)
    ds_out = deepspeed_layer(x)
    if ds_out.shape != x_BSD.shape or not torch.isfinite(ds_out).all():
        raise AssertionError(f"DeepSpeed's MoE layer gave {tuple(ds_out.shape)} (finite: "
                             f"{bool(torch.isfinite(ds_out).all())}) for input {tuple(x_BSD.shape)}")

    steps = {k: make_step(layer, x_BSD, g_BSD) for k, layer in layers.items()}
    for fn in steps.values():  # warm-up (Triton compiles and autotunes here on CUDA)
        fn()
        fn()
    sync()
    times = {k: [] for k in steps}
    for _ in range(repeats):  # interleaved so every layer sees the same machine state
        for name, fn in steps.items():
            sync()
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            sync()
            times[name].append((time.perf_counter() - t) / iters)

    tokens = batch * seq
    tok_s = {k: spread((tokens / t for t in v), 1) for k, v in times.items()}
    ratio_spread = {f"vs_{peer}": spread((b / a for a, b in zip(times["moeops"], times[peer])), 3)
                    for peer in ("transformers", "deepspeed")}
    targets = {k: {"target": t, "higher_is_better": True} for k, t in TARGETS.items()}
    on_gpu = device == "cuda"
    verdicts = {k: verdict(ratio_spread[k], t) if on_gpu else "GPU only" for k, t in TARGETS.items()}
    return {
        "flavor": flavor, "batch": batch, "seq": seq, "tokens": tokens, "device": device,
        "gpu": torch.cuda.get_device_name() if on_gpu else None, "dtype": dtype, "threads": threads,
        "repeats": repeats, "iters_per_repeat": iters, "transformers_experts_implementation": hf_experts,
        "kernels": kernel_paths(device),
        "config": {"dim": args.dim, "n_routed_experts": args.n_routed_experts, "top_k": args.top_k,
                   "moe_inter_dim": args.moe_inter_dim, "n_shared_experts": args.n_shared_experts,
                   "n_group": args.n_group, "topk_group": args.topk_group},
        "parity_vs_transformers": parity,
        "step_ms": {k: round(1e3 * sorted(v)[len(v) // 2], 3) for k, v in times.items()},
        "tokens_per_s": {k: v["median"] for k, v in tok_s.items()},
        "tokens_per_s_spread": tok_s,
        "ratios": {k: v["median"] for k, v in ratio_spread.items()},
        "ratio_spread": ratio_spread,
        "targets": targets,
        "verdicts": verdicts,
        "note": "forward + backward (input and parameter gradients) of one MoE layer, shared expert included; "
                "per repeat `iters` steps of each layer, interleaved; ratio = peer step time / ours, per repeat. "
                "DeepSpeed: dropless, its own softmax top-k gate + the same shared expert added outside. "
                + ("" if on_gpu else "Targets are for a GPU: measured here on CPU, so no verdict."),
    }


def main(argv: list[str] | None = None) -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(prog="python -m bench.moe_layer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--flavor", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iters", type=int, help="steps per repeat and layer (default: 20 on CUDA, 2 on CPU)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if cuda else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--hf-experts", default="grouped_mm", choices=["grouped_mm", "batched_mm", "eager"],
                    help="transformers' experts implementation (default: what DeepseekV3ForCausalLM picks)")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not cuda:
        raise SystemExit("error: --device cuda: no CUDA device (torch.cuda.is_available() is False)")
    for name in ("repeats", "batch", "seq"):
        if getattr(a, name) < 1:
            raise SystemExit(f"error: --{name} must be >= 1")
    iters = a.iters or (20 if a.device == "cuda" else 2)
    dtype = a.dtype or ("bf16" if a.device == "cuda" else "fp32")
    result = run(a.flavor, a.batch, a.seq, a.repeats, a.threads, a.device, dtype, iters, a.hf_experts)
    print(json.dumps({k: result[k] for k in ("device", "dtype", "kernels", "parity_vs_transformers", "step_ms",
                                             "tokens_per_s")}, indent=2))
    print_spread(result, f"MoE layer fwd+bwd, {a.device} {dtype}: speedup of ours")
    print(f"written {save('moe_layer', 'bench.moe_layer', argv, result)}")


if __name__ == "__main__":
    main()
