"""Chain of custody (issue 10 §1, §3): the gate judges exactly the bytes the export recorded, its parity
and latency figures are the candidate's own, and a damaged or inconsistent model is one line, exit 2,
nothing written. One debug pipeline (quantize → export → evaluate over a student whose context is 16
tokens, shorter than the parity check's default 20 decode steps) is built once per session
(conftest); each test damages a copy of it and runs the real stage."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from conftest import REPO, run_stage, run_stage_in_process, stage_env

from moeops.cli import UserError
from moeops.config import GateParams
from moeops.io import sha256_file
from moeops.model.io import verify_checksums

INT8 = Path("exports/onnx/int8")


@pytest.fixture
def copy(exported_project, tmp_path) -> Path:
    dst = tmp_path / "project"
    shutil.copytree(exported_project, dst)
    return dst


def set_gate(project: Path, **values) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["gate"].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def one_line_exit_2(proc: subprocess.CompletedProcess, *parts: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, f"{proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert err.count("\n") == 0 and "Traceback" not in err and err.startswith("error: "), err
    for part in parts:
        assert part in err, err
    return err


def refuse_gate(project: Path, *parts: str, process: bool = False) -> str:
    """The gate stage's refusal: through its entry point in this process (conftest.run_stage_in_process), or
    as a real `python -m stages.gate` process (one test below)."""
    proc = run_stage("gate", project, check=False) if process else run_stage_in_process("gate", project)
    err = one_line_exit_2(proc, *parts)
    assert not (project / "metrics/gate.json").exists() and not (project / "reports/gate.md").exists()
    return err


def rerecord(model_dir: Path, name: str) -> None:
    """Make lineage.json record `name`'s current bytes: damage that its producer wrote (not a later edit)."""
    record = json.loads((model_dir / "lineage.json").read_text())
    record["checksums"][name] = sha256_file(model_dir / name)
    (model_dir / "lineage.json").write_text(json.dumps(record))


# ----------------------------------------------------------------- the happy path, and what it records


def test_export_fits_parity_to_a_short_context_and_measures_every_variant(exported_project):
    pipeline = exported_project  # conftest: a 16-token student, export's default parity_decode_steps 20
    ex = json.loads((pipeline / "metrics/export.json").read_text())
    assert ex["parity_decode_steps"] == 20
    assert set(ex["parity"]) == {"onnx_fp32", "onnx_int8", "onnx_int4"}
    for entry in ex["parity"].values():  # max_seq_len 16: 20 steps cut to 15 after a 1-token prompt
        assert (entry["prompt_len"], entry["decode_steps"]) == (1, 15)
        assert entry["max_abs_diff"] == max(entry["prefill_max_abs_diff"], entry["decode_max_abs_diff"])
    assert ex["parity"]["onnx_fp32"]["max_abs_diff"] <= 1e-4 < ex["parity"]["onnx_int8"]["max_abs_diff"]
    for variant in ("fp32", "int8", "int4"):  # each published copy carries every file's recorded sha256
        d = pipeline / "exports/onnx" / variant
        checksums = json.loads((d / "lineage.json").read_text())["checksums"]
        assert set(checksums) == {"model.onnx", "config.json", "tokenizer.json"}
        verify_checksums(d)
    ev = json.loads((pipeline / "metrics/eval.json").read_text())["variants"]
    for name in ("onnx_fp32", "onnx_int8", "onnx_int4", "teacher", "student"):
        weights = "model.onnx" if name.startswith("onnx") else "model.safetensors"
        d = pipeline / ("exports/onnx/" + name.removeprefix("onnx_") if name.startswith("onnx") else f"models/{name}")
        assert ev[name]["model_sha256"] == sha256_file(d / weights)


