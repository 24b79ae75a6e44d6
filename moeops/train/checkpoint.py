"""Training checkpoints: safetensors weights (with the balancing bias), optimizer state,
RNG states and the step, written to a temp directory and renamed into place. A directory
named step_XXXXXXXX is complete by construction; anything else (a kill mid-write) is ignored
and cleaned up on the next start. The last `keep` checkpoints are kept."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moeops.io import fsync_dir, fsync_tree

PREFIX = "step_"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file())


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
    fsync_tree(tmp)
    final = root / f"{PREFIX}{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(root)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    model.load_state_dict(load_file(path / "model.safetensors"), strict=True)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    return json.loads((path / "state.json").read_text())
