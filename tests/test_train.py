"""Pretraining: determinism, kill -9 and resume bit for bit, divergence, bad params; evaluate."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_stage, run_stage_in_process, stage_env, write_params

from moeops.config import load_section
from moeops.train.data import load_meta, load_tokens
from moeops.train.loop import TrainingDiverged, lr_at, pretrain


def weights(project: Path) -> bytes:
    return (project / "models/teacher/model.safetensors").read_bytes()


def test_lr_schedule_warmup_then_cosine_to_min():
    lrs = [lr_at(s, 100, 1.0, 0.1, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


@pytest.fixture
def pretrained(pretrained_project, tmp_path) -> Path:
    """A fresh copy of the session's pretrained project (the pretrain stage run once on DEBUG_PARAMS)."""
    dst = tmp_path / "pretrained"
    shutil.copytree(pretrained_project, dst)
    return dst


def test_same_params_give_bitwise_identical_weights(project, pretrained_project):
    # Two real runs of the stage on the same data and params, in two directories: this test's, and
    # the session's (conftest.pretrained_project).
    run_stage("pretrain", project)
    assert weights(project) == weights(pretrained_project)
    metrics = json.loads((project / "metrics/pretrain.json").read_text())
    assert metrics["steps"] == 30 and metrics["final_train_loss"] < 6.0
    for name in ("config.json", "tokenizer.json", "lineage.json"):
        assert (project / "models/teacher" / name).is_file()
    lineage = json.loads((project / "models/teacher/lineage.json").read_text())
    assert "data/prepared/train.bin" in lineage["inputs"] and lineage["params"]["steps"] == 30


def test_kill_9_midway_then_rerun_resumes_to_identical_weights(project, tmp_path):
    write_params(project, pretrain={"steps": 80})  # long enough that the kill lands midway
    reference = tmp_path / "reference"
    shutil.copytree(project, reference)
    run_stage("pretrain", reference)

    ckpts = project / "checkpoints/pretrain"
    proc = subprocess.Popen([sys.executable, "-m", "stages.pretrain"], cwd=project, env=stage_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts.is_dir() and any(p.name >= "step_00000015" for p in ckpts.iterdir())):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (project / "models/teacher/model.safetensors").exists(), "run finished before the kill"

    resumed = run_stage("pretrain", project)
    assert "resumed from" in resumed.stdout
    assert weights(project) == weights(reference)
    assert json.loads((project / "metrics/pretrain.json").read_text())["resumed_from_step"] >= 15


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(project, monkeypatch):
    monkeypatch.chdir(project)
    p = load_section("pretrain")
    tokens = load_tokens(Path("data/prepared"), "train")
    meta = load_meta(Path("data/prepared"))

    def poison(step, loss):
        return loss * float("nan") if step == 7 else loss

    ckpt = project / "checkpoints/pretrain"
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 7.*step_00000005"):
        pretrain(p, tokens, meta["vocab_size"], meta, ckpt, loss_hook=poison)
    assert [c.name for c in ckpt.iterdir()] == ["step_00000005"]
    torch.use_deterministic_algorithms(False)


def test_bf16_autocast_trains(project, monkeypatch):
    monkeypatch.chdir(project)
    p = load_section("pretrain").model_copy(update={"bf16": True, "steps": 6, "warmup_steps": 2})
    meta = load_meta(Path("data/prepared"))
    seen = []

    def record(step, loss):
        seen.append(loss.item())
        return loss

    pretrain(p, load_tokens(Path("data/prepared"), "train"), meta["vocab_size"], meta,
             project / "checkpoints/bf16", loss_hook=record)
    assert len(seen) == 6 and all(map(math.isfinite, seen)) and seen[-1] < seen[0] - 0.3
    torch.use_deterministic_algorithms(False)


def run_ids(ckpt_dir: Path) -> set[str]:
    return {json.loads((c / "state.json").read_text())["run_id"] for c in ckpt_dir.glob("step_*")}


