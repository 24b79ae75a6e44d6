"""Triton model repository (config.pbtxt read back against the ONNX model it serves) and the
TensorRT build (skips with a reason without an NVIDIA GPU and TensorRT EP)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from moeops.cli import UserError
from moeops.export import tensorrt
from moeops.export.tensorrt import build_tensorrt
from moeops.export.triton import write_triton_repo

LAYERS, VOCAB, LATENT, ROPE = 2, 11, 6, 4


def toy_lm(layers: int = LAYERS, batch_dim: str | int = "batch") -> onnx.ModelProto:
    """A model with exactly the exported LM's IO: logits = a row per token, and each present
    cache = past ++ one row per new token."""
    b = batch_dim
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [b, "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [b, "total"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [b, "seq", VOCAB])]
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((VOCAB, VOCAB)).astype(np.float32), "lm_table")]
    nodes = [helper.make_node("Gather", ["lm_table", "input_ids"], ["logits"])]
    for i in range(layers):
        for kind, width in (("latent", LATENT), ("rope", ROPE)):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}.{i}", TensorProto.FLOAT, [b, "past", width]))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}.{i}", TensorProto.FLOAT, [b, "total", width]))
            table = f"{kind}_table.{i}"
            inits.append(numpy_helper.from_array(rng.standard_normal((VOCAB, width)).astype(np.float32), table))
            nodes += [helper.make_node("Gather", [table, "input_ids"], [f"new_{kind}.{i}"]),
                      helper.make_node("Concat", [f"past_{kind}.{i}", f"new_{kind}.{i}"], [f"present_{kind}.{i}"],
                                       axis=1)]
    graph = helper.make_graph(nodes, "toy_lm", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime of the last years
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def onnx_file(tmp_path) -> Path:
    path = tmp_path / "src" / "model.onnx"
    path.parent.mkdir()
    onnx.save(toy_lm(), str(path))
    return path


# ---------------------------------------------------------------- a small protobuf text-format reader


TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,"]+')


def parse_pbtxt(text: str) -> dict:
    """Protobuf text format -> {field: [values]} (messages as dicts, `[a, b]` lists flattened).
    Enough for config.pbtxt; stands in for Triton's model_config proto, which is not installed."""
    tokens = TOKEN.findall(re.sub(r"#.*", "", text))
    pos = 0

    def scalar(tok: str):
        if tok.startswith('"'):
            return json.loads(tok)
        return int(tok) if re.fullmatch(r"-?\d+", tok) else tok

    def value():
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok == "{":
            return message("}")
        return scalar(tok)

    def message(end: str | None) -> dict:
        nonlocal pos
        msg: dict = {}
        while pos < len(tokens) and tokens[pos] != end:
            key = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            if tokens[pos] == "[":
                pos += 1
                while tokens[pos] != "]":
                    msg.setdefault(key, []).append(value())
                    if tokens[pos] == ",":
                        pos += 1
                pos += 1
                msg.setdefault(key, [])
            else:
                msg.setdefault(key, []).append(value())
        pos += 1  # the closing brace
        return msg

    return message(None)


def test_parse_pbtxt_reads_nested_messages_and_lists():
    got = parse_pbtxt('name: "m"  # comment\nx [ { a: 1 }, { a: -2 } ]\ny { k: "v" dims: [ 1, 0 ] z: true }\n')
    assert got == {"name": ["m"], "x": [{"a": [1]}, {"a": [-2]}], "y": [{"k": ["v"], "dims": [1, 0], "z": ["true"]}]}


# ---------------------------------------------------------------- Triton repository


TRITON_TYPE = {TensorProto.INT64: "TYPE_INT64", TensorProto.FLOAT: "TYPE_FP32"}
NP_TYPE = {"TYPE_INT64": np.int64, "TYPE_FP32": np.float32}


def onnx_io(values) -> list[tuple[str, str, list[int]]]:
    """(name, Triton type, dims without batch) as the config must say, from the graph."""
    return [(v.name, TRITON_TYPE[v.type.tensor_type.elem_type],
             [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim[1:]])
            for v in values]