def test_gate_records_the_hashes_it_judged_and_uses_the_candidates_own_parity(copy):
    run_stage("gate", copy)
    gate = json.loads((copy / "metrics/gate.json").read_text())
    recorded = json.loads((copy / INT8 / "lineage.json").read_text())["checksums"]
    assert gate["candidate"]["checksums"] == recorded
    assert gate["lineage"]["inputs"][str(INT8 / "model.onnx")] == recorded["model.onnx"]
    parity = json.loads((copy / "metrics/export.json").read_text())["parity"]
    rule = {r["rule"]: r for r in gate["rules"]}["max_parity_error"]
    assert rule["value"] == parity["onnx_int8"]["max_abs_diff"] != parity["onnx_fp32"]["max_abs_diff"]
    assert rule["threshold"] == GateParams().max_parity_error.onnx_int8 and rule["verdict"] == "pass"
    # The int4 candidate is judged on its own figure against its own budget: a budget below it rejects.
    set_gate(copy, candidate="onnx_int4", max_parity_error={"onnx_int4": parity["onnx_int4"]["max_abs_diff"] / 2})
    run_stage("gate", copy)
    gate = json.loads((copy / "metrics/gate.json").read_text())
    rule = {r["rule"]: r for r in gate["rules"]}["max_parity_error"]
    assert rule["value"] == parity["onnx_int4"]["max_abs_diff"] and rule["verdict"] == "fail"
    assert gate["decision"] == "reject" and gate["candidate"]["checksums"]["model.onnx"] == sha256_file(
        copy / "exports/onnx/int4/model.onnx")


# ----------------------------------------------------------------- §1: the bytes judged are the bytes recorded


def test_a_nudged_int8_scale_that_still_loads_is_refused_naming_both_hashes(copy):
    path = copy / INT8 / "model.onnx"
    proto = onnx.load(path)
    scale = next(t for t in proto.graph.initializer
                 if "scale" in t.name.lower() and t.data_type == onnx.TensorProto.FLOAT)
    values = onnx.numpy_helper.to_array(scale).copy()
    values.flat[0] *= 1.01
    scale.CopyFrom(onnx.numpy_helper.from_array(values, scale.name))
    before = sha256_file(path)
    onnx.save(proto, path)
    from moeops.export.onnx import OnnxLM

    OnnxLM(path, threads=1)  # still a loadable model: only the checksum can tell
    recorded = json.loads((copy / INT8 / "lineage.json").read_text())["checksums"]["model.onnx"]
    assert recorded == before
    refuse_gate(copy, f"{INT8 / 'model.onnx'}: fails its checksum", sha256_file(path), recorded, process=True)


def test_a_candidate_without_lineage_is_refused(copy):
    (copy / INT8 / "lineage.json").unlink()
    refuse_gate(copy, f"{INT8 / 'lineage.json'}: missing")
    (copy / INT8 / "lineage.json").write_text(json.dumps({"stage": "quantize"}))  # readable, records nothing
    refuse_gate(copy, f"{INT8 / 'lineage.json'}: checksums: missing")
    (copy / INT8 / "lineage.json").write_text("{not json")
    refuse_gate(copy, f"{INT8 / 'lineage.json'}: unreadable")


def test_verify_checksums_refuses_a_directory_that_records_nothing(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(UserError, match="lineage.json: missing"):
        verify_checksums(tmp_path)
    (tmp_path / "lineage.json").write_text(json.dumps({"checksums": {"../model.onnx": "0" * 64}}))
    with pytest.raises(UserError, match="is not a file of the directory"):
        verify_checksums(tmp_path)
    sha = sha256_file(tmp_path / "model.onnx")
    (tmp_path / "lineage.json").write_text(json.dumps({"checksums": {"model.onnx": sha}}))
    verify_checksums(tmp_path)


def test_a_stale_latency_figure_is_refused(copy):
    ev = json.loads((copy / "metrics/eval.json").read_text())
    timed = ev["variants"]["onnx_int8"]["model_sha256"]
    ev["variants"]["onnx_int8"]["model_sha256"] = "f" * 64  # timed on other bytes than the candidate's
    (copy / "metrics/eval.json").write_text(json.dumps(ev))
    refuse_gate(copy, "metrics/eval.json: variants.onnx_int8", "f" * 64, timed, "stale figure, re-run evaluate")
    del ev["variants"]["onnx_int8"]["model_sha256"]  # an eval.json from before the figure was recorded
    (copy / "metrics/eval.json").write_text(json.dumps(ev))
    refuse_gate(copy, "variants.onnx_int8.model_sha256: missing; re-run evaluate")


def test_external_data_outside_the_model_directory_is_refused(tmp_path):
    from onnx import TensorProto, helper

    from moeops.export.triton import read_io, write_triton_repo

    (tmp_path / "w.bin").write_bytes(np.ones(4, np.float32).tobytes())  # beside, not inside, the model dir
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for location in ("../w.bin", str(tmp_path / "w.bin"), "sub/../../w.bin"):
        w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1, 4])
        w.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", "0"), ("length", "16")):
            w.external_data.add(key=key, value=value)
        graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [w])
        (model_dir / "model.onnx").write_bytes(helper.make_model(graph).SerializeToString())
        for fn in (lambda: read_io(model_dir / "model.onnx"),
                   lambda: write_triton_repo(model_dir / "model.onnx", tmp_path / "triton", "m", 4, 100)):
            with pytest.raises(UserError, match=rf"model.onnx: external data location '{location}' is outside"):
                fn()
        assert not (tmp_path / "triton").exists()


