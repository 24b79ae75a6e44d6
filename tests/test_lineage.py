"""lineage.json tells the truth: "-dirty" only for edited sources or params (not for what DVC writes),
with a hash of the edit; resume state survives other runs (parked per run id, kept for keep_runs runs);
the code fingerprint ignores docstrings and comments but no real change."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from moeops.lineage import git_commit, git_state, lineage
from moeops.train.checkpoint import arrange_runs, list_checkpoints, prune_runs, read_state, save_checkpoint
from moeops.train.loop import code_fingerprint, source_digest

DVC_YAML = """stages:
  train:
    cmd: python train.py
    deps: [train.py]
    params: [train]
    outs:
      - models/m
      - checkpoints/train:
          persist: true
    metrics:
      - metrics/train.json:
          cache: false
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path) -> Path:
    """A committed DVC-style project; its metrics file is tracked by git (cache: false), as many are."""
    repo = tmp_path / "repo"
    (repo / "metrics").mkdir(parents=True)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "dvc.lock").write_text("schema: '2.0'\n")
    (repo / "params.yaml").write_text("train:\n  lr: 0.1\n")
    (repo / "train.py").write_text("print('train')\n")
    (repo / "data.dvc").write_text("outs:\n- md5: aaa\n  path: data\n")
    (repo / ".gitignore").write_text("/models\n")
    (repo / "metrics/train.json").write_text("{}\n")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "init")
    return repo


def test_clean_checkout_after_a_run_is_not_dirty(repo):
    sha = git(repo, "rev-parse", "HEAD").strip()
    assert git_commit(repo) == sha and git_state(repo) == (sha, None)
    # What a run (and `dvc add`) writes: the lock, .dvc files, .gitignore entries, declared outputs.
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {train: {}}\n")
    (repo / "data.dvc").write_text("outs:\n- md5: bbb\n  path: data\n")
    (repo / ".gitignore").write_text("/models\n/checkpoints\n")
    (repo / "metrics/train.json").write_text('{"loss": 1.0}\n')
    (repo / "models/m").mkdir(parents=True)
    (repo / "models/m/w.bin").write_bytes(b"w")
    assert git_commit(repo) == sha and git_state(repo) == (sha, None)


@pytest.mark.parametrize("path,edit", [("train.py", "print('other')\n"), ("params.yaml", "train:\n  lr: 0.2\n"),
                                       ("dvc.yaml", DVC_YAML + "# a comment\n")])
def test_edited_source_or_params_is_dirty_with_a_hash_of_the_edit(repo, path, edit):
    sha = git(repo, "rev-parse", "HEAD").strip()
    (repo / "dvc.lock").write_text("rewritten\n")
    (repo / path).write_text(edit)
    first = git_state(repo)
    assert git_commit(repo) == f"{sha}-dirty" and first[0] == sha and len(first[1]) == 64
    (repo / "metrics/train.json").write_text('{"loss": 2.0}\n')  # outputs do not change the hash
    assert git_state(repo) == first
    (repo / path).write_text(edit + "\n")  # another edit: another hash
    second = git_state(repo)
    assert second[1] != first[1] and len(second[1]) == 64
    git(repo, "add", path)  # staged or not, it differs from the commit
    assert git_state(repo) == second
    git(repo, "commit", "-qm", "edit")
    assert git_commit(repo) == git(repo, "rev-parse", "HEAD").strip()


def test_lineage_records_commit_and_diff(repo, monkeypatch):
    monkeypatch.chdir(repo)
    sha = git(repo, "rev-parse", "HEAD").strip()
    lin = lineage(["params.yaml", "missing.bin"], {"lr": 0.1}, "train")
    assert lin["git_commit"] == sha and lin["git_diff_sha256"] is None
    assert list(lin["inputs"]) == ["params.yaml"] and lin["stage"] == "train"
    (repo / "params.yaml").write_text("train:\n  lr: 0.3\n")
    lin = lineage([], {}, "train")
    assert lin["git_commit"] == f"{sha}-dirty" and lin["git_diff_sha256"] == git_state(repo)[1]


def test_outside_a_repository_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert git_commit(tmp_path) == "unknown"
    assert git_state(tmp_path) == ("unknown", None)


# ---------------------------------------------------------------- resume state per run


def ckpt(root: Path, run_id: str, step: int) -> Path:
    return save_checkpoint(root, step, {"w": torch.full((2,), float(step))}, {"w.exp_avg": torch.zeros(2)},
                           {"run_id": run_id}, keep=2)


def layout(root: Path) -> dict[str, list[str]]:
    """{run id: its step directories}: "" for the current (top-level) ones."""
    out = {"": [c.name for c in list_checkpoints(root)]}
    for run in sorted((root / "runs").iterdir()) if (root / "runs").is_dir() else []:
        out[run.name] = [c.name for c in list_checkpoints(run)]
    return out


