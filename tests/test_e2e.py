"""End to end: `dvc repro` of a copy of this repository with the debug flavor on a small
generated corpus, then the served `retrain` deployment over the same copy: gate, registry, GTO tags."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
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
        if f.split("/")[0] in ("metrics", "dvclive", "plots"):  # the default run's results: this repo makes its own
            continue
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
    assert set(lock["stages"]) == {"corpus", "prepare", "pretrain", "distill", "quantize", "export", "evaluate", "gate"}
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
    gate = json.loads((repo_copy / "metrics/gate.json").read_text())
    assert gate["decision"] == "promote" and gate["champion"] is None  # empty registry: budgets only
    assert [r["verdict"] for r in gate["rules"]] == ["pass", "pass", "pass", "pass", "skip"]
    assert "PROMOTE" in (repo_copy / "reports/gate.md").read_text()
    again = sh(DVC, "repro", cwd=repo_copy)
    # Cached, except the stages that read state outside DVC (the corpus, the registry).
    assert "Running stage" not in again.stdout.replace("Running stage 'corpus'", "").replace("Running stage 'gate'", "")
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


def wait_for(fetch, what: str, within_s: float):
    deadline = time.monotonic() + within_s
    while (value := fetch()) is None:
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)
    return value


@pytest.mark.slow
def test_retrain_deployment_served_and_triggered_promotes(repo_copy, prefect_api, tmp_path):
    """The `retrain` deployment served by flows.retrain against a real Prefect server, triggered
    like the UI's "Run": the pipeline (cached) and the gate run, and the candidate becomes champion."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.exceptions import ObjectNotFound

    from moeops.registry import champion, history

    if not (repo_copy / "metrics/eval.json").is_file():
        sh(DVC, "repro", cwd=repo_copy)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONHASHSEED="0",
               PREFECT_RUNNER_POLL_FREQUENCY="1")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "flows.retrain", "--repo", str(repo_copy)], cwd=repo_copy,
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with get_client(sync_client=True) as client:
            def deployment():
                with contextlib.suppress(ObjectNotFound):
                    return client.read_deployment_by_name("pipeline/retrain")
            found = wait_for(deployment, "the retrain deployment", 120)
            assert found.schedules[0].schedule.cron == "0 3 * * 1"
            run = client.create_flow_run_from_deployment(found.id)
            final = wait_for(lambda: (s := client.read_flow_run(run.id).state).is_final() and s or None,
                             "the triggered run", 600)
            assert final.is_completed(), f"{final}\n{log.read_text()[-4000:]}"
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["gate"]), flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert len(artifacts) == 1 and "promoted" in artifacts[0].data and "| max_regression |" in artifacts[0].data
    root = repo_copy / "registry"
    assert champion(root, "moeops") == "v1"
    assert [e["action"] for e in history(root, "moeops")] == ["register", "promote"]
    tags = sh("git", "tag", cwd=repo_copy).stdout.split()
    assert "moeops@v1.0.0" in tags and "moeops#prod#1" in tags

    # The gate now compares against the champion (the same model: no change), and a budget the
    # candidate misses rejects it: the stage succeeds, promotion exits 1 and changes nothing.
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["gate"]["max_bits_per_byte"] = 0.5
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(DVC, "repro", "--single-item", "gate", cwd=repo_copy)
    gate = json.loads((repo_copy / "metrics/gate.json").read_text())
    assert gate["decision"] == "reject" and gate["champion"]["version"] == "v1"
    assert gate["champion"]["bootstrap"]["relative_change"] == 0.0
    assert {r["rule"]: r["verdict"] for r in gate["rules"]}["max_regression"] == "pass"
    rejected = sh(sys.executable, "-m", "moeops", "promote", "--from-gate", "metrics/gate.json", cwd=repo_copy,
                  check=False)
    assert rejected.returncode == 1 and "max_bits_per_byte" in rejected.stderr
    assert champion(root, "moeops") == "v1" and len(history(root, "moeops")) == 2