# ----------------------------------------------------------------- §3: damaged models are one line, not a traceback


def test_a_corrupted_onnx_model_is_one_line_for_the_gate_and_generate(copy):
    path = copy / INT8 / "model.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])  # truncated
    rerecord(copy / INT8, "model.onnx")  # damaged when written: the checksum agrees, the file is still broken
    refuse_gate(copy, f"{INT8 / 'model.onnx'}: not an ONNX model")
    proc = subprocess.run([sys.executable, "-m", "moeops.generate", "--prompt", "def", "--max-new-tokens", "2",
                           "--model", str(INT8)], cwd=copy, env=stage_env(), capture_output=True, text=True,
                          timeout=300)
    one_line_exit_2(proc, f"{INT8 / 'model.onnx'}: not a loadable ONNX model")


def test_onnx_runtime_errors_become_one_line_naming_the_file(tmp_path):
    from moeops.export.onnx import OnnxLM

    for name, data in (("garbage.onnx", b"\x08\x07garbage" * 50), ("empty.onnx", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=rf"{name}: not a loadable ONNX model \(\w+: "):
            OnnxLM(tmp_path / name)
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "other.onnx")
    with pytest.raises(UserError, match="other.onnx: not a moeops decoder"):
        OnnxLM(tmp_path / "other.onnx")


@pytest.mark.parametrize("name,data,expected", [
    ("tokenizer.json", b"\x00garbage", "not a tokenizer"),
    ("config.json", b"{not json", "not a valid model config"),
    ("config.json", b'{"dim": 32, "no_such_field": 1}', "not a valid model config"),
])
def test_a_candidate_file_that_is_not_what_it_claims_is_one_line(copy, name, data, expected):
    (copy / INT8 / name).write_bytes(data)
    rerecord(copy / INT8, name)
    refuse_gate(copy, f"{INT8 / name}: {expected}")


def test_metrics_that_are_not_an_object_are_one_line(copy):
    (copy / "metrics/export.json").write_text("[1, 2]")
    refuse_gate(copy, "metrics/export.json: not a JSON object")


def test_export_of_a_truncated_student_is_one_line_and_writes_nothing(copy):
    weights = copy / "models/student/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    rerecord(copy / "models/student", "model.safetensors")
    shutil.rmtree(copy / "exports")
    (copy / "metrics/export.json").unlink()
    one_line_exit_2(run_stage("export", copy, check=False), "models/student/model.safetensors: cannot load")
    assert not (copy / "exports").exists() and not (copy / "metrics/export.json").exists()


def test_repo_defaults_budget_every_variant():
    params = yaml.safe_load((REPO / "params.yaml").read_text())["gate"]
    budgets = GateParams.model_validate(params).max_parity_error
    assert budgets.onnx_fp32 <= 1e-4 < budgets.onnx_int8 <= budgets.onnx_int4


def test_evaluate_refuses_a_changed_variant_before_any_work(copy):
    path = copy / "exports/onnx/int4/model.onnx"
    path.write_bytes(path.read_bytes()[:-16] + bytes(16))
    (copy / "metrics/eval.json").unlink()
    one_line_exit_2(run_stage("evaluate", copy, check=False), "exports/onnx/int4/model.onnx: fails its checksum")
    assert not (copy / "metrics/eval.json").exists()
