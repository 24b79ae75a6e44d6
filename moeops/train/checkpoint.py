"""Training checkpoints: unsharded safetensors weights (with the balancing bias) and AdamW
moments by parameter name, so any process layout can resume any checkpoint; RNG state and
the step, written to a temp directory and renamed into place. A directory
named step_XXXXXXXX is complete by construction; anything else (a kill mid-write) is ignored
and cleaned up on the next start. The last `keep` checkpoints are kept."""

from __future__ import annotations

import json
import pickle
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moeops.cli import UserError
from moeops.io import replace_dir

PREFIX = "step_"


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
