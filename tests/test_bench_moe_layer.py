"""The GPU-side benchmarks and check, on this CPU machine: bench.moe_layer runs on CPU at a tiny
config (our MoE, transformers' DeepseekV3MoE with our weights, DeepSpeed's MoE layer) and writes
its JSON; the grouped GEMM benchmark says it skipped without CUDA; bench/gpu_check.sh parses; the
ONNX Runtime provider choice and its MOEOPS_ORT_PROVIDERS override."""

from __future__ import annotations

import json
import shutil
import subprocess

import onnx
import pytest
import torch
from conftest import REPO
from onnx import TensorProto, helper

from bench import grouped_gemm, moe_layer
from moeops.cli import UserError
from moeops.config import make_model_args
from moeops.ort import PROVIDERS_ENV, make_session, session_providers

GPU_CHECK = REPO / "bench" / "gpu_check.sh"


def test_moe_layer_on_cpu_writes_ratios_and_parity(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEOPS_BENCH_OUT", str(tmp_path))
    moe_layer.main(["--device", "cpu", "--flavor", "debug", "--batch", "2", "--seq", "16", "--repeats", "1",
                    "--iters", "1", "--threads", "1"])
    r = json.loads((tmp_path / "moe_layer.json").read_text())
    assert (r["device"], r["dtype"], r["tokens"]) == ("cpu", "fp32", 32)
    assert r["kernels"] == {"routing": "pytorch", "permute": "pytorch", "grouped_mlp": "pytorch"}
    parity = r["parity_vs_transformers"]
    assert parity["output_rel_err"] <= parity["tolerance"] and parity["input_grad_rel_err"] <= parity["tolerance"]
    assert set(r["tokens_per_s"]) == {"moeops", "transformers", "deepspeed"}
    assert all(v > 0 for v in r["tokens_per_s"].values())
    assert set(r["ratio_spread"]) == {"vs_transformers", "vs_deepspeed"}
    assert all(s["n"] == 1 and s["median"] > 0 for s in r["ratio_spread"].values())
    # targets recorded, judged only on a GPU
    assert {k: t["target"] for k, t in r["targets"].items()} == {"vs_transformers": 2.0, "vs_deepspeed": 3.0}
    assert set(r["verdicts"].values()) == {"GPU only"}
    assert r["command"].startswith("python -m bench.moe_layer --device cpu")


def test_moe_layer_parity_check_catches_a_different_function():
    args = make_model_args("debug")
    ours = moe_layer.MoE(args)
    moe_layer.init_moe(ours, args, seed=0)
    theirs = moe_layer.transformers_moe(args, "grouped_mm")
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, args.dim, generator=torch.Generator().manual_seed(0))
    g = torch.randn_like(x)
    assert moe_layer.check_parity(ours, theirs, x, g, 1e-5)["output_rel_err"] <= 1e-5
    with torch.no_grad():
        theirs.experts.down_proj.mul_(1.01)  # 1% off in every routed expert
    with pytest.raises(AssertionError, match="disagree"):
        moe_layer.check_parity(ours, theirs, x, g, 1e-5)
    ds = moe_layer.DeepSpeedWithShared(args, seed=0)  # a different gate: same shape, a different function
    assert ds(x).shape == x.shape and moe_layer.rel_err(ds(x), theirs(x)) > 1e-2


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device: the benchmark runs for real (gpu_check.sh)")
def test_grouped_gemm_skips_without_cuda(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOEOPS_BENCH_OUT", str(tmp_path))
    grouped_gemm.main(["--repeats", "1"])  # returns: exit status 0
    assert capsys.readouterr().out.startswith("skipped: no CUDA device")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit, match="unknown"):
        grouped_gemm.main(["--shapes", "huge"])


def test_gpu_check_script_parses_and_rejects_an_unknown_step():
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)]).returncode == 0
    if shutil.which("shellcheck"):
        lint = subprocess.run(["shellcheck", str(GPU_CHECK)], capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout
    assert GPU_CHECK.stat().st_mode & 0o111  # executable
    bad = subprocess.run(["bash", str(GPU_CHECK), "no_such_step"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown step 'no_such_step'" in bad.stderr


@pytest.fixture
def identity_onnx(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
    path = tmp_path / "identity.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_ort_providers_default_and_valid_override(identity_onnx, monkeypatch):
    import onnxruntime as ort

    import moeops.ort

    monkeypatch.delenv(PROVIDERS_ENV, raising=False)
    cuda = "CUDAExecutionProvider" in ort.get_available_providers() and moeops.ort._nvidia_gpu()
    assert session_providers() == (["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda
                                   else ["CPUExecutionProvider"])  # this machine: CPU only, as before
    # the choice itself, as onnxruntime-gpu would report it, with and without a GPU
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    for gpu, expected in [(True, ["CUDAExecutionProvider", "CPUExecutionProvider"]), (False, ["CPUExecutionProvider"])]:
        monkeypatch.setattr(moeops.ort, "_nvidia_gpu", lambda gpu=gpu: gpu)
        assert session_providers() == expected
    monkeypatch.undo()
    monkeypatch.setenv(PROVIDERS_ENV, " CPUExecutionProvider ")
    assert session_providers() == ["CPUExecutionProvider"]
    assert make_session(identity_onnx).get_providers() == ["CPUExecutionProvider"]


def test_ort_providers_unknown_override_names_the_variable(identity_onnx, monkeypatch):
    monkeypatch.setenv(PROVIDERS_ENV, "CPUExecutionProvider,NoSuchExecutionProvider")
    with pytest.raises(ValueError, match=f"{PROVIDERS_ENV}: 'NoSuchExecutionProvider' is not a provider"):
        session_providers()
    with pytest.raises(UserError, match="NoSuchExecutionProvider"):  # a stage prints it as one line, exit 2
        make_session(identity_onnx)
