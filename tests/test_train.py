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

import numpy as np
import pytest
import torch
from conftest import run_stage, run_stage_in_process, stage_env, write_params
from tokenizers import Tokenizer

from moeops.config import load_section
from moeops.data.prepare import EOS
from moeops.evaluate.scoring import document_bytes, val_documents
from moeops.model.io import load_model_dir
from moeops.model.transformer import build_model, expert_loads
from moeops.train import loop
from moeops.train.checkpoint import load_checkpoint
from moeops.train.data import get_batch, load_meta, load_tokens
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
    # Debug flavor: one MoE layer, 8 experts, top-2: the busiest expert holds at most 8/2 = 4 uniform shares.
    balance = metrics["expert_load_last_steps"]
    assert balance["steps"] == 30 and len(balance["busiest_over_uniform"]) == 1
    assert 1.0 <= balance["busiest_over_uniform"][0] <= 4.0
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


def step_loads(project: Path, p, ckpt_dir: Path, steps: range) -> list[torch.Tensor]:
    """By hand: each step's routed-token counts of the MoE layer, from the weights the step started from
    (its checkpoint; the seeded init before step 0) on the batch the loop draws for it."""
    meta = load_meta(project / "data/prepared")
    tokens = load_tokens(project / "data/prepared", "train")
    model = build_model(p.model_args(meta["vocab_size"]), seed=p.seed).eval()
    out = []
    for s in steps:
        if s > 0:
            load_checkpoint(ckpt_dir / f"step_{s:08d}", lambda w, m, st: model.load_state_dict(w, strict=True))
        with torch.no_grad():
            model(get_batch(tokens, p.seed, s, 0, p.batch_size, p.seq_len)[0])
        (load,) = expert_loads(model)
        out.append(load.double())
        model.moe_layers()[0].gate.tokens_per_expert.zero_()
    return out


def test_expert_balance_of_the_last_steps_and_per_log_window(project, monkeypatch):
    monkeypatch.chdir(project)
    monkeypatch.setattr(loop, "BALANCE_STEPS", 3)  # the last 3 of 6 steps (100 in a real run)
    p = load_section("pretrain").model_copy(update={"steps": 6, "warmup_steps": 2, "checkpoint_every": 1,
                                                    "keep_checkpoints": 10, "log_every": 2})
    meta, tokens = load_meta(Path("data/prepared")), load_tokens(Path("data/prepared"), "train")
    try:
        whole = pretrain(p, tokens, meta["vocab_size"], meta, project / "ckpt_a", project / "live")

        def interrupt(step, loss):  # inside the window: step 3's counts are in checkpoint step 4
            if step == 4:
                raise KeyboardInterrupt
            return loss

        with pytest.raises(KeyboardInterrupt):
            pretrain(p, tokens, meta["vocab_size"], meta, project / "ckpt_b", loss_hook=interrupt)
        resumed = pretrain(p, tokens, meta["vocab_size"], meta, project / "ckpt_b")
        loads = step_loads(project, p, project / "ckpt_a", range(6))
    finally:
        torch.use_deterministic_algorithms(False)

    def busiest(load):
        return float(load.max() / load.mean())

    assert resumed.resumed_from == 4 and whole.balance_steps == resumed.balance_steps == 3
    assert whole.busiest_over_uniform == resumed.busiest_over_uniform
    assert whole.busiest_over_uniform == pytest.approx([busiest(sum(loads[3:]))], abs=1e-12)
    assert all(load.sum() == p.batch_size * p.seq_len * 2 for load in loads)  # top-2
    # dvclive: every log_every steps, the counts of that window (steps 0-1, 2-3, 4-5).
    tsv = (project / "live/plots/metrics/expert_load/busiest_over_uniform_layer1.tsv").read_text()
    logged = {int(step): float(v) for step, v in (row.split("\t") for row in tsv.splitlines()[1:])}
    assert logged == pytest.approx({s: busiest(loads[s - 2] + loads[s - 1]) for s in (2, 4, 6)}, rel=1e-6)


def test_dense_flavor_trains_checkpoints_and_resumes(project, monkeypatch):
    # No MoE layer at all: no bias update, no load logs, an empty balance metric.
    monkeypatch.chdir(project)
    p = load_section("pretrain").model_copy(update={"model": {"first_k_dense_replace": 2}, "steps": 4,
                                                    "warmup_steps": 1, "checkpoint_every": 2, "log_every": 2})
    meta, tokens = load_meta(Path("data/prepared")), load_tokens(Path("data/prepared"), "train")

    def interrupt(step, loss):
        if step == 3:
            raise KeyboardInterrupt
        return loss

    try:
        whole = pretrain(p, tokens, meta["vocab_size"], meta, project / "ckpt_a", project / "live")
        with pytest.raises(KeyboardInterrupt):
            pretrain(p, tokens, meta["vocab_size"], meta, project / "ckpt_b", loss_hook=interrupt)
        resumed = pretrain(p, tokens, meta["vocab_size"], meta, project / "ckpt_b", project / "live_b")
    finally:
        torch.use_deterministic_algorithms(False)
    assert whole.model.moe_layers() == [] and math.isfinite(whole.final_loss)
    assert whole.maxvio == whole.busiest_over_uniform == [] and whole.balance_steps == 4
    assert resumed.resumed_from == 2
    for name, t in whole.model.state_dict().items():
        assert torch.equal(t, resumed.model.state_dict()[name]), name
    assert not (project / "live/plots/metrics/expert_load").exists()


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