def config_io(entries) -> list[tuple[str, str, list[int]]]:
    return [(e["name"][0], e["data_type"][0], e["dims"]) for e in entries]


def test_repository_layout_and_config_match_the_onnx_model(tmp_path, onnx_file):
    out = tmp_path / "triton"
    write_triton_repo(onnx_file, out, "moeops_lm", max_batch_size=8, max_queue_delay_us=1500)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "README.md", "moeops_lm/1/model.onnx", "moeops_lm/config.pbtxt", "moeops_lm/warmup/attention_mask_ones"]
    assert (out / "moeops_lm/1/model.onnx").read_bytes() == onnx_file.read_bytes()

    cfg = parse_pbtxt((out / "moeops_lm/config.pbtxt").read_text())
    assert cfg["name"] == ["moeops_lm"] and cfg["max_batch_size"] == [8]
    assert cfg["platform"] == ["onnxruntime_onnx"] and cfg["backend"] == ["onnxruntime"]
    model = onnx.load(str(onnx_file))
    assert config_io(cfg["input"]) == onnx_io(model.graph.input)
    assert config_io(cfg["output"]) == onnx_io(model.graph.output)
    caches = [f"past_{k}.{i}" for i in range(LAYERS) for k in ("latent", "rope")]
    assert [name for name, _, _ in config_io(cfg["input"])] == ["input_ids", "attention_mask", *caches]
    assert config_io(cfg["input"])[2] == ("past_latent.0", "TYPE_FP32", [-1, LATENT])
    assert config_io(cfg["output"])[0] == ("logits", "TYPE_FP32", [-1, VOCAB])
    [batching] = cfg["dynamic_batching"]
    assert batching == {"preferred_batch_size": [2, 4, 8], "max_queue_delay_microseconds": [1500]}
    [group] = cfg["instance_group"]
    assert group["count"] == [1] and group["kind"][0] in ("KIND_AUTO", "KIND_CPU", "KIND_GPU")
    readme = (out / "README.md").read_text()
    assert "tritonserver --model-repository" in readme and "KV cache is passed by the client" in readme


