"""What each CPU speed candidate of issue 13 bought: our training step (fwd + bwd + AdamW) with
every candidate on, against the same step with one candidate reverted to the code it replaced,
and with all of them reverted (the step as it was before issue 13). Interleaved in one process,
ratio per repeat (reverted time / current time), median (min-max).

    python -m bench.step_candidates [--flavor small] [--batch 16] [--seq 256] [--repeats 5] [--compile]

Candidates: fused_lce (kernels/linear_cross_entropy.py vs logits + F.cross_entropy),
flash_sdpa (v padded to the q/k width so SDPA takes its fused kernel, vs the math fallback),
rms_norm (F.rms_norm vs pow/mean/rsqrt/mul), permute (gather-only autograd vs index_put
backward). --compile adds `torch.compile(model)` (inductor) on top of the current step and
reports its first-step (compile) time. Writes bench/results/step_candidates.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time

import torch
import torch.nn.functional as F

from bench.common import save, spread
from moeops.config import PretrainParams, make_model_args
from moeops.model import attention, moe
from moeops.model.transformer import build_model
from moeops.train.loop import make_optimizer

# ---------------------------------------------------------------- the code each candidate replaced


def _old_rms_forward(self, x):
    x32 = x.float()
    return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def _old_attend(self, q_BHSX, latent_BTC, k_rope_BTR, mask_B1ST):
    B, H, S, _ = q_BHSX.shape
    T = latent_BTC.shape[1]
    kv_BHTX = self.kv_b_proj(latent_BTC).view(B, T, H, -1).transpose(1, 2)
    k_nope, v_BHTV = kv_BHTX.split([self.nope_dim, self.v_dim], dim=-1)
    k_BHTX = torch.cat([k_nope, k_rope_BTR.unsqueeze(1).expand(B, H, T, self.rope_dim)], dim=-1)
    out_BHSV = F.scaled_dot_product_attention(q_BHSX, k_BHTX, v_BHTV, attn_mask=mask_B1ST,
                                              is_causal=mask_B1ST is None, scale=self.scale)
    return self.o_proj(out_BHSV.transpose(1, 2).reshape(B, S, H * self.v_dim))


def _old_permute(x_TD, topk_ids_TK, n_experts, capacity=0):
    K = topk_ids_TK.shape[1]
    flat_ids_N = topk_ids_TK.reshape(-1)
    order_N = torch.argsort(flat_ids_N, stable=True)
    counts_E = torch.bincount(flat_ids_N, minlength=n_experts)
    return x_TD[order_N // K], counts_E, order_N, 0


def _old_unpermute(y_MD, order_M, topk_weights_TK):
    T, K = topk_weights_TK.shape
    w_M = topk_weights_TK.reshape(-1)[order_M].to(y_MD.dtype)
    inverse_N = torch.empty_like(order_M)
    inverse_N[order_M] = torch.arange(order_M.numel(), device=order_M.device)
    return (y_MD * w_M[:, None])[inverse_N].view(T, K, -1).sum(1)


# candidate -> the (object, attribute, old code) patches that revert it (fused_lce: make_step's loss)
REVERT = {
    "flash_sdpa": [(attention.MLA, "attend", _old_attend)],
    "rms_norm": [(attention.RMSNorm, "forward", _old_rms_forward)],
    "permute": [(moe, "permute", _old_permute), (moe, "unpermute", _old_unpermute)],
}


@contextlib.contextmanager
def _revert(names: list[str]):
    patches = [patch for n in names for patch in REVERT.get(n, [])]
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    for obj, attr, old in patches:
        setattr(obj, attr, old)
    try:
        yield
    finally:
        for obj, attr, current in saved:
            setattr(obj, attr, current)


CANDIDATES = ["fused_lce", "flash_sdpa", "rms_norm", "permute"]


def make_step(model, optimizer, x_BS, y_BS, reverted: list[str]):
    def step():
        with _revert(reverted):
            if "fused_lce" in reverted:
                loss = F.cross_entropy(model(x_BS).float().flatten(0, 1), y_BS.flatten())
            else:
                loss = model(x_BS, y_BS)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def run(flavor: str, batch: int, seq: int, repeats: int, threads: int, compile_: bool) -> dict:
    torch.set_num_threads(threads)
    args = make_model_args(flavor, {"max_seq_len": max(seq, make_model_args(flavor).max_seq_len)})
    p = PretrainParams(flavor=flavor, seq_len=min(seq, args.max_seq_len), model={"max_seq_len": args.max_seq_len})
    base = build_model(args, seed=0).train()
    gen = torch.Generator().manual_seed(1)
    x_BS = torch.randint(0, args.vocab_size, (batch, seq), generator=gen)
    y_BS = torch.randint(0, args.vocab_size, (batch, seq), generator=gen)
    variants = {"current": [], **{f"without {c}": [c] for c in CANDIDATES}, "before issue 13": CANDIDATES}
    steps = {}
    for name, reverted in variants.items():
        model = copy.deepcopy(base)
        steps[name] = make_step(model, make_optimizer(model, p), x_BS, y_BS, reverted)
    first_compiled_s = None
    if compile_:
        model = copy.deepcopy(base)
        compiled = torch.compile(model)
        steps["compiled"] = make_step(compiled, make_optimizer(model, p), x_BS, y_BS, [])
        t = time.perf_counter()
        steps["compiled"]()
        first_compiled_s = round(time.perf_counter() - t, 1)
    for fn in steps.values():  # warm-up (and a second compiled call: it may recompile once)
        fn()
    times = {k: [] for k in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    tokens = batch * seq
    current = times["current"]
    return {
        "flavor": flavor, "batch": batch, "seq": seq, "threads": threads, "repeats": repeats,
        "tokens_per_s": {k: spread((tokens / t for t in v), 1) for k, v in times.items()},
        # > 1: the candidate pays (the step is slower without it); for "compiled": compiled speedup
        "speedup_of_current_over": {k: spread((t / c for t, c in zip(v, current)), 3)
                                    for k, v in times.items() if k not in ("current", "compiled")},
        "compiled_speedup_over_current": (spread((c / t for t, c in zip(times["compiled"], current)), 3)
                                          if compile_ else None),
        "first_compiled_step_s": first_compiled_s,
        "note": "per repeat one step of each variant, interleaved; speedup = variant step time / current step time",
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.step_candidates")
    ap.add_argument("--flavor", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args(argv)
    result = run(a.flavor, a.batch, a.seq, a.repeats, a.threads, a.compile)
    print(json.dumps(result, indent=2))
    print(f"written {save('step_candidates', 'bench.step_candidates', argv, result)}")


if __name__ == "__main__":
    main()
