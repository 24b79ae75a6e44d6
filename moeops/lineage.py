"""lineage.json: where an artifact came from (git commit, input hashes, params)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from moeops.io import sha256_file


def git_commit(cwd: str | Path = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (out.stdout.strip() + ("-dirty" if dirty else "")) if out.returncode == 0 else "unknown"


def lineage(inputs: list[str | Path], params: dict, stage: str) -> dict:
    return {
        "stage": stage,
        "git_commit": git_commit(),
        "inputs": {str(p): sha256_file(p) for p in sorted(map(Path, inputs)) if Path(p).is_file()},
        "params": params,
    }
