"""moeops.compress.quantize on a synthetic decoder shaped like the exported `tiny` model:
V=8192, D=128, an attention-like block (K in {128, 32, 64}), a dense SwiGLU layer (K=384) and a
MoE layer (E=8 experts, F=64, top-2, a shared expert) whose routed experts are one com.microsoft
MoE node, then the output projection. Weights are random (std 1/sqrt(K)), so the accuracy bounds
here are about the encodings being right, not about what a trained model loses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from moeops.cli import UserError
from moeops.compress import quantize as q

V, D, F, E, TOPK, INTER, LATENT, HEAD = 8192, 128, 64, 8, 2, 384, 32, 64


def build_lm(path: Path, seed: int = 0, inter: int = INTER) -> Path:
    """input_ids [B, S] int64 → logits [B, S, V]."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def w(name, *shape, std=None):
        std = std if std is not None else 1 / np.sqrt(shape[-2] if len(shape) > 1 else shape[0])
        inits.append(nh.from_array((rng.standard_normal(shape) * std).astype(np.float32), name))
        return name

    def const(name, arr):
        inits.append(nh.from_array(np.asarray(arr), name))
        return name

    def node(op, ins, out, **kw):
        nodes.append(h.make_node(op, ins, [out], name=f"n{len(nodes)}_{op}", **kw))
        return out

    def rmsnorm(x, tag):
        sq = node("Mul", [x, x], f"{tag}_sq")
        ms = node("ReduceMean", [sq, "axes_last"], f"{tag}_ms", keepdims=1)
        rs = node("Sqrt", [node("Add", [ms, "eps"], f"{tag}_mse")], f"{tag}_rms")
        weight = const(f"{tag}.weight", np.ones(D, np.float32))
        return node("Mul", [node("Div", [x, rs], f"{tag}_n"), weight], f"{tag}_out")

    def swiglu(x, tag, d_in, d_hid):
        g = node("MatMul", [x, w(f"{tag}.gate", d_in, d_hid)], f"{tag}_g")
        u = node("MatMul", [x, w(f"{tag}.up", d_in, d_hid)], f"{tag}_u")
        a = node("Mul", [node("Mul", [g, node("Sigmoid", [g], f"{tag}_sg")], f"{tag}_silu"), u], f"{tag}_a")
        return node("MatMul", [a, w(f"{tag}.down", d_hid, d_in)], f"{tag}_y")

    const("axes_last", np.array([-1], np.int64))
    const("eps", np.array(1e-6, np.float32))
    x = node("Gather", [w("embed_tokens.weight", V, D, std=1.0), "input_ids"], "x0")
    # attention-like block: q and a low-rank kv path, scores without constant weights
    hn = rmsnorm(x, "attn_norm")
    qh = node("MatMul", [hn, w("wq", D, HEAD)], "q")
    kv = node("MatMul", [node("MatMul", [hn, w("wkv_a", D, LATENT)], "lat"), w("wkv_b", LATENT, HEAD)], "kv")
    kt = node("Transpose", [kv], "kt", perm=[0, 2, 1])
    p = node("Softmax", [node("Mul", [node("MatMul", [qh, kt], "s"), const("scale", np.float32(HEAD ** -0.5))], "ss")],
             "p", axis=-1)
    # the output projection as Transpose(initializer), as an exporter may leave it
    o = node("MatMul", [node("MatMul", [p, kv], "pv"), node("Transpose", [w("wo_t", D, HEAD)], "wo", perm=[1, 0])], "o")
    x = node("Add", [x, o], "x1")
    x = node("Add", [x, swiglu(rmsnorm(x, "dense_norm"), "dense", D, inter)], "x2")
    # MoE layer: router (softmax scores, top-k → log weights, -1e9 elsewhere), routed experts, shared expert
    hm = rmsnorm(x, "moe_norm")
    x_TD = node("Reshape", [hm, const("td", np.array([-1, D], np.int64))], "x_TD")
    logits_TE = node("MatMul", [x_TD, w("gate.weight", D, E, std=4 / np.sqrt(D))], "logits_TE")  # clear top-k margins
    scores = node("Softmax", [logits_TE], "scores_TE", axis=-1)
    k = const("k", np.array([TOPK], np.int64))
    nodes.append(h.make_node("TopK", [scores, k], ["top_TK", "ids_TK"], name="topk"))
    full = node("ConstantOfShape", [node("Shape", [logits_TE], "shape_TE")], "full_TE",
                value=h.make_tensor("v", TP.FLOAT, [1], [-1e9]))
    router = node("ScatterElements", [full, "ids_TK", node("Log", ["top_TK"], "logw_TK")], "router_TE", axis=1)
    inits.append(nh.from_array((rng.standard_normal((E, 2 * F, D)) / np.sqrt(D)).astype(np.float32), "fc1_EXD"))
    inits.append(nh.from_array((rng.standard_normal((E, D, F)) / np.sqrt(F)).astype(np.float32), "fc2_EDF"))
    routed = node("MoE", [x_TD, router, "fc1_EXD", "", "fc2_EDF"], "routed_TD", domain="com.microsoft", k=TOPK,
                  activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1, activation_alpha=1.0,
                  activation_beta=0.0)
    y = node("Add", [routed, swiglu(x_TD, "shared", D, F)], "moe_TD")
    y = node("Reshape", [y, node("Shape", [hm], "shape_BSD")], "moe_BSD")
    x = node("Add", [x, y], "x3")
    node("MatMul", [rmsnorm(x, "final_norm"), w("lm_head", D, V)], "logits")
    graph = h.make_graph(nodes, "lm", [h.make_tensor_value_info("input_ids", TP.INT64, ["B", "S"])],
                         [h.make_tensor_value_info("logits", TP.FLOAT, ["B", "S", V])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18), h.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    onnx.save_model(model, path)
    return path


def session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def logits(path: Path, ids: np.ndarray) -> np.ndarray:
    return session(path).run(["logits"], {"input_ids": ids})[0]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("quantize")
    fp32 = build_lm(d / "fp32.onnx")
    s8 = q.quantize_int8(fp32, d / "int8" / "model.onnx")
    s4 = q.quantize_int4(fp32, d / "int4" / "model.onnx", block_size=32, accuracy_level=0)
    ids = np.random.default_rng(1).integers(0, V, (4, 64)).astype(np.int64)
    return {"fp32": fp32, "int8": d / "int8" / "model.onnx", "int4": d / "int4" / "model.onnx", "s8": s8, "s4": s4,
            "ids": ids, "ref": logits(fp32, ids)}


def ops(path: Path) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in onnx.load(str(path)).graph.node:
        out.setdefault(n.op_type, []).append(n)
    return out


def attr(node: onnx.NodeProto, name: str):
    return next((h.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def test_int8_variant(models):
    found, s = ops(models["int8"]), models["s8"]
    assert "MoE" not in found and [attr(n, "expert_weight_bits") for n in found["QMoE"]] == [8]
    assert attr(found["QMoE"][0], "block_size") is None  # per-channel experts: fp32-activation kernel
    # weight-only: no activation is quantized (no DynamicQuantizeLinear / MatMulInteger / MatMulNBits)
    assert not {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulNBits"} & set(found)
    int8_weights = {t.name: t for t in onnx.load(str(models["int8"])).graph.initializer
                    if t.data_type == TP.INT8}
    decoded = [n for n in found["MatMul"] if n.input[1].endswith("_deq8")]
    assert len(decoded) == 11 and len(found["Cast"]) == len(int8_weights) == 11
    assert {n.input[0] for n in found["Cast"]} == set(int8_weights)
    assert [attr(n, "bits") for n in found["GatherBlockQuantized"]] == [8] and "Gather" not in found
    # the router projection stays fp32; the other fp32 MatMuls multiply two activations
    assert any(n.input[1] == "gate.weight" for n in found["MatMul"])
    assert s["qmoe_bits"] == [8] and s["bytes"] == models["int8"].stat().st_size
    assert s["size_ratio"] <= 0.30, s
    y = logits(models["int8"], models["ids"])
    # fp32 activations: 0.037 measured (dynamic int8 with 7-bit weights: 0.05-0.09, CPU dependent)
    assert y.shape == models["ref"].shape and rel_err(y, models["ref"]) < 0.05


def test_int8_weights_are_decoded_once_at_load(models, tmp_path):
    """ONNX Runtime's constant folding turns each Cast·Mul·Reshape of int8 codes into one fp32 weight
    when the session is built (what makes int8 run at fp32 speed): the optimized graph has no int8
    tensor and no Cast left."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3  # the "hardware-specific optimizations" warning of a saved graph
    ort.InferenceSession(str(models["int8"]), opts, providers=["CPUExecutionProvider"])
    opt = onnx.load(str(tmp_path / "optimized.onnx"))
    assert "Cast" not in {n.op_type for n in opt.graph.node}
    assert not [t.name for t in opt.graph.initializer if t.data_type == TP.INT8]


@pytest.mark.parametrize("block", [0, 16])
def test_int8_matmul_equals_a_numpy_dequantization(tmp_path, block):
    """One MatMul through quantize_int8: ORT's output equals x @ W_deq, W_deq decoded here from the
    stored int8 codes [K/b, b, N] and scales [K/b, 1, N] (block 0: the largest power of two <= 128
    dividing K = 96, i.e. 32), and W_deq is the round-to-nearest of W."""
    k, n = 96, 40
    rng = np.random.default_rng(6)
    w_KN = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                     [h.make_tensor_value_info("x", TP.FLOAT, ["M", k])],
                     [h.make_tensor_value_info("y", TP.FLOAT, ["M", n])], [nh.from_array(w_KN, "w")])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save_model(model, tmp_path / "fp32.onnx")
    q.quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", block_size=block)
    init = {t.name: nh.to_array(t) for t in onnx.load(str(tmp_path / "int8.onnx")).graph.initializer}
    codes, scales = init["w_q8"], init["w_scales8"]
    b = block or 32
    assert codes.dtype == np.int8 and codes.shape == (k // b, b, n) and scales.shape == (k // b, 1, n)
    w_deq = (codes.astype(np.float32) * scales).reshape(k, n)
    assert 0 < np.abs(w_deq - w_KN).max() <= 0.5 * np.abs(scales).max() + 1e-7  # round to nearest
    x = rng.standard_normal((5, k)).astype(np.float32)
    (y,) = session(tmp_path / "int8.onnx").run(None, {"x": x})
    np.testing.assert_allclose(y, x.astype(np.float64) @ w_deq.astype(np.float64), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="int8 block_size 64: .* K = 96 of 'w'"):
        q.quantize_int8(tmp_path / "fp32.onnx", tmp_path / "bad.onnx", block_size=64)
    assert not (tmp_path / "bad.onnx").exists()


def test_int8_decoder_is_batch_invariant(tmp_path):
    """A request's logprobs must not depend on what it is batched with (continuous batching in the
    server): each prompt alone vs inside a left-padded batch of 8 with other prompts, prefill then 4
    cached decode steps fed the same tokens, on a debug decoder exported and quantized to int8."""
    import torch

    from moeops.config import make_model_args
    from moeops.export.onnx import export_onnx
    from moeops.model.transformer import build_model
    from moeops.ort import OnnxLM

    model = build_model(make_model_args("debug", {"max_seq_len": 64}), seed=2).eval()
    with torch.no_grad():  # token-dependent routing
        for moe in model.moe_layers():
            moe.gate.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    export_onnx(model, tmp_path / "fp32.onnx")
    q.quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx")
    lm = OnnxLM(tmp_path / "int8.onnx", threads=1)
    rng = np.random.default_rng(4)
    vocab, steps = model.args.vocab_size, 4
    prompts = [rng.integers(0, vocab, n) for n in (3, 17, 9, 1, 12, 5, 17, 7)]
    feed = rng.integers(0, vocab, (len(prompts), steps))  # the decode steps' tokens, the same both ways

    def logprobs(z):
        return torch.log_softmax(torch.from_numpy(z).double(), -1).numpy()

    alone = []
    for p, f in zip(prompts, feed):
        z, past = lm.step(p[None], np.ones((1, len(p)), np.int64), None)
        out = [logprobs(z[0, -1])]
        for s in range(steps):
            z, past = lm.step(f[None, s:s + 1], np.ones((1, len(p) + s + 1), np.int64), past)
            out.append(logprobs(z[0, -1]))
        alone.append(np.stack(out))
    width = max(len(p) for p in prompts)
    ids = np.stack([np.pad(p, (width - len(p), 0)) for p in prompts])
    mask = (np.arange(width) >= np.array([[width - len(p)] for p in prompts])).astype(np.int64)
    z, past = lm.step(ids, mask, None)
    batched = [logprobs(z[:, -1])]
    for s in range(steps):
        mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], 1)
        z, past = lm.step(feed[:, s:s + 1], mask, past)
        batched.append(logprobs(z[:, -1]))
    batched = np.stack(batched, 1)
    for i, a in enumerate(alone):
        assert np.abs(batched[i] - a).max() <= 1e-4, f"prompt {i}"
        assert (batched[i].argmax(-1) == a.argmax(-1)).all()


def test_int4_variant(models):
    found, s = ops(models["int4"]), models["s4"]
    assert "MoE" not in found
    (moe,) = found["QMoE"]
    assert attr(moe, "expert_weight_bits") == 4 and attr(moe, "block_size") == 32
    assert len(found["MatMulNBits"]) == 11
    assert {(attr(n, "bits"), attr(n, "block_size")) for n in found["MatMulNBits"]} == {(4, 32)}
    assert [(attr(n, "bits"), attr(n, "block_size")) for n in found["GatherBlockQuantized"]] == [(4, 32)]
    assert any(n.input[1] == "gate.weight" for n in found["MatMul"])  # router stays fp32
    assert s["size_ratio"] <= 0.20, s
    y = logits(models["int4"], models["ids"])
    # 4-bit round-to-nearest on random Gaussian weights: ~9% error per matrix, compounded over the stack
    assert rel_err(y, models["ref"]) < 0.35
    assert rel_err(y, models["ref"]) > rel_err(logits(models["int8"], models["ids"]), models["ref"])


def test_int4_accuracy_level_reaches_the_kernels(models, tmp_path):
    s = q.quantize_int4(models["fp32"], tmp_path / "m.onnx", block_size=32, accuracy_level=4)
    found = ops(tmp_path / "m.onnx")
    assert {attr(n, "accuracy_level") for n in found["MatMulNBits"] + found["QMoE"]} == {4}
    assert s["size_ratio"] <= 0.20
    assert rel_err(logits(tmp_path / "m.onnx", models["ids"]), models["ref"]) < 0.35


def moe_embed_model(fc1: np.ndarray, fc2: np.ndarray, table: np.ndarray) -> onnx.ModelProto:
    """ids [T] → x = table[ids]; router [T, E] → y = MoE(x, router)."""
    d = table.shape[1]
    nodes = [h.make_node("Gather", ["table", "ids"], ["x"], name="embed"),
             h.make_node("MoE", ["x", "router", "fc1", "", "fc2"], ["y"], name="moe", domain="com.microsoft",
                         k=TOPK, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=1,
                         activation_alpha=1.0, activation_beta=0.0)]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("ids", TP.INT64, ["T"]),
                                  h.make_tensor_value_info("router", TP.FLOAT, ["T", fc1.shape[0]])],
                     [h.make_tensor_value_info(o, TP.FLOAT, ["T", d]) for o in ("x", "y")],
                     [nh.from_array(fc1, "fc1"), nh.from_array(fc2, "fc2"), nh.from_array(table, "table")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 18), h.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("bits,block", [(8, 0), (4, 32), (4, 16)])
def test_expert_and_embedding_encodings_match_dequantized_reference(tmp_path, bits, block):
    """QMoE / GatherBlockQuantized on our codes == fp32 MoE / Gather on the dequantized weights."""
    rng = np.random.default_rng(2)
    fc1 = (rng.standard_normal((E, 2 * F, D)) / np.sqrt(D)).astype(np.float32)
    fc2 = (rng.standard_normal((E, D, F)) / np.sqrt(F)).astype(np.float32)
    table = rng.standard_normal((512, D)).astype(np.float32)
    model = moe_embed_model
    m = model(fc1, fc2, table)
    q._replace_moe(m.graph, bits, block, 0)
    q._quantize_embeddings(m.graph, bits, block)  # 0: one scale per row (block D=128)
    onnx.save_model(m, tmp_path / "q.onnx")
    deq = [q.dequantize_symmetric(*q.quantize_symmetric(w, bits, b), bits, b) for w, b in
           [(fc1, block), (fc2, block), (table, block or D)]]
    onnx.save_model(model(*deq), tmp_path / "ref.onnx")
    feed = {"ids": rng.integers(0, 512, 40), "router": rng.standard_normal((40, E)).astype(np.float32)}
    x, y = session(tmp_path / "q.onnx").run(None, feed)
    x_ref, y_ref = session(tmp_path / "ref.onnx").run(None, feed)
    np.testing.assert_allclose(x, x_ref, rtol=1e-6, atol=1e-6)
    assert rel_err(y, y_ref) < 1e-5
    # and the codes are close to the original weights
    assert rel_err(deq[0], fc1) < (0.01 if bits == 8 else 0.12)


@pytest.mark.parametrize("block,tensor,dim", [(64, "wkv_b", 32), (256, "wq", 128)])
def test_bad_block_size_is_one_line_naming_the_param_and_writes_nothing(models, tmp_path, block, tensor, dim):
    dst = tmp_path / "out" / "model.onnx"
    with pytest.raises(UserError) as e:
        q.quantize_int4(models["fp32"], dst, block_size=block, accuracy_level=0)
    msg = str(e.value)
    assert "\n" not in msg and "quantize.int4_block_size" in msg and repr(tensor) in msg and f"= {dim}" in msg
    assert not dst.parent.exists()


def test_block_size_must_divide_the_embedding_and_expert_dims():
    z = np.zeros
    # experts: fc1 K = D = 64, fc2 K = F = 48; embedding D = 64
    m = moe_embed_model(z((E, 96, 64), np.float32), z((E, 64, 48), np.float32), z((16, 64), np.float32))
    q.check_block_size(m, 16)
    with pytest.raises(UserError, match=r"32 does not divide K \(expert input dimension\) = 48 of tensor 'fc2'"):
        q.check_block_size(m, 32)
    m = moe_embed_model(z((E, 96, 64), np.float32), z((E, 64, 64), np.float32), z((16, 48), np.float32))
    with pytest.raises(UserError, match=r"32 does not divide D \(embedding dimension\) = 48 of tensor 'table'"):
        q.check_block_size(m, 32)
    with pytest.raises(UserError, match="power of two"):
        q.check_block_size(m, 48)


def test_missing_or_corrupt_source_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such ONNX model"):
        q.quantize_int8(tmp_path / "nope.onnx", tmp_path / "o.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"\x00not onnx")
    with pytest.raises(UserError, match="not a readable ONNX model"):
        q.quantize_int4(tmp_path / "bad.onnx", tmp_path / "o.onnx", 32, 0)
    assert not (tmp_path / "o.onnx").exists()


# ----------------------------------------------------------------- the stage (export stubbed: the
# synthetic decoder stands in for the student's ONNX; tests/test_onnx.py covers the real export)


@pytest.fixture()
def project(tmp_path, monkeypatch):
    import yaml

    import stages.quantize as stage
    from moeops.config import make_model_args
    from moeops.model.io import save_model_dir
    from moeops.model.transformer import Transformer

    (tmp_path / "tok.json").write_text("{}")
    save_model_dir(tmp_path / "models" / "student", Transformer(make_model_args("debug")), tmp_path / "tok.json",
                   {"stage": "distill"})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(stage, "export_onnx", lambda model, path: build_lm(Path(path)))

    def run(**params):
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"quantize": {"threads": 1, **params}}))
        stage.main()

    return tmp_path, run


def test_stage_writes_both_variants_and_metrics(project):
    import json

    root, run = project
    run(int4_block_size=16)
    student = root / "models" / "student"
    for variant in ("int8", "int4"):
        d = root / "models" / "quantized" / variant
        assert sorted(p.name for p in d.iterdir()) == ["config.json", "lineage.json", "model.onnx", "tokenizer.json"]
        assert (d / "config.json").read_text() == (student / "config.json").read_text()
        lin = json.loads((d / "lineage.json").read_text())
        assert lin["variant"] == variant and lin["params"]["int4_block_size"] == 16
        assert "models/student/model.safetensors" in lin["inputs"]
    m = json.loads((root / "metrics" / "quantize.json").read_text())
    assert m["int8"]["size_ratio"] <= 0.30 and m["int4"]["size_ratio"] <= 0.20
    assert m["int8"]["qmoe_bits"] == [8] and m["int4"]["qmoe_bits"] == [4] and "MoE" not in m["int4"]["ops"]
    assert not [p for p in (root / "models").iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_stage_bad_block_size_fails_before_export_and_keeps_previous_output(project):
    root, run = project
    run(int4_block_size=16)
    before = (root / "models" / "quantized" / "int4" / "model.onnx").read_bytes()
    (root / "metrics" / "quantize.json").unlink()
    with pytest.raises(UserError, match=r"quantize.int4_block_size: 32 does not divide .* = 16 of tensor '.*kv_b_proj"):
        run(int4_block_size=32)  # the debug flavor's kv_lora_rank is 16
    assert (root / "models" / "quantized" / "int4" / "model.onnx").read_bytes() == before
    assert not (root / "metrics" / "quantize.json").exists()


def unpack_uint4(packed: np.ndarray) -> np.ndarray:
    """uint8 bytes → their two 4-bit values, low nibble first (the order MatMulNBits stores them in)."""
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


@pytest.mark.parametrize("k,n,block", [(64, 48, 16), (96, 20, 32)])  # 3 blocks per column: an odd zero-point row
def test_matmulnbits_equals_a_numpy_dequantization_of_its_stored_blocks(tmp_path, k, n, block):
    """One MatMul quantized by the project's int4 path; ONNX Runtime's MatMulNBits output equals
    x @ W_deq.T where W_deq is decoded here from the node's own initializers: packed uint4 codes
    [N, K/block, block/2], fp32 scales [N * K/block], packed uint4 zero points [N * ceil(K/block / 2)]."""
    rng = np.random.default_rng(5)
    w_KN = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                     [h.make_tensor_value_info("x", TP.FLOAT, ["M", k])],
                     [h.make_tensor_value_info("y", TP.FLOAT, ["M", n])],
                     [nh.from_array(w_KN, "w")])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save_model(model, tmp_path / "fp32.onnx")
    q.quantize_int4(tmp_path / "fp32.onnx", tmp_path / "int4.onnx", block_size=block, accuracy_level=0)
    proto = onnx.load(str(tmp_path / "int4.onnx"))
    (node,) = proto.graph.node
    assert node.op_type == "MatMulNBits" and (attr(node, "K"), attr(node, "N"), attr(node, "bits")) == (k, n, 4)
    assert attr(node, "block_size") == block
    init = {t.name: nh.to_array(t) for t in proto.graph.initializer}
    blocks = k // block
    codes = init[node.input[1]]
    assert codes.dtype == np.uint8 and codes.shape == (n, blocks, block // 2)
    q_NK = unpack_uint4(codes).reshape(n, k).astype(np.float32)
    scales_NB = init[node.input[2]].reshape(n, blocks).astype(np.float32)
    zp_NB = unpack_uint4(init[node.input[3]].reshape(n, -1))[:, :blocks].astype(np.float32)  # padded per row
    w_deq_NK = ((q_NK.reshape(n, blocks, block) - zp_NB[..., None]) * scales_NB[..., None]).reshape(n, k)
    assert 0 < np.abs(w_deq_NK - w_KN.T).max() < 0.5 * np.abs(scales_NB).max() + 1e-6  # round to nearest
    x = rng.standard_normal((7, k)).astype(np.float32)
    (y,) = session(tmp_path / "int4.onnx").run(None, {"x": x})
    np.testing.assert_allclose(y, x.astype(np.float64) @ w_deq_NK.T.astype(np.float64), rtol=1e-5, atol=1e-5)
