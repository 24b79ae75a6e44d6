"""Promotion from a gate.json: registry changes on promote only, and every kind of bad input
(another run's gate.json, a moved champion, a missing candidate, an unwritable registry) is one
line, exit 2, and leaves the registry as it was. Small stand-in files: the registry only hashes them
(the real stages' artifacts are registered in test_e2e)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from moeops.cli import UserError
from moeops.io import sha256_file
from moeops.registry import champion, history, resolve, verify
from moeops.registry.promotion import ARTIFACTS, promote_from_gate

ROOT = Path(__file__).resolve().parents[1]
JUDGED = ["exports/onnx/int8/model.onnx", "exports/onnx/int8/tokenizer.json", "metrics/eval.json"]


def write_lineage(model_dir: Path) -> None:
    """The lineage.json a producing stage writes: the sha256 of every file of the directory."""
    checksums = {p.name: sha256_file(p) for p in sorted(model_dir.iterdir()) if p.name != "lineage.json"}
    (model_dir / "lineage.json").write_text(json.dumps({"stage": "export", "checksums": checksums}))


def retrain(repo: Path, content: str, variant: str = "int8") -> None:
    """A new candidate, as the stages write it: the model and the lineage.json recording it."""
    (repo / f"exports/onnx/{variant}/model.onnx").write_text(content)
    write_lineage(repo / f"exports/onnx/{variant}")


def write_gate(repo: Path, decision: str = "promote", champion_version: str | None = None) -> Path:
    gate = {"decision": decision, "reasons": [] if decision == "promote" else ["max_bits_per_byte: val bits/byte 3.1"],
            "candidate": {"variant": "onnx_int8", "bits_per_byte": 1.7},
            "lineage": {"inputs": {p: sha256_file(repo / p) for p in JUDGED}, "champion": champion_version}}
    path = repo / "metrics/gate.json"
    path.write_text(json.dumps(gate))
    return path


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    for src in ARTIFACTS.values():
        path = repo / src
        if src.startswith("exports/"):
            path.mkdir(parents=True)
            for name in ("model.onnx", "tokenizer.json", "config.json"):
                (path / name).write_text(f"{src}/{name}")
            write_lineage(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(src)
    # canary off: a passing gate promotes at once (the canary's challenger path: test_canary_* below)
    (repo / "params.yaml").write_text(yaml.safe_dump({"registry": {"root": "reg", "name": "lm", "gto_tags": "off"},
                                                      "rollout": {"canary": False}}))
    write_gate(repo)
    return repo


def cli(repo: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "moeops", "promote", "--from-gate", "metrics/gate.json", *args],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=120)


def test_promote_registers_the_run_then_a_new_candidate_replaces_it(repo):
    first = promote_from_gate(Path("metrics/gate.json"), repo)
    assert first["registered"] and first["champion"] == "v1" and first["previous"] is None
    v1 = resolve(repo / "reg", "lm", "champion")
    assert (v1 / "onnx/int4/model.onnx").read_text() == "exports/onnx/int4/model.onnx"
    for registered in ("hf/config.json", "tokenizer.json", "metrics/eval.json", "metrics/gate.json", "reports/gate.md",
                       "dvc.lock", "params.yaml"):
        assert (v1 / registered).is_file(), registered
    manifest = json.loads((v1 / "manifest.json").read_text())
    judged = json.loads((repo / "metrics/gate.json").read_text())["lineage"]["inputs"]
    assert manifest["lineage"]["gate"]["inputs"] == judged
    # the export's recorded hashes travel with the version: export -> gate -> registry is checkable end to end
    exported = manifest["lineage"]["export_checksums"]
    assert exported["onnx/int8/model.onnx"] == judged["exports/onnx/int8/model.onnx"] == sha256_file(
        v1 / "onnx/int8/model.onnx")
    assert set(exported) == {f"{d}/{n}" for d in ("onnx/fp32", "onnx/int8", "onnx/int4", "hf")
                             for n in ("model.onnx", "tokenizer.json", "config.json")}
    assert manifest["lineage"]["dvc_lock_sha256"] == sha256_file(repo / "dvc.lock")

    # The same model judged again: nothing to register (even by a gate that ran before v1 existed).
    for judged_champion in ("v1", None):
        write_gate(repo, champion_version=judged_champion)
        assert "v1 is this model already" in promote_from_gate(Path("metrics/gate.json"), repo)["reasons"][0]
    # A retrained candidate: v2 becomes champion, v1 the rollback target.
    retrain(repo, "retrained")
    write_gate(repo, champion_version="v1")
    proc = cli(repo)
    assert proc.returncode == 0 and "registered v2" in proc.stdout and "previous: v1" in proc.stdout
    assert champion(repo / "reg", "lm") == "v2"
    assert [e["action"] for e in history(repo / "reg", "lm")] == ["register", "promote", "register", "promote"]


def test_reject_leaves_the_registry_alone_and_exits_1(repo):
    promote_from_gate(Path("metrics/gate.json"), repo)
    retrain(repo, "worse")
    write_gate(repo, "reject", champion_version="v1")
    before = (repo / "reg/audit.jsonl").read_bytes()
    proc = cli(repo)
    assert proc.returncode == 1
    assert "REJECTED" in proc.stderr and "max_bits_per_byte: val bits/byte 3.1" in proc.stderr
    assert champion(repo / "reg", "lm") == "v1" and (repo / "reg/audit.jsonl").read_bytes() == before


def bad(repo: Path, message: str, env: dict | None = None) -> None:
    reg_before = sorted(p.relative_to(repo) for p in repo.rglob("reg/**/*"))
    proc = cli(repo, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert sorted(p.relative_to(repo) for p in repo.rglob("reg/**/*")) == reg_before


def test_bad_input_is_one_line_exit_2_and_registers_nothing(repo, tmp_path):
    # A gate.json from another run: the judged model is not the one on disk.
    retrain(repo, "another run")
    bad(repo, "metrics/gate.json: lineage mismatch: exports/onnx/int8/model.onnx changed since the gate ran")
    write_gate(repo)
    promote_from_gate(Path("metrics/gate.json"), repo)
    # A new candidate, judged when there was no champion yet: v1 was promoted since.
    retrain(repo, "new")
    write_gate(repo)
    bad(repo, "champion changed: the gate compared against champion none, the registry's champion is now v1")
    # A candidate artifact the gate did not judge is gone.
    write_gate(repo, champion_version="v1")
    os.rename(repo / "exports/hf", repo / "hf.moved")
    bad(repo, "exports/hf: missing (registered as hf)")
    os.rename(repo / "hf.moved", repo / "exports/hf")
    # No gate.json, or not the gate's.
    (repo / "metrics/gate.json").write_text(json.dumps({"decision": "maybe"}))
    bad(repo, "metrics/gate.json: decision: expected one of ['promote', 'reject']")
    (repo / "metrics/gate.json").unlink()
    bad(repo, "metrics/gate.json: no such file")
    # A registry that cannot be written (its parent is a file; chmod does not stop root).
    write_gate(repo, champion_version=None)
    (tmp_path / "afile").write_text("")
    bad(repo, "cannot create the registry", env={"MOEOPS_REGISTRY": str(tmp_path / "afile" / "reg")})
    assert champion(repo / "reg", "lm") == "v1"


def test_promote_flow_publishes_the_decision(repo, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.promote import main

    (repo / "reports/gate.md").write_text("# Gate: **PROMOTE**\n")
    write_gate(repo)
    main(["--from-gate", "metrics/gate.json", "--repo", str(repo)])
    assert champion(repo / "reg", "lm") == "v1"
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["gate"])))
    assert any("**lm: promoted** — registered v1" in a.data and "# Gate: **PROMOTE**" in a.data for a in artifacts)
    (repo / "exports/onnx/int8/model.onnx").write_text("changed after the gate")
    with pytest.raises(SystemExit) as exit_:  # not the model the gate judged
        main(["--from-gate", "metrics/gate.json", "--repo", str(repo)])
    assert exit_.value.code == 2


def test_registry_params_are_validated(repo):
    (repo / "params.yaml").write_text(yaml.safe_dump({"registry": {"name": "../up"}}))
    with pytest.raises(UserError, match=r"registry.name: String should match pattern"):
        promote_from_gate(Path("metrics/gate.json"), repo)


def test_only_the_bytes_the_export_recorded_are_registered(repo):
    """The issue's case: one byte of the int8 model nudged after the export (the gate judged the nudged file):
    its lineage.json still records the exported sha256, so nothing is registered; the line names both hashes."""
    exported = sha256_file(repo / "exports/onnx/int8/model.onnx")
    (repo / "exports/onnx/int8/model.onnx").write_text("exports/onnx/int8/model.onnx nudged")
    write_gate(repo)  # the gate ran on the nudged file
    nudged = sha256_file(repo / "exports/onnx/int8/model.onnx")
    bad(repo, f"exports/onnx/int8/model.onnx: fails its checksum (sha256 {nudged}, lineage.json records {exported})")
    # A model directory that records nothing is refused, not "nothing to check" (in-process from here: quicker).
    retrain(repo, "exports/onnx/int8/model.onnx")
    (repo / "exports/hf/lineage.json").unlink()
    write_gate(repo)
    with pytest.raises(UserError, match="exports/hf/lineage.json: missing"):
        promote_from_gate(Path("metrics/gate.json"), repo)
    write_lineage(repo / "exports/hf")
    # A symlink out of a registered directory is refused, naming it (the registry never follows it).
    (tmp := repo.parent / "outside.bin").write_text("not part of the export")
    (repo / "exports/onnx/fp32/extra.bin").symlink_to(tmp)
    with pytest.raises(UserError, match="exports/onnx/fp32/extra.bin: a symlink to .*outside.bin, outside "):
        promote_from_gate(Path("metrics/gate.json"), repo)
    (repo / "exports/onnx/fp32/extra.bin").unlink()
    assert not (repo / "reg").exists()
    # All consistent: registered, and `moeops registry verify` checks the files against the export's hashes.
    assert promote_from_gate(Path("metrics/gate.json"), repo)["version"] == "v1"
    assert verify(repo / "reg", "lm") == ["v1"]


def test_two_promotions_judged_against_the_same_champion_one_wins(repo, tmp_path):
    """Two candidates, both judged against champion v1, promoted at the same time by two processes: both pass the
    early champion check and stage their copies (the test holds the registry lock until both have), then the check,
    the commit and the alias move happen under one lock, so exactly one wins and the other registers nothing."""
    from moeops.registry.store import registry_lock

    promote_from_gate(Path("metrics/gate.json"), repo)
    other = tmp_path / "other"
    shutil.copytree(repo, other, ignore=shutil.ignore_patterns("reg"))
    (other / "params.yaml").write_text(yaml.safe_dump({"registry": {"root": str(repo / "reg"), "name": "lm",
                                                                    "gto_tags": "off"}, "rollout": {"canary": False}}))
    for r, content in ((repo, "candidate A"), (other, "candidate B")):
        retrain(r, content)
        write_gate(r, champion_version="v1")
    reg = repo / "reg"
    audit = (reg / "audit.jsonl").read_text()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with registry_lock(reg):
        procs = [subprocess.Popen([sys.executable, "-m", "moeops", "promote", "--from-gate", "metrics/gate.json"],
                                  cwd=r, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in (repo, other)]
        deadline = time.monotonic() + 120
        while len(os.listdir(reg / ".staging")) < 2:  # both are past the early check, copying or waiting
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, [p.communicate() for p in
                                                                                          procs]
            time.sleep(0.05)
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    assert sorted(rc for rc, _, _ in results) == [0, 2], results
    [(_, won, _)] = [r for r in results if r[0] == 0]
    [(_, _, lost)] = [r for r in results if r[0] == 2]
    assert "registered v2" in won and lost.count("\n") == 1, results
    assert lost.startswith("error: ") and ("metrics/gate.json: champion changed: the gate compared against champion "
                                           "v1, the registry's champion is now v2; re-run the gate stage") in lost, lost
    assert sorted(os.listdir(reg / "versions/lm")) == ["v1", "v2"] and os.listdir(reg / ".staging") == []
    new = (reg / "audit.jsonl").read_text()[len(audit):].splitlines()
    assert [json.loads(x)["action"] for x in new] == ["register", "promote"]
    winner = repo if "candidate A" in (reg / "versions/lm/v2/onnx/int8/model.onnx").read_text() else other
    assert (winner is repo) == (results[0][0] == 0)


def canary_params(repo: Path, **rollout) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["rollout"] = {"canary": True, "traffic_ratio": 0.2, **rollout}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))


def test_canary_a_passing_gate_makes_a_challenger_under_the_champion_check(repo):
    from moeops.registry import list_models, promote

    canary_params(repo)
    first = promote_from_gate(Path("metrics/gate.json"), repo)  # no champion yet: nothing to compare, promoted
    assert first["champion"] == "v1" and first["challenger"] is None
    retrain(repo, "retrained")
    write_gate(repo, champion_version="v1")
    out = promote_from_gate(Path("metrics/gate.json"), repo)
    assert (out["challenger"], out["champion"], out["weight"]) == ("v2", "v1", 0.2)
    [m] = list_models(repo / "reg")
    assert (m["champion"], m["challenger"], m["challenger_weight"]) == ("v1", "v2", 0.2)
    assert history(repo / "reg", "lm")[-1]["reason"] == "gate promote vs v1; canary; challenger weight 0.2"
    # judged against v1, but the champion moved: nothing registered (checked under the registry lock)
    promote(repo / "reg", "lm", "v2", "by hand")
    retrain(repo, "third")
    write_gate(repo, champion_version="v1")
    bad(repo, "champion changed: the gate compared against champion v1, the registry's champion is now v2")


def test_canary_without_prometheus_ends_inconclusive_in_one_line(repo, prefect_api):
    """`python -m flows.promote` on a laptop without Prometheus or a server: the challenger is registered, the
    canary cannot measure it, so it is left at weight 0 (neither promoted nor rejected), exit 3, one line."""
    from moeops.registry import list_models
    from tests.conftest import free_port

    closed = f"http://127.0.0.1:{free_port()}"
    promote_from_gate(Path("metrics/gate.json"), repo)
    canary_params(repo, prometheus_url=closed, server_url=closed)
    retrain(repo, "retrained")
    write_gate(repo, champion_version="v1")
    proc = subprocess.run([sys.executable, "-m", "flows.promote", "--from-gate", "metrics/gate.json"], cwd=repo,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"lm: canary inconclusive, v2 left at weight 0 (Prometheus is unreachable at {closed}/-/ready" in proc.stderr
    [m] = list_models(repo / "reg")
    assert (m["champion"], m["challenger"], m["challenger_weight"]) == ("v1", "v2", 0.0)
    assert [e["action"] for e in history(repo / "reg", "lm")][-2:] == ["register", "weight"]
