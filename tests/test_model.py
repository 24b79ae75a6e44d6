"""The model: HF parity, MLA and RoPE, balancing, balance losses, parameter counts."""

import math

import pytest
import torch

from moeops.config import make_model_args
from moeops.model.attention import apply_rope, rope_angles
from moeops.model.hf import hf_model
from moeops.model.transformer import (
    build_model,
    expert_loads,
    max_violation,
    param_counts,
    reset_expert_stats,
    update_router_bias,
)


def hf_v3(args):
    return hf_model(args).eval()


def randomize_bias(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias.copy_(torch.rand(moe.args.n_routed_experts, generator=gen) * 0.1)


@pytest.mark.parametrize("overrides", [
    {"n_group": 1, "topk_group": 1},  # plain sigmoid top-k
    {"n_group": 4, "topk_group": 2},  # group-limited routing
    {"n_group": 2, "topk_group": 1, "q_lora_rank": 0, "norm_topk_prob": False, "routed_scaling_factor": 2.5},
])
def test_logits_equal_transformers_deepseek_v3(overrides):
    args = make_model_args("debug", overrides)
    ours = build_model(args, seed=1).eval()
    randomize_bias(ours)
    theirs = hf_v3(args)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    tokens = torch.randint(0, args.vocab_size, (3, 37), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, atol=1e-4, rtol=0)


def test_softmax_scoring_equals_transformers_deepseek_v2_greedy():
    # transformers' DeepseekV3 scores with sigmoid only; DeepseekV2 with greedy top-k is the
    # softmax-scored DeepSeekMoE with the same MLA (its RoPE layout differs, q·k does not).
    args = make_model_args("debug", {"score_func": "softmax", "n_group": 1, "topk_group": 1,
                                     "norm_topk_prob": False, "routed_scaling_factor": 1.5})
    ours = build_model(args, seed=3).eval()
    theirs = hf_model(args, "DeepseekV2", topk_method="greedy").eval()
    state = {k: v for k, v in ours.state_dict().items() if "e_score_correction_bias" not in k}
    theirs.load_state_dict(state, strict=True)
    tokens = torch.randint(0, args.vocab_size, (2, 33), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, atol=1e-4, rtol=0)


def test_mla_shapes_and_latent_sizes():
    args = make_model_args("debug")
    attn = build_model(args).model.layers[0].self_attn
    assert attn.kv_a_proj_with_mqa.weight.shape == (args.kv_lora_rank + args.qk_rope_head_dim, args.dim)
    assert attn.kv_b_proj.weight.shape == (args.n_heads * (args.qk_nope_head_dim + args.v_head_dim),
                                           args.kv_lora_rank)
    assert attn.q_b_proj.weight.shape == (args.n_heads * (args.qk_nope_head_dim + args.qk_rope_head_dim),
                                          args.q_lora_rank)
    cos, sin = rope_angles(args.qk_rope_head_dim, 5, args.rope_theta)
    assert attn(torch.randn(2, 5, args.dim), cos, sin).shape == (2, 5, args.dim)


def test_rope_rotates_interleaved_pairs_and_is_relative():
    dim, theta = 8, 10000.0
    x = torch.randn(6, dim, dtype=torch.float64)
    cos, sin = rope_angles(dim, 6, theta)
    out = apply_rope(x, cos.double(), sin.double())
    # Reference: complex multiplication on pairs (x0 + i x1) * e^{i pos freq}, then [even | odd] layout.
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    z = torch.view_as_complex(x.view(6, dim // 2, 2).contiguous()) * torch.polar(
        torch.ones(6, dim // 2, dtype=torch.float64), torch.arange(6, dtype=torch.float64)[:, None] * freqs)
    torch.testing.assert_close(out, torch.cat([z.real, z.imag], dim=-1), atol=1e-6, rtol=1e-6)
    # Relative: q·k depends only on the distance between positions.
    q, k = torch.randn(dim, dtype=torch.float64), torch.randn(dim, dtype=torch.float64)
    c, s = rope_angles(dim, 10, theta)
    c, s = c.double(), s.double()

    def rot(v, p):
        return apply_rope(v[None], c[p:p + 1], s[p:p + 1])[0]

    assert math.isclose(rot(q, 2) @ rot(k, 5), rot(q, 6) @ rot(k, 9), abs_tol=1e-5)


def test_causal_future_tokens_do_not_change_past_logits():
    args = make_model_args("debug")
    model = build_model(args).eval()
    tokens = torch.randint(0, args.vocab_size, (1, 20))
    other = tokens.clone()
    other[0, 10:] = (other[0, 10:] + 1) % args.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[:, :10], model(other)[:, :10])


def test_bias_update_moves_toward_balance():
    args = make_model_args("debug")
    model = build_model(args).train()
    model(torch.randint(0, args.vocab_size, (4, 32)))
    moe = model.moe_layers()[0]
    load = moe.gate.tokens_per_expert.clone()
    assert load.sum() == 4 * 32 * args.top_k
    update_router_bias(model, speed=0.01)
    bias = moe.gate.e_score_correction_bias
    expected = 0.01 * torch.sign(load.mean() - load)
    torch.testing.assert_close(bias, expected)
    assert moe.gate.tokens_per_expert.sum() == 0  # counts reset for the next step


def test_bias_balancing_reduces_max_violation():
    """Overloaded experts lose selection share as the bias moves (router weights frozen)."""
    torch.manual_seed(0)
    args = make_model_args("debug", {"n_group": 1, "topk_group": 1})
    model = build_model(args).train()
    with torch.no_grad():
        model.moe_layers()[0].gate.weight[0] += 0.5  # skew the router
    tokens = torch.randint(0, args.vocab_size, (8, 32))
    vio = []
    for _ in range(60):
        with torch.no_grad():
            model(tokens)
        vio.append(max_violation(model.moe_layers()[0].gate.tokens_per_expert))
        update_router_bias(model, speed=0.02)
    assert vio[-1] < 0.5 * vio[0]


def test_balance_losses_are_differentiable_and_off_at_zero():
    args = make_model_args("debug", {"seq_aux_alpha": 0.01, "z_loss_alpha": 0.001})
    model = build_model(args).train()
    model(torch.randint(0, args.vocab_size, (2, 16)))
    aux = model.aux_loss()
    assert aux > 0
    aux.backward()
    assert model.moe_layers()[0].gate.weight.grad.abs().sum() > 0
    off = build_model(make_model_args("debug")).train()
    off(torch.randint(0, args.vocab_size, (2, 16)))
    assert float(off.aux_loss()) == 0.0


def test_param_counts():
    args = make_model_args("debug")
    counts = param_counts(args)
    model = build_model(args)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    per_expert = [m.experts.gate_up_proj[0].numel() + m.experts.down_proj[0].numel() for m in model.moe_layers()]
    inactive = sum(n * (args.n_routed_experts - args.top_k) for n in per_expert)
    assert len(per_expert) == args.n_layers - args.first_k_dense_replace
    assert counts["active"] == counts["total"] - inactive


def test_dense_model_has_no_experts_and_all_params_active():
    args = make_model_args("debug", {"first_k_dense_replace": 2})  # every layer a dense SwiGLU
    model = build_model(args).train()
    assert model.moe_layers() == [] and expert_loads(model) == []
    tokens = torch.randint(0, args.vocab_size, (2, 16))
    loss = model(tokens, tokens)
    loss.backward()
    assert math.isfinite(loss.item()) and float(model.aux_loss()) == 0.0
    update_router_bias(model, speed=0.01)  # nothing to balance: a no-op, not an error
    reset_expert_stats(model)
    counts = param_counts(args)
    assert counts["total"] == counts["active"] == sum(p.numel() for p in model.parameters())
    # The `dense` flavor is `small` without experts at the same active parameters per token (within 1%).
    dense, small = param_counts(make_model_args("dense")), param_counts(make_model_args("small"))
    assert dense["total"] == dense["active"] and abs(dense["active"] / small["active"] - 1) < 0.01