def test_other_runs_are_parked_not_deleted_and_come_back(tmp_path):
    root = tmp_path / "ck"
    for step in (5, 10, 15):
        ckpt(root, "A", step)
    (root / ".tmp-half").mkdir()  # a kill mid-write
    assert arrange_runs(root, "A") == [] and layout(root) == {"": ["step_00000010", "step_00000015"]}
    # Run B starts: A's checkpoints are parked, nothing deleted, nothing at the top to resume.
    assert arrange_runs(root, "B") == ["A"]
    assert layout(root) == {"": [], "A": ["step_00000010", "step_00000015"]}
    assert not (root / ".tmp-half").exists()
    ckpt(root, "B", 5)  # the same step name as A's: no clash
    assert prune_runs(root, keep_runs=2) == []
    # Back to A: B is parked, A's come back and its newest is resumable.
    assert arrange_runs(root, "A") == ["B"]
    assert layout(root) == {"": ["step_00000010", "step_00000015"], "B": ["step_00000005"]}
    assert read_state(list_checkpoints(root)[-1]) == {"run_id": "A", "step": 15}


def test_a_kill_between_renames_is_put_right(tmp_path):
    root = tmp_path / "ck"
    for step in (5, 10):
        ckpt(root, "A", step)
    (root / "runs/A").mkdir(parents=True)  # killed while run B parked A's checkpoints: one moved
    (root / "step_00000005").rename(root / "runs/A/step_00000005")
    assert arrange_runs(root, "A") == [] and layout(root) == {"": ["step_00000005", "step_00000010"]}
    (root / "runs/A").mkdir()
    (root / "step_00000005").rename(root / "runs/A/step_00000005")
    assert arrange_runs(root, "B") == ["A"] and layout(root) == {"": [], "A": ["step_00000005", "step_00000010"]}


def test_retention_keeps_the_most_recent_keep_runs_runs(tmp_path):
    root = tmp_path / "ck"
    for run in ("A", "B", "C", "D"):  # each run starts, then writes its first checkpoint
        arrange_runs(root, run)
        ckpt(root, run, 5)
        prune_runs(root, keep_runs=3)
    assert layout(root) == {"": ["step_00000005"], "B": ["step_00000005"], "C": ["step_00000005"]}
    arrange_runs(root, "B")  # B resumes: now C, D are the other recent ones
    assert prune_runs(root, keep_runs=2) == [root / "runs/C"]
    assert layout(root) == {"": ["step_00000005"], "D": ["step_00000005"]}
    assert read_state(list_checkpoints(root)[-1])["run_id"] == "B"
    assert prune_runs(root, keep_runs=1) == [root / "runs/D"] and not list((root / "runs").iterdir())


# ---------------------------------------------------------------- code fingerprint


SOURCE = '''"""Module docstring."""

import math


class Block:
    """A block."""

    def forward(self, x):
        """Doubles, then adds pi."""
        # a comment
        return 2 * x + math.pi


async def later(x):
    "one line"
    return x
'''


@pytest.mark.parametrize("edit,same", [
    (lambda s: s.replace("Module docstring.", "Docs, reworded."), True),
    (lambda s: s.replace("Doubles, then adds pi.", "Twice x plus pi.\n\n        More words.\n        "), True),
    (lambda s: s.replace("# a comment", "# another comment\n        # and one more"), True),
    (lambda s: s.replace('"one line"', '"""two\n    lines"""'), True),
    (lambda s: s.replace("\n\n\nclass", "\n\n\n\n# spacing\nclass"), True),
    (lambda s: s.replace("2 * x", "3 * x"), False),
    (lambda s: s.replace("2 * x + math.pi", "math.pi + 2 * x"), False),
    (lambda s: s.replace("2 * x", "2.0 * x"), False),
    (lambda s: s.replace("return x", "return -x"), False),
    (lambda s: s.replace('"""A block."""', '"""A block."""\n    name = "A block."'), False),
    (lambda s: s.replace('        """Doubles, then adds pi."""\n', ""), True),
])
def test_code_fingerprint_ignores_docstrings_and_comments_only(tmp_path, edit, same):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text(SOURCE)
    b.write_text(edit(SOURCE))
    assert b.read_text() != SOURCE
    assert (source_digest(a) == source_digest(b)) is same


def test_code_fingerprint_covers_file_names_and_unparsable_files(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("x = 1\n")
    first = code_fingerprint([pkg])
    (pkg / "a.py").rename(pkg / "b.py")
    assert code_fingerprint([pkg]) != first
    (pkg / "b.py").write_text("def broken(:\n")
    broken = code_fingerprint([pkg])
    (pkg / "b.py").write_text("def broken(: # edited\n")
    assert code_fingerprint([pkg]) != broken