def test_warmup_is_a_concrete_batch1_prefill_that_runs(tmp_path, onnx_file):
    out = tmp_path / "triton"
    write_triton_repo(onnx_file, out, "lm", max_batch_size=4, max_queue_delay_us=0)
    model_dir = out / "lm"
    [warmup] = parse_pbtxt((model_dir / "config.pbtxt").read_text())["model_warmup"]
    assert warmup["batch_size"] == [1]
    samples = {entry["key"][0]: entry["value"][0] for entry in warmup["inputs"]}
    inputs = {name: (dtype, dims) for name, dtype, dims in config_io(
        parse_pbtxt((model_dir / "config.pbtxt").read_text())["input"])}
    assert set(samples) == set(inputs)
    feed = {}
    for name, sample in samples.items():
        dims = sample["dims"]
        assert all(d >= 0 for d in dims), f"{name}: warm-up dims must be concrete, got {dims}"
        assert sample["data_type"] == [inputs[name][0]]
        assert all(c in (-1, d) for c, d in zip(inputs[name][1], dims, strict=True))  # fits the declared dims
        dtype = NP_TYPE[sample["data_type"][0]]
        if "input_data_file" in sample:  # Triton reads warmup/<file> as raw row-major bytes
            raw = (model_dir / "warmup" / sample["input_data_file"][0]).read_bytes()
            feed[name] = np.frombuffer(raw, dtype).reshape(1, *dims)
        else:
            assert sample["zero_data"] == ["true"]
            feed[name] = np.zeros((1, *dims), dtype)
    # a prefill: prompt and mask of the same length, an empty cache, a mask of ones
    assert feed["input_ids"].shape[1] == feed["attention_mask"].shape[1] > 0
    assert feed["past_latent.0"].shape == (1, 0, LATENT) and (feed["attention_mask"] == 1).all()
    session = ort.InferenceSession(str(model_dir / "1/model.onnx"), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    seq = feed["input_ids"].shape[1]
    assert got["logits"].shape == (1, seq, VOCAB) and got["present_rope.1"].shape == (1, seq, ROPE)


def test_external_data_is_copied_next_to_the_model(tmp_path):
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    onnx.save(toy_lm(), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    out = tmp_path / "triton"
    write_triton_repo(src, out, "lm", max_batch_size=1, max_queue_delay_us=100)
    assert (out / "lm/1/model.onnx.data").read_bytes() == (src.parent / "model.onnx.data").read_bytes()
    cfg = parse_pbtxt((out / "lm/config.pbtxt").read_text())
    assert cfg["dynamic_batching"] == [{"max_queue_delay_microseconds": [100]}]  # no preferred sizes at 1
    session = ort.InferenceSession(str(out / "lm/1/model.onnx"), providers=["CPUExecutionProvider"])
    assert len(session.get_outputs()) == 1 + 2 * LAYERS


def test_rewrite_replaces_the_repository_and_bad_input_writes_nothing(tmp_path, onnx_file):
    out = tmp_path / "triton"
    write_triton_repo(onnx_file, out, "old", max_batch_size=2, max_queue_delay_us=0)
    write_triton_repo(onnx_file, out, "new", max_batch_size=2, max_queue_delay_us=0)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "new"]

    fixed = tmp_path / "fixed.onnx"
    onnx.save(toy_lm(batch_dim=1), str(fixed))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    cases = [(tmp_path / "missing.onnx", "lm", 2, "missing"), (garbage, "lm", 2, "not an ONNX model"),
             (fixed, "lm", 2, "batch dim is fixed"), (onnx_file, "a/b", 2, "model_name"),
             (onnx_file, "lm", 0, "max_batch_size")]
    for path, name, batch, message in cases:
        with pytest.raises(UserError, match=message) as e:
            write_triton_repo(path, out, name, max_batch_size=batch, max_queue_delay_us=0)
        assert "\n" not in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "new"]  # the previous repository stands
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp directory left


# ---------------------------------------------------------------- the real export, read by protobuf


