"""Distributed pretraining through the real launcher (torchrun) and DeepSpeed on gloo: every layout
trains the same model as one process, checkpoints resume under any layout, a killed rank takes
the job down and `max_restarts` brings it back by itself, bad layouts are refused up front."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import DEBUG_PARAMS, run_stage, run_stage_in_process, stage_env, write_params

from moeops.model.io import load_model_dir
from moeops.train.data import get_batch, load_tokens

STEPS = {"steps": 20, "log_every": 1, "checkpoint_every": 10}
LAYOUTS = {
    "dp2": {"world_size": 2},
    "dp2-zero2": {"world_size": 2, "zero_stage": 2},
    "ep2": {"world_size": 2, "ep_size": 2},
    "dp2xep2-zero1": {"world_size": 4, "ep_size": 2, "zero_stage": 1},
    "pp2": {"world_size": 2, "pp_size": 2},
    "pp2xdp2xep2": {"world_size": 4, "pp_size": 2, "ep_size": 2},
}


def losses(project: Path) -> list[float]:
    with open(project / "dvclive/pretrain/plots/metrics/train/loss.tsv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f, delimiter="\t")]


def val_loss(project: Path) -> float:
    """The trained model, loaded into one process, on a fixed val batch."""
    model = load_model_dir(project / "models/teacher").eval()
    x_BS, y_BS = get_batch(load_tokens(project / "data/prepared", "val"), 1, 0, 0, 8, 64)
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x_BS).flatten(0, 1), y_BS.flatten()))


def train(project: Path, **layout) -> subprocess.CompletedProcess:
    write_params(project, pretrain={**STEPS, **layout})
    return run_stage("pretrain", project)


@pytest.fixture(scope="module")
def reference(prepared_project, tmp_path_factory) -> Path:
    """One process, STEPS, default params (activation_checkpointing off); read-only: copy it to change it."""
    project = tmp_path_factory.mktemp("single") / "project"
    shutil.copytree(prepared_project, project)
    train(project)
    return project


@pytest.fixture(scope="module")
def layout_run(prepared_project, tmp_path_factory):
    """layout_run(name) -> (project, stage output): each layout of LAYOUTS trained once per module (the layout
    test checks it; the int8 test uses dp2 as its fp32 baseline). Read-only."""
    runs = {}

    def run(name: str) -> tuple[Path, subprocess.CompletedProcess]:
        if name not in runs:
            project = tmp_path_factory.mktemp(name) / "project"
            shutil.copytree(prepared_project, project)
            runs[name] = project, train(project, **LAYOUTS[name])
        return runs[name]

    return run


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_trains_the_same_model_as_one_process(reference, layout_run, name):
    project, out = layout_run(name)
    assert f"launching {LAYOUTS[name]['world_size']} processes" in out.stdout
    ours, single = losses(project), losses(reference)
    assert len(ours) == len(single) == 20
    assert ours == pytest.approx(single, rel=1e-4)
    assert val_loss(project) == pytest.approx(val_loss(reference), rel=1e-4)
    metrics = json.loads((project / "metrics/pretrain.json").read_text())
    layout = {"pp_size": 1, "ep_size": 1, **LAYOUTS[name]}
    assert metrics["world_size"] == layout["world_size"]
    assert (metrics["grad_bytes_per_step"] > 0) == (layout["world_size"] > layout["pp_size"])
    assert (metrics["all_to_all_bytes_per_step"] > 0) == (layout["ep_size"] > 1)
    ref = json.loads((reference / "metrics/pretrain.json").read_text())
    # the balance figure counts every rank's routed tokens; the val score is the launching process's
    assert metrics["expert_load_last_steps"]["busiest_over_uniform"] == pytest.approx(
        ref["expert_load_last_steps"]["busiest_over_uniform"], rel=1e-2)
    assert metrics["val"]["bits_per_byte"] == pytest.approx(ref["val"]["bits_per_byte"], rel=1e-4)


def test_int8_gradients_send_70_percent_fewer_bytes(layout_run, project):
    train(project, world_size=2, grad_compression="int8")
    int8 = json.loads((project / "metrics/pretrain.json").read_text())["grad_bytes_per_step"]
    int8_loss, int8_val = losses(project)[-1], val_loss(project)
    baseline, _ = layout_run("dp2")  # the same data, STEPS and world_size 2 with fp32 gradients
    assert LAYOUTS["dp2"] == {"world_size": 2}
    fp32 = json.loads((baseline / "metrics/pretrain.json").read_text())["grad_bytes_per_step"]
    assert int8 <= 0.30 * fp32
    assert int8_loss == pytest.approx(losses(baseline)[-1], rel=0.01)
    assert int8_val == pytest.approx(val_loss(baseline), rel=0.01)


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _workers(launcher: subprocess.Popen) -> list[psutil.Process]:
    return [c for c in psutil.Process(launcher.pid).children(recursive=True) if "--worker" in c.cmdline()]


KILLED = {"steps": 30, "log_every": 1, "checkpoint_every": 5}


@pytest.fixture(scope="module")
def reference30(pretrained_project) -> Path:
    """One process, 30 steps, a checkpoint every 5: the session's pretrain run (conftest.pretrained_project,
    DEBUG_PARAMS). KILLED differs from it in log_every only, which changes which steps are logged, not the
    model (the last step is logged either way). Read-only."""
    assert {**DEBUG_PARAMS["pretrain"], **KILLED, "log_every": 1} == {**DEBUG_PARAMS["pretrain"], "log_every": 1}
    return pretrained_project


def kill_one_rank_after(project: Path, step: int, **layout) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """Start the stage, wait for the checkpoint of `step`, kill -9 one worker (or the only process).
    Returns the stage process and its workers."""
    write_params(project, pretrain={**KILLED, **layout})
    proc = subprocess.Popen([sys.executable, "-m", "stages.pretrain"], cwd=project, env=stage_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt = project / f"checkpoints/pretrain/step_{step:08d}"
    deadline = time.time() + 300
    while not ckpt.is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    victims = _workers(proc) if layout.get("world_size", 1) > 1 else [psutil.Process(proc.pid)]
    assert ckpt.is_dir() and victims, "no checkpoint to resume from"
    victims[-1].send_signal(signal.SIGKILL)
    return proc, victims


@pytest.mark.parametrize("before,after", [
    ({"world_size": 2}, {}),  # 2 -> 1
    ({}, {"world_size": 4, "ep_size": 2}),  # 1 -> 4
    ({"world_size": 2, "ep_size": 2, "zero_stage": 2}, {"world_size": 2}),  # EP2 + ZeRO-2 -> EP1
])
def test_kill_one_rank_then_resume_under_another_layout(project, reference30, before, after):
    proc, workers = kill_one_rank_after(project, 5, **before)
    out, _ = proc.communicate(timeout=120)  # the whole job goes down: no rank hangs in a collective
    assert proc.returncode != 0, out
    assert not (project / "models/teacher").exists(), "run finished before the kill"
    assert not [w for w in workers if alive(w)], "a worker outlived the job"

    write_params(project, pretrain={**KILLED, **after})
    resumed = run_stage("pretrain", project)
    assert "resumed from" in resumed.stdout
    assert losses(project)[-1] == pytest.approx(losses(reference30)[-1], rel=1e-4)
    assert val_loss(project) == pytest.approx(val_loss(reference30), rel=1e-4)


def test_max_restarts_relaunches_and_resumes_by_itself(project):
    proc, _ = kill_one_rank_after(project, 5, world_size=2, max_restarts=1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "resumed from" in out and (project / "models/teacher/model.safetensors").is_file()
    assert json.loads((project / "metrics/pretrain.json").read_text())["resumed_from_step"] >= 5


def test_activation_checkpointing_changes_memory_not_results(reference, project, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(project, other)
    train(project, activation_checkpointing="on")
    train(other, activation_checkpointing="auto", memory_limit_gb=1e-3)  # any step exceeds 1 MB: on
    assert json.loads((other / "metrics/pretrain.json").read_text())["activation_checkpointing"] is True
    # Recomputation must not count routed tokens twice (the balancing bias would drift).
    assert losses(project) == losses(other)
    assert (project / "models/teacher/model.safetensors").read_bytes() == \
        (other / "models/teacher/model.safetensors").read_bytes()
    # Off: the module's reference run (the same data and STEPS, activation_checkpointing's default "off").
    assert json.loads((reference / "metrics/pretrain.json").read_text())["activation_checkpointing"] is False
    assert losses(reference) == pytest.approx(losses(project), rel=1e-5)


@pytest.mark.parametrize("override,message", [
    ({"world_size": 3, "pp_size": 2}, "pretrain.world_size: 3 is not a multiple of pp_size=2"),
    ({"world_size": 2, "ep_size": 4}, "pretrain.ep_size: 4 does not divide the 2 data-parallel ranks"),
    ({"world_size": 3, "ep_size": 3}, "pretrain.ep_size: 3 does not divide n_routed_experts=8"),
    ({"world_size": 3, "pp_size": 3}, "pretrain.pp_size: 3 > n_layers=2 (a stage needs a layer)"),
    ({"world_size": 2, "zero_stage": 3}, "pretrain.zero_stage: 3 is not supported"),
    ({"world_size": 2, "grad_compression": "int8", "zero_stage": 1}, "pretrain.grad_compression: int8 is a gradient"),
    ({"world_size": 4, "pp_size": 2, "ep_size": 2, "zero_stage": 1}, "pretrain.zero_stage: 1 with pipeline and expert"),
    ({"world_size": 2, "pp_size": 2, "zero_stage": 2}, "pretrain.zero_stage: 2 with pp_size > 1"),
])
def test_bad_layout_refused_before_any_process_starts(project, override, message):
    write_params(project, pretrain=override)
    # The first case through a real process, the rest through the same entry point in this process.
    real = override == {"world_size": 3, "pp_size": 2}
    proc = run_stage("pretrain", project, check=False) if real else run_stage_in_process("pretrain", project)
    assert proc.returncode == 2 and "launching" not in proc.stdout
    assert proc.stderr.strip().startswith(f"error: params.yaml: {message}")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (project / "models").exists() and not (project / "checkpoints").exists()


def test_unreachable_host_in_hostfile_refused(project):
    (project / "hostfile").write_text("nohost.invalid slots=2\n")
    write_params(project, pretrain={"world_size": 2, "hostfile": "hostfile"})
    proc = run_stage_in_process("pretrain", project)  # the entry point in this process (see above)
    assert proc.returncode == 2 and "launching" not in proc.stdout
    assert proc.stderr.strip().startswith("error: hostfile")
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("damage", ["drop_moment", "truncate_weights"])
def test_damaged_checkpoint_is_a_one_line_error(reference, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    project = tmp_path / "project"
    shutil.copytree(reference, project)  # a finished STEPS run: its checkpoints up to step 20
    last = project / "checkpoints/pretrain/step_00000020"
    if damage == "drop_moment":
        moments = load_file(last / "optimizer.safetensors")
        moments.pop(next(iter(moments)))
        save_file(moments, last / "optimizer.safetensors")
    else:
        (last / "model.safetensors").write_bytes((last / "model.safetensors").read_bytes()[:1000])
    proc = run_stage("pretrain", project, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"error: {Path('checkpoints/pretrain/step_00000020')}: corrupt checkpoint")
    assert len(proc.stderr.strip().splitlines()) == 1
