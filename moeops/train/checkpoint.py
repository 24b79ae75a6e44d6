"""Training checkpoints: safetensors weights (with the balancing bias), optimizer state,
RNG states and the step, written to a temp directory and renamed into place. A directory
named step_XXXXXXXX is complete by construction; anything else (a kill mid-write) is ignored
and cleaned up on the next start. The last `keep` checkpoints are kept."""

from __future__ import annotations

import json
import pickle
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moeops.cli import UserError
from moeops.io import replace_dir

PREFIX = "step_"


FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "state.json")


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


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, keep: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    # Batches come from (seed, step) and the model has no dropout; the torch RNG state is saved
    # so that anything stochastic added later resumes exactly too.
    torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2, sort_keys=True))
    final = root / f"{PREFIX}{step:08d}"
    replace_dir(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    try:
        model.load_state_dict(load_file(path / "model.safetensors"), strict=True)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["torch"])
    except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as e:
        raise UserError(f"{path}: corrupt checkpoint ({str(e).splitlines()[0]}); delete it to resume "
                        "from the one before") from None
    return read_state(path)