def test_pretrain_reports_the_teachers_val_bits_per_byte(pretrained_project):
    # By hand: every val document (capped at evaluate.max_tokens_per_doc) as EOS, its tokens and, when
    # the cap did not cut it, EOS; windows of the debug context (64) every `stride`, each target once.
    project = pretrained_project
    val = json.loads((project / "metrics/pretrain.json").read_text())["val"]
    e = load_section("evaluate", project / "params.yaml")
    context, stride = 64, min(e.stride, 64)
    docs = val_documents(project / "data/prepared", e.max_tokens_per_doc)
    model = load_model_dir(project / "models/teacher")
    tok = Tokenizer.from_file(str(project / "models/teacher/tokenizer.json"))
    eos = tok.token_to_id(EOS)
    bits_D, tokens = [], 0
    with torch.no_grad():
        for doc in docs:
            ids = [eos, *tok.encode(doc.text, add_special_tokens=False).ids, *([eos] if doc.complete else [])]
            seq, bits, scored = torch.tensor(ids), 0.0, 0  # inputs seq[:-1], targets seq[1:]
            for begin in range(0, len(seq) - 1, stride):
                end = min(begin + context, len(seq) - 1)
                nats_S = torch.nn.functional.cross_entropy(model(seq[None, begin:end])[0], seq[begin + 1:end + 1],
                                                           reduction="none")
                bits += nats_S[scored - begin:].sum().item() / math.log(2)
                tokens += end - scored
                scored = end
                if end == len(seq) - 1:
                    break
            bits_D.append(bits)
    bytes_D = document_bytes(docs)
    assert val["documents"] == len(docs) > 1 and val["tokens"] == tokens
    assert val["max_tokens_per_doc"] == e.max_tokens_per_doc and val["stride"] == stride
    assert val["bits_per_byte"] == pytest.approx(sum(bits_D) / bytes_D.sum(), abs=2e-5)
    assert val["bits_per_byte_macro"] == pytest.approx(float((np.array(bits_D) / bytes_D).mean()), abs=2e-5)
    assert val["loss"] == pytest.approx(sum(bits_D) * math.log(2) / tokens, abs=2e-5)


def test_evaluate_reports_bpb_on_the_same_bytes_as_compressors(pretrained):
    project = pretrained  # the pretrain stage run through on DEBUG_PARAMS
    run_stage("evaluate", project)
    m = json.loads((project / "metrics/eval.json").read_text())
    v = m["val"]
    assert v["bits_per_byte"] == pytest.approx(v["loss"] * v["tokens"] / v["bytes"] / math.log(2), rel=1e-4)
    assert v["perplexity"] == pytest.approx(math.exp(v["loss"]), rel=1e-4)
    assert 0 < v["top1_accuracy"] <= 1
    e = load_section("evaluate", project / "params.yaml")
    assert v["max_tokens_per_doc"] == e.max_tokens_per_doc and v["stride"] in (e.stride, min(e.stride, 64))
    assert 1 <= v["context_mean"] <= 64  # the debug teacher's context
    assert v["documents"] > 1 and 0 < v["bits_per_byte_macro"] < 8
    assert set(m["compressors"]) == {"gzip_9", "xz_9e", "ppmd_o16"}
    for c in m["compressors"].values():
        assert all(0 < c[k] < 8 for k in ("bits_per_byte", "bits_per_byte_separate", "bits_per_byte_macro"))
    assert len(m["experts"]["maxvio_per_layer"]) == 1 and m["experts"]["dropped_fraction"] == 0
    assert m["speed"]["inference_tokens_per_s"] > 0 and m["memory"]["peak_rss_mb"] > 0
    assert (project / "plots/expert_load.png").stat().st_size > 0
    # The bytes are the UTF-8 length of every val document, each cut at the cap.
    docs = val_documents(project / "data/prepared", e.max_tokens_per_doc)
    assert v["bytes"] == document_bytes(docs).sum() and v["documents"] == len(docs)


def test_incomplete_meta_json_is_a_one_line_error(project):
    meta = project / "data/prepared/meta.json"
    meta.write_text(json.dumps({"vocab_size": 384}))
    proc = run_stage("pretrain", project, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {Path('data/prepared/meta.json')}: needs vocab_size, dtype and "
                                   "splits.{train,val}.n_tokens; rerun the prepare stage")
    assert not (project / "models").exists()
