"""ONNX export with the MLA KV cache: the graph keeps sparse experts (one com.microsoft MoE node per
MoE layer holding every expert), and ONNX Runtime matches PyTorch for prefill, 20 cached decode steps,
left-padded batches and generation."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from moeops.config import make_model_args
from moeops.export.onnx import OnnxLM, export_onnx
from moeops.model.generate import generate, torch_step
from moeops.model.transformer import build_model, expert_loads, reset_expert_stats

ATOL = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    args = make_model_args("debug", {"n_layers": 3, "max_seq_len": 64})
    model = build_model(args, seed=1).eval()
    with torch.no_grad():  # token-dependent routing over all experts, and a non-zero balancing bias
        for moe in model.moe_layers():
            moe.gate.weight.normal_(0, 0.5)
            moe.gate.e_score_correction_bias.copy_(torch.randn(args.n_routed_experts) * 0.02)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(model, path)
    return model, path, OnnxLM(path, threads=1)


def test_graph_is_sparse_moe_and_checker_clean(exported):
    model, path, _ = exported
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    moe_nodes = [n for n in proto.graph.node if n.op_type == "MoE" and n.domain == "com.microsoft"]
    assert len(moe_nodes) == len(model.moe_layers())
    init = {t.name: t for t in proto.graph.initializer}
    a = model.args
    for node in moe_nodes:  # every expert's weights are in the op, not just the ones a sample hit
        assert list(init[node.input[2]].dims) == [a.n_routed_experts, 2 * a.moe_inter_dim, a.dim]
        assert list(init[node.input[4]].dims) == [a.n_routed_experts, a.dim, a.moe_inter_dim]
    names = [i.name for i in proto.graph.input]
    assert names[:2] == ["input_ids", "attention_mask"] and "past_latent.2" in names and "past_rope.2" in names


def test_prefill_and_20_decode_steps_match_pytorch(exported):
    model, _, lm = exported
    rng = np.random.default_rng(0)
    B, S = 4, 24
    ids = rng.integers(0, model.args.vocab_size, (B, S + 20))
    reset_expert_stats(model)
    with torch.no_grad():
        full = model(torch.from_numpy(ids)).numpy()
    assert all((load > 0).all() for load in expert_loads(model)), "inputs must route tokens to every expert"
    mask = np.ones((B, S), np.int64)
    logits, past = lm.step(ids[:, :S], mask, None)
    assert np.abs(logits - full[:, :S]).max() <= ATOL
    for t in range(S, S + 20):
        mask = np.ones((B, t + 1), np.int64)
        logits, past = lm.step(ids[:, t:t + 1], mask, past)
        assert logits.shape == (B, 1, model.args.vocab_size)
        assert np.abs(logits[:, 0] - full[:, t]).max() <= ATOL, f"decode step {t - S}"
    assert past[0].shape == (B, S + 20, model.args.kv_lora_rank)


def test_left_padded_batch_matches_unpadded(exported):
    model, _, lm = exported
    prompts = [[5, 9, 13, 2, 7, 7, 30], [11, 4]]
    for p in prompts:
        alone, _ = lm.step(np.array([p]), np.ones((1, len(p)), np.int64), None)
        with torch.no_grad():
            ref = model(torch.tensor([p])).numpy()
        assert np.abs(alone - ref).max() <= ATOL
    ids = np.array([prompts[0], [0] * 5 + prompts[1]])
    mask = (np.arange(7) >= np.array([[0], [5]])).astype(np.int64)
    batched, _ = lm.step(ids, mask, None)
    with torch.no_grad():
        ref1 = model(torch.tensor([prompts[1]])).numpy()
    assert np.abs(batched[1, 5:] - ref1[0]).max() <= ATOL


def test_generation_greedy_and_top_p_match_pytorch(exported):
    model, _, lm = exported
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    greedy = generate(lm.step, prompts, 12)
    assert greedy == generate(torch_step(model), prompts, 12)
    sampled = generate(lm.step, prompts, 12, temperature=0.9, top_p=0.8, seed=7)
    assert sampled == generate(lm.step, prompts, 12, temperature=0.9, top_p=0.8, seed=7)
    assert sampled == generate(torch_step(model), prompts, 12, temperature=0.9, top_p=0.8, seed=7)
    assert sampled != generate(lm.step, prompts, 12, temperature=0.9, top_p=0.8, seed=8)
    assert all(len(g) == 12 for g in greedy + sampled)


def test_export_of_a_model_that_fails_its_checksum_is_one_line_and_writes_nothing(tmp_path):
    from conftest import run_stage
    from tokenizers import Tokenizer, models

    from moeops.model.io import save_model_dir

    tok = tmp_path / "tok.json"
    Tokenizer(models.BPE()).save(str(tok))
    model = build_model(make_model_args("debug", {}), seed=0)
    save_model_dir(tmp_path / "models/student", model, tok, {"stage": "test"})
    weights = tmp_path / "models/student/model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)  # same size, still a loadable safetensors file, different weights
    weights.write_bytes(bytes(data))
    (tmp_path / "params.yaml").write_text("export: {threads: 1}\n")
    proc = run_stage("export", tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "fails its checksum" in proc.stderr, proc.stderr
    assert not (tmp_path / "exports").exists() and not (tmp_path / "metrics/export.json").exists()


def test_parity_check_is_sized_to_the_models_context(exported):
    from stages.export import measure_parity, parity_lengths

    assert parity_lengths(16, 20) == (1, 15)  # distill.seq_len 16: the steps are cut, not the export failed
    assert parity_lengths(32, 20) == (12, 20) and parity_lengths(64, 20) == (32, 20) and parity_lengths(1, 20) == (1, 0)
    model, _, lm = exported  # max_seq_len 64
    parity = measure_parity(model, lm, decode_steps=100)
    assert (parity["prompt_len"], parity["decode_steps"]) == (1, 63)
    assert parity["max_abs_diff"] <= ATOL