def model_config_class():
    """The part of Triton's model_config.proto (inference.ModelConfig) that config.pbtxt uses, with
    Triton's field names, numbers, types and enums, so protobuf's own text-format parser reads the
    file strictly (an unknown field, a misspelled enum or a string where a number belongs fails).
    tritonclient, which ships the full generated module, is not installed here."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(name="model_config_subset.proto", package="inference", syntax="proto3")
    data_type = fd.enum_type.add(name="DataType")
    for number, name in enumerate(["TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32",
                                   "TYPE_UINT64", "TYPE_INT8", "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16",
                                   "TYPE_FP32", "TYPE_FP64", "TYPE_STRING", "TYPE_BF16"]):
        data_type.value.add(name=name, number=number)

    def message(parent, name, *fields):
        m = parent.add(name=name)
        for field, number, kind, repeated, type_name in fields:
            f = m.field.add(name=field, number=number, type=kind,
                            label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL)
            if type_name:
                f.type_name = type_name
        return m

    string, enum, msg = F.TYPE_STRING, F.TYPE_ENUM, F.TYPE_MESSAGE
    message(fd.message_type, "ModelInput", ("name", 1, string, False, None),
            ("data_type", 2, enum, False, ".inference.DataType"), ("dims", 4, F.TYPE_INT64, True, None))
    message(fd.message_type, "ModelOutput", ("name", 1, string, False, None),
            ("data_type", 2, enum, False, ".inference.DataType"), ("dims", 3, F.TYPE_INT64, True, None))
    group = message(fd.message_type, "ModelInstanceGroup", ("name", 1, string, False, None),
                    ("count", 2, F.TYPE_INT32, False, None),
                    ("kind", 4, enum, False, ".inference.ModelInstanceGroup.Kind"))
    kind = group.enum_type.add(name="Kind")
    for number, name in enumerate(["KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"]):
        kind.value.add(name=name, number=number)
    message(fd.message_type, "ModelDynamicBatching", ("preferred_batch_size", 1, F.TYPE_INT32, True, None),
            ("max_queue_delay_microseconds", 2, F.TYPE_UINT64, False, None))
    warmup = message(fd.message_type, "ModelWarmup", ("name", 1, string, False, None),
                     ("batch_size", 2, F.TYPE_UINT32, False, None),
                     ("inputs", 3, msg, True, ".inference.ModelWarmup.InputsEntry"))
    message(warmup.nested_type, "Input", ("data_type", 1, enum, False, ".inference.DataType"),
            ("dims", 2, F.TYPE_INT64, True, None), ("zero_data", 3, F.TYPE_BOOL, False, None),
            ("random_data", 4, F.TYPE_BOOL, False, None), ("input_data_file", 5, string, False, None))
    entry = message(warmup.nested_type, "InputsEntry", ("key", 1, string, False, None),
                    ("value", 2, msg, False, ".inference.ModelWarmup.Input"))
    entry.options.map_entry = True
    message(fd.message_type, "ModelConfig", ("name", 1, string, False, None), ("platform", 2, string, False, None),
            ("max_batch_size", 4, F.TYPE_INT32, False, None), ("input", 5, msg, True, ".inference.ModelInput"),
            ("output", 6, msg, True, ".inference.ModelOutput"),
            ("instance_group", 7, msg, True, ".inference.ModelInstanceGroup"),
            ("dynamic_batching", 11, msg, False, ".inference.ModelDynamicBatching"),
            ("model_warmup", 16, msg, True, ".inference.ModelWarmup"), ("backend", 17, string, False, None))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


ORT_TYPE = {"tensor(int64)": "TYPE_INT64", "tensor(float)": "TYPE_FP32"}


def ort_io(args) -> list[tuple[str, str, list[int]]]:
    """(name, Triton type, dims after the batch dim, -1 where dynamic) as ONNX Runtime sees the graph."""
    return [(a.name, ORT_TYPE[a.type], [d if isinstance(d, int) else -1 for d in a.shape[1:]]) for a in args]


def test_config_of_the_real_debug_export_matches_its_graph(exported_project, tmp_path):
    """A debug student exported and quantized by the real quantize and export stages (conftest's
    session-wide exported_project: int8, the default export.triton_variant); config.pbtxt parsed by
    protobuf against Triton's schema, compared with the graph ONNX Runtime loads from the repository."""
    from google.protobuf import text_format

    from moeops.config import load_model_args

    int8 = exported_project / "exports/onnx/int8"
    args = load_model_args(int8 / "config.json")
    out = tmp_path / "triton"
    write_triton_repo(int8 / "model.onnx", out, "moeops", max_batch_size=8, max_queue_delay_us=2000)
    cfg = text_format.Parse((out / "moeops/config.pbtxt").read_text(), model_config_class()())
    session = ort.InferenceSession(str(out / "moeops/1/model.onnx"), providers=["CPUExecutionProvider"])
    enum = cfg.DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name["data_type"].enum_type
    got_in = [(i.name, enum.values_by_number[i.data_type].name, list(i.dims)) for i in cfg.input]
    got_out = [(o.name, enum.values_by_number[o.data_type].name, list(o.dims)) for o in cfg.output]
    assert got_in == ort_io(session.get_inputs()) and got_out == ort_io(session.get_outputs())
    # What the graph is, independently of how it was read: ids and mask [B, S|T], a latent and a
    # rope cache per layer [B, past, width], logits [B, S, V].
    caches = [f"past_{k}.{i}" for i in range(args.n_layers) for k in ("latent", "rope")]
    assert [n for n, _, _ in got_in] == ["input_ids", "attention_mask", *caches]
    assert got_in[0] == ("input_ids", "TYPE_INT64", [-1]) and got_in[1] == ("attention_mask", "TYPE_INT64", [-1])
    assert got_in[2] == ("past_latent.0", "TYPE_FP32", [-1, args.kv_lora_rank])
    assert got_in[3] == ("past_rope.0", "TYPE_FP32", [-1, args.qk_rope_head_dim])
    assert got_out[0] == ("logits", "TYPE_FP32", [-1, args.vocab_size])
    assert [n for n, _, _ in got_out[1:]] == [c.replace("past_", "present_") for c in caches]
    assert cfg.max_batch_size == 8 and cfg.backend == "onnxruntime" and cfg.platform == "onnxruntime_onnx"
    assert list(cfg.dynamic_batching.preferred_batch_size) == [2, 4, 8]
    [warmup] = cfg.model_warmup
    assert sorted(warmup.inputs) == sorted(n for n, _, _ in got_in)
    assert [i.count for i in cfg.instance_group] == [1]
    with pytest.raises(text_format.ParseError):  # the parser is strict: a field Triton does not know fails
        text_format.Parse((out / "moeops/config.pbtxt").read_text() + "max_batch: 3\n", model_config_class()())


