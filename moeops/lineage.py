"""lineage.json: where an artifact came from (git commit, input hashes, params).

"Dirty" means the sources or params differ from the commit, not that DVC has run: a stage rewrites
dvc.lock, `dvc add` rewrites .dvc files and .gitignore files, and a stage's declared outputs
(metrics, plots, models) change with every run. Those paths are left out of the comparison; what
they record is in the lineage's input hashes. A dirty commit comes with the sha256 of the diff
(`git diff HEAD` of the remaining tracked paths), so two runs from different edits differ.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import yaml

from moeops.cli import UserError
from moeops.io import sha256_file

# Written by DVC itself, in any project.
DVC_WRITTEN = ("**/dvc.lock", "**/*.dvc", "**/.gitignore", "**/.dvc/**")


def dvc_outputs(cwd: str | Path = ".") -> list[str]:
    """The outs, metrics and plots that dvc.yaml (in `cwd`) declares: paths a run writes."""
    try:
        stages = (yaml.safe_load((Path(cwd) / "dvc.yaml").read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return []
    paths = set()
    for stage in stages.values() if isinstance(stages, dict) else []:
        for key in ("outs", "metrics", "plots"):
            for entry in (stage.get(key) or []) if isinstance(stage, dict) else []:
                path = next(iter(entry), None) if isinstance(entry, dict) else entry
                if isinstance(path, str) and path and "${" not in path:
                    paths.add(path.rstrip("/"))
    return sorted(paths)


def git_state(cwd: str | Path = ".") -> tuple[str, str | None]:
    """(HEAD's sha or "unknown", sha256 of the diff of sources and params against HEAD or None
    when there is none). Two git calls."""
    excludes = [f":(top,glob,exclude){g}" for g in DVC_WRITTEN] + [f":(exclude,literal){p}" for p in dvc_outputs(cwd)]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown", None
        diff = subprocess.run(["git", "diff", "HEAD", "--binary", "--no-ext-diff", "--no-color", "--no-textconv",
                               "--", ":/", *excludes], cwd=cwd, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown", None
    if diff.returncode != 0:
        return head.stdout.strip(), "unknown"
    return head.stdout.strip(), (hashlib.sha256(diff.stdout).hexdigest() if diff.stdout else None)


def git_commit(cwd: str | Path = ".") -> str:
    """"<sha>", "<sha>-dirty" (sources or params differ from it) or "unknown"."""
    sha, diff = git_state(cwd)
    return sha + ("-dirty" if diff and sha != "unknown" else "")


def lineage(inputs: list[str | Path], params: dict, stage: str) -> dict:
    sha, diff = git_state()
    return {
        "stage": stage,
        "git_commit": sha + ("-dirty" if diff and sha != "unknown" else ""),
        "git_diff_sha256": diff,  # None when clean
        "inputs": {str(p): sha256_file(p) for p in sorted(map(Path, inputs)) if Path(p).is_file()},
        "params": params,
    }


def recorded_checksums(model_dir: str | Path) -> dict[str, str]:
    """{file name: sha256} that lineage.json recorded when the directory was written. A directory
    without one (or with an unreadable one, or one that records nothing) is refused: "nothing to
    check" would let any bytes through."""
    path = Path(model_dir) / "lineage.json"
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing; a model directory must record its files' sha256 (re-run the stage "
                        "that wrote it)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    checksums = record.get("checksums") if isinstance(record, dict) else None
    if not isinstance(checksums, dict) or not checksums:
        raise UserError(f"{path}: checksums: missing or empty; re-run the stage that wrote {path.parent}")
    for name, sha in checksums.items():
        if Path(name).is_absolute() or ".." in Path(name).parts or not (isinstance(sha, str) and len(sha) == 64):
            raise UserError(f"{path}: checksums: {name!r}: {sha!r} is not a file of the directory and its sha256")
    return checksums


def verify_checksums(model_dir: str | Path) -> None:
    """Compare each file with the sha256 its lineage.json recorded when it was written (see
    recorded_checksums: no lineage.json is an error)."""
    model_dir = Path(model_dir)
    for name, expected in sorted(recorded_checksums(model_dir).items()):
        actual = sha256_file(model_dir / name) if (model_dir / name).is_file() else "missing"
        if actual != expected:
            raise UserError(f"{model_dir / name}: fails its checksum (sha256 {actual}, lineage.json records "
                            f"{expected}); the file was changed or damaged after it was written")
