"""Training checkpoints: unsharded safetensors weights (with the balancing bias) and AdamW
moments by parameter name, so any process layout can resume any checkpoint; RNG state and
the step, written to a temp directory and renamed into place. A directory
named step_XXXXXXXX is complete by construction; anything else (a kill mid-write) is ignored
and cleaned up on the next start. The last `keep` checkpoints are kept.

One directory holds the checkpoints of one training job (e.g. checkpoints/pretrain); its
step_* directories are those of the run being trained (state.json's run_id: params, data and
code). Another run's checkpoints are never deleted when a run starts: `arrange_runs` parks them
in runs/<run_id>/ (renames, each atomic; state.json says whose a checkpoint is, so a kill between
renames is put right on the next start) and brings the current run's back, so switching params
back (or a `dvc exp run` in the workspace, and back) resumes. `prune_runs` deletes the parked
runs beyond the `keep_runs` most recent, called only once the current run has a checkpoint."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moeops.cli import UserError
from moeops.io import replace_dir

PREFIX = "step_"
RUNS = "runs"  # <root>/runs/<run_id>/step_*: parked checkpoints of other runs


FILES = ("model.safetensors", "optimizer.safetensors", "rng.pt", "state.json")


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and all((p / f).is_file() for f in FILES))


def read_state(path: Path) -> dict:
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path / 'state.json'}: unreadable checkpoint state ({e}); delete {path}") from None


def clean_partial(root: Path) -> None:
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


def _move(ckpt: Path, dest_dir: Path) -> None:
    """Rename a complete checkpoint into `dest_dir`. The same run's same step is the same state
    (training is deterministic): if `dest_dir` has it already, the duplicate goes."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    if (dest_dir / ckpt.name).exists():
        shutil.rmtree(ckpt)
    else:
        os.replace(ckpt, dest_dir / ckpt.name)


def arrange_runs(root: Path, run_id: str) -> list[str]:
    """Make root's step_* directories exactly those of `run_id`: park other runs' checkpoints in
    runs/<their run id>/, bring `run_id`'s back from runs/<run_id>/. Deletes nothing but half-written
    directories. Returns the run ids parked."""
    clean_partial(root)
    parked = []
    for ckpt in list_checkpoints(root):
        other = str(read_state(ckpt).get("run_id") or "unknown")
        if other != run_id:
            _move(ckpt, root / RUNS / other)
            if other not in parked:
                parked.append(other)
    now = time.time_ns()
    for other in parked:  # the parking time orders runs by recent use (prune_runs)
        os.utime(root / RUNS / other, ns=(now, now))
    mine = root / RUNS / run_id
    clean_partial(mine)
    for ckpt in list_checkpoints(mine):
        _move(ckpt, root)
    if mine.is_dir() and not any(mine.iterdir()):
        mine.rmdir()
    return parked


def parked_runs(root: Path) -> list[Path]:
    """runs/<run_id> directories, most recently parked first."""
    runs = root / RUNS
    if not runs.is_dir():
        return []
    return sorted((d for d in runs.iterdir() if d.is_dir()), key=lambda d: (d.stat().st_mtime_ns, d.name),
                  reverse=True)


def prune_runs(root: Path, keep_runs: int) -> list[Path]:
    """Delete parked runs beyond the `keep_runs` most recent runs (the current one included).
    Returns what was deleted."""
    gone = parked_runs(root)[max(0, keep_runs - 1):]
    for run in gone:
        shutil.rmtree(run)
    return gone


def save_checkpoint(root: Path, step: int, weights: dict[str, torch.Tensor], moments: dict[str, torch.Tensor],
                    state: dict, keep: int) -> Path:
    """`weights` and `moments` as from moeops.train.parallel.full_state."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "model.safetensors")
    save_file({k: v.contiguous() for k, v in moments.items()}, tmp / "optimizer.safetensors")
    # Batches come from (seed, step) and the model has no dropout; the torch RNG state is saved
    # so that anything stochastic added later resumes exactly too.
    torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2, sort_keys=True))
    final = root / f"{PREFIX}{step:08d}"
    replace_dir(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path, load) -> dict:
    """Read the checkpoint and call `load(weights, moments, state)`; any failure (a corrupt file,
    missing or misshapen tensors) is one line naming the checkpoint. Returns the state."""
    try:
        state = read_state(path)
        load(load_file(path / "model.safetensors"), load_file(path / "optimizer.safetensors"), state)
        torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["torch"])
    except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError, SafetensorError) as e:
        raise UserError(f"{path}: corrupt checkpoint ({str(e).splitlines()[0]}); delete it to resume "
                        "from the one before") from None
    return state
