"""End to end: `dvc repro` of a copy of this repository with the debug flavor on a small
generated corpus, then the Prefect flow over the same copy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import DEBUG_PARAMS, REPO, make_corpus

DVC = str(Path(sys.executable).parent / "dvc")


def sh(*argv, cwd, check=True):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONHASHSEED="0")
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode:
        tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}):\n{tail}")
    return proc


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    """The repository's tracked and unignored files, committed into a fresh git repo."""
    dst = tmp_path_factory.mktemp("e2e") / "repo"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dst / f)
    corpus = make_corpus(dst.parent / "corpus")
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["corpus"]["source"] = str(corpus)
    for section, values in DEBUG_PARAMS.items():
        params[section].update(values)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for argv in (["git", "init", "-q"], ["git", "add", "-A"],
                 ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):
        sh(*argv, cwd=dst)
    return dst


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_then_caches(repo_copy):
    sh(DVC, "repro", cwd=repo_copy)
    lock = yaml.safe_load((repo_copy / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"corpus", "prepare", "pretrain", "distill", "quantize", "export", "evaluate"}
    ev = json.loads((repo_copy / "metrics/eval.json").read_text())
    assert ev["val"]["bits_per_byte"] > 0
    assert set(ev["variants"]) == {"teacher", "student", "baseline", "onnx_fp32", "onnx_int8", "onnx_int4"}
    v = ev["variants"]
    assert v["onnx_fp32"]["bits_per_byte"] == pytest.approx(v["student"]["bits_per_byte"], rel=1e-4)
    assert v["onnx_int8"]["file_bytes"] < v["onnx_fp32"]["file_bytes"]
    for path in ("models/teacher/model.safetensors", "data/prepared/train.bin", "reports/data/summary.json",
                 "plots/expert_load.png", "dvclive/pretrain/plots/metrics/train/loss.tsv",
                 "models/student/model.safetensors", "models/baseline/model.safetensors",
                 "exports/onnx/int4/model.onnx", "exports/hf/config.json", "exports/triton/moeops/config.pbtxt"):
        assert (repo_copy / path).is_file(), path
    for args in ([], ["--temperature", "0.8", "--top-p", "0.9", "--seed", "3"]):  # the CLI over the int8 export
        out = sh(sys.executable, "-m", "moeops.generate", "--prompt", "def alpha", "--max-new-tokens", "8", *args,
                 cwd=repo_copy).stdout
        assert out.startswith("def alpha")
    again = sh(DVC, "repro", cwd=repo_copy)
    assert "Running stage" not in again.stdout.replace("Running stage 'corpus'", "")
    shown = json.loads(sh(DVC, "metrics", "show", "--json", cwd=repo_copy).stdout)
    assert "metrics/eval.json" in json.dumps(shown)
    # A changed source file re-runs prepare and everything after it.
    corpus = Path(yaml.safe_load((repo_copy / "params.yaml").read_text())["corpus"]["source"])
    original = (corpus / "mod_000.py").read_text()
    (corpus / "mod_000.py").write_text(original + "\n# changed\n")
    sh(DVC, "repro", "corpus", cwd=repo_copy)
    status = sh(DVC, "status", cwd=repo_copy, check=False).stdout
    assert "prepare" in status and "changed deps" in status
    # Changed back: everything is cached again (the flow test below runs over this repo).
    (corpus / "mod_000.py").write_text(original)
    sh(DVC, "repro", "corpus", cwd=repo_copy)
    assert "changed deps" not in sh(DVC, "status", cwd=repo_copy, check=False).stdout


@pytest.mark.slow
def test_prefect_flow_over_the_same_repo_publishes_eval_metrics(repo_copy, prefect_api, monkeypatch):
    from prefect.client.orchestration import get_client

    from flows.pipeline import pipeline

    if not (repo_copy / "metrics/eval.json").is_file():
        sh(DVC, "repro", cwd=repo_copy)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    state = pipeline(repo=str(repo_copy), return_state=True)
    assert state.is_completed()
    metrics = state.result()
    assert metrics == json.loads((repo_copy / "metrics/eval.json").read_text())

    async def artifacts():
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["eval-metrics"])),
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))

    import asyncio

    found = asyncio.run(artifacts())
    assert len(found) == 1 and "val.bits_per_byte" in str(found[0].data)