# ---------------------------------------------------------------- TensorRT


def trt_available() -> bool:
    return "TensorrtExecutionProvider" in ort.get_available_providers() and tensorrt.nvidia_gpu() is not None


def test_tensorrt_skips_with_a_reason_here_or_when_off(tmp_path, onnx_file):
    off = build_tensorrt(onnx_file, tmp_path / "trt", mode="off")
    assert off == {"status": "skipped", "reason": "mode off (export.tensorrt)"}
    if not trt_available():
        auto = build_tensorrt(onnx_file, tmp_path / "trt")
        assert auto["status"] == "skipped"
        assert "NVIDIA GPU" in auto["reason"] or "TensorrtExecutionProvider" in auto["reason"]
    assert not (tmp_path / "trt").exists()
    with pytest.raises(UserError, match="export.tensorrt"):
        build_tensorrt(onnx_file, tmp_path / "trt", mode="on")


def test_tensorrt_on_a_gpu_without_the_tensorrt_provider_says_so(tmp_path, onnx_file, monkeypatch):
    monkeypatch.setattr(tensorrt, "nvidia_gpu", lambda: "GPU 0: NVIDIA H200 (fake)")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    got = build_tensorrt(onnx_file, tmp_path / "trt")
    assert got["status"] == "skipped" and got["reason"].startswith("onnxruntime-gpu")
    assert "TensorrtExecutionProvider" in got["reason"]


@pytest.mark.filterwarnings("ignore:Specified provider")  # the CPU build lacks TensorRT/CUDA EPs, by design here
def test_tensorrt_build_failure_is_reported_not_raised(tmp_path, monkeypatch):
    monkeypatch.setattr(tensorrt, "skip_reason", lambda mode: None)  # pretend: GPU and TensorRT EP
    got = build_tensorrt(tmp_path / "missing.onnx", tmp_path / "trt")
    assert got["status"] == "failed" and got["reason"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no engine cache, no temp directory


def test_prefill_feed_is_a_batch1_prefill(onnx_file):
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    feed = tensorrt.prefill_feed(session.get_inputs(), session.get_outputs(), seq=5)
    assert feed["input_ids"].shape == (1, 5) and feed["input_ids"].max() < VOCAB
    assert len(set(feed["input_ids"].ravel().tolist())) > 1  # distinct tokens, so the MoE routes them apart
    assert (feed["attention_mask"] == 1).all() and feed["attention_mask"].shape == (1, 5)
    assert feed["past_rope.1"].shape == (1, 0, ROPE)
    assert session.run(None, feed)[0].shape == (1, 5, VOCAB)


@pytest.mark.skipif(not trt_available(), reason="needs an NVIDIA GPU and onnxruntime-gpu with the TensorRT EP")
def test_tensorrt_builds_an_engine_cache_on_gpu(tmp_path, onnx_file):
    got = build_tensorrt(onnx_file, tmp_path / "trt")
    assert got["status"] == "built", got
    assert got["prefill_latency_ms"] > 0 and any((tmp_path / "trt").iterdir())