def test_rerun_after_finish_or_params_change(pretrained, monkeypatch):
    project = pretrained  # the pretrain stage run through on DEBUG_PARAMS (30 steps)
    first = weights(project)
    ckpt_dir = project / "checkpoints/pretrain"
    (rid_a,) = run_ids(ckpt_dir)
    # Re-running a finished run (dvc repro -f) restores the final checkpoint and reports the whole run.
    again = run_stage("pretrain", project)
    assert "resumed from checkpoints/pretrain/step_00000030" in again.stdout
    assert weights(project) == first
    metrics = json.loads((project / "metrics/pretrain.json").read_text())
    assert math.isfinite(metrics["final_train_loss"]) and metrics["tokens_per_s"] > 0

    # Other params (keep_runs 1: no other run's checkpoints kept), interrupted before their first
    # checkpoint: the first run's checkpoints are parked, not deleted.
    write_params(project, pretrain={"lr": 0.002, "keep_runs": 1})
    monkeypatch.chdir(project)
    p, meta = load_section("pretrain"), load_meta(Path("data/prepared"))

    def interrupt(step, loss):
        if step == 3:
            raise KeyboardInterrupt
        return loss

    try:
        with pytest.raises(KeyboardInterrupt):
            pretrain(p, load_tokens(Path("data/prepared"), "train"), meta["vocab_size"], meta, ckpt_dir,
                     loss_hook=interrupt)
    finally:
        torch.use_deterministic_algorithms(False)
    parked = ckpt_dir / "runs" / rid_a
    assert not list(ckpt_dir.glob("step_*")) and sorted(c.name for c in parked.iterdir()) == [
        "step_00000025", "step_00000030"]
    # Back to the first params: the first run resumes from its final checkpoint.
    write_params(project)
    back = run_stage("pretrain", project)
    assert "resumed from checkpoints/pretrain/step_00000030" in back.stdout and weights(project) == first
    assert run_ids(ckpt_dir) == {rid_a} and not any((ckpt_dir / "runs").iterdir())

    # Other params, run through: a run of their own, which deletes the first run's checkpoints (keep_runs 1)
    # only once it has written its own (retention with more runs: tests/test_lineage.py).
    write_params(project, pretrain={"lr": 0.002, "keep_runs": 1})
    changed = run_stage("pretrain", project)
    assert f"parked the checkpoints of run {rid_a}" in changed.stdout and "resumed" not in changed.stdout
    assert f"deleted {Path('checkpoints/pretrain/runs') / rid_a}" in changed.stdout
    assert [c.name for c in sorted(ckpt_dir.glob("step_*"))] == ["step_00000025", "step_00000030"]
    assert run_ids(ckpt_dir) != {rid_a} and len(run_ids(ckpt_dir)) == 1 and not parked.exists()
    assert weights(project) != first


@pytest.mark.parametrize("override,message", [
    ({"lr": -1.0}, "params.yaml: pretrain.lr: Input should be greater than 0"),
    ({"model": {"top_k": 9}}, "params.yaml: pretrain.model.top_k: 9 > n_routed_experts=8"),
    ({"model": {"n_group": 3}}, "params.yaml: pretrain.model.n_group: 3 does not divide n_routed_experts=8"),
    ({"model": {"topk_group": 3}}, "params.yaml: pretrain.model.topk_group: 3 > n_group=2"),
    ({"model": {"kv_lora_rank": 0}}, "params.yaml: pretrain.model.kv_lora_rank: must be > 0, got 0"),
    ({"stpes": 3}, "params.yaml: pretrain.stpes: unknown key"),
    ({"seq_len": 1000}, "params.yaml: pretrain.seq_len: 1000 > model max_seq_len 64"),
])
def test_bad_params_one_line_exit_2_nothing_written(project, override, message):
    write_params(project, pretrain=override)
    # The first case through a real process, the rest through the same entry point in this process.
    real = override == {"lr": -1.0}
    proc = run_stage("pretrain", project, check=False) if real else run_stage_in_process("pretrain", project)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {message}"
    assert not (project / "models").exists() and not (project / "checkpoints").exists()


def test_evaluate_reports_bpb_on_the_same_bytes_as_compressors(pretrained):
    project = pretrained  # the pretrain stage run through on DEBUG_PARAMS
    run_stage("evaluate", project)
    m = json.loads((project / "metrics/eval.json").read_text())
    v = m["val"]
    assert v["bits_per_byte"] == pytest.approx(v["loss"] * v["tokens"] / v["bytes"] / math.log(2), rel=1e-4)
    assert v["perplexity"] == pytest.approx(math.exp(v["loss"]), rel=1e-4)
    assert 0 < v["top1_accuracy"] <= 1
    assert 0 < m["reference_bits_per_byte"]["xz_9e"] < 8 and 0 < m["reference_bits_per_byte"]["gzip_9"] < 8
    assert len(m["experts"]["maxvio_per_layer"]) == 1 and m["experts"]["dropped_fraction"] == 0
    assert m["speed"]["inference_tokens_per_s"] > 0 and m["memory"]["peak_rss_mb"] > 0
    assert (project / "plots/expert_load.png").stat().st_size > 0
    # The byte count is the UTF-8 length of the decoded scored text (token byte table is exact).
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(project / "models/teacher/tokenizer.json"))
    val = load_tokens(project / "data/prepared", "val")
    n = v["tokens"]
    text = tok.decode(val[1:n + 1].astype(int).tolist(), skip_special_tokens=True)
    assert len(text.encode()) == v["bytes"]  # the generated corpus is ASCII: no split characters


def test_incomplete_meta_json_is_a_one_line_error(project):
    meta = project / "data/prepared/meta.json"
    meta.write_text(json.dumps({"vocab_size": 384}))
    proc = run_stage("pretrain", project, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {Path('data/prepared/meta.json')}: needs vocab_size, dtype and "
                                   "splits.{train,val}.n_tokens; rerun the prepare stage")
    assert not (project / "models").exists()
