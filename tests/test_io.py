"""moeops.io directory swaps: the atomic exchange, the fallback, and the recovery of a swap killed midway."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from moeops.io import exchange_paths, recover_dir, replace_dir


def _dir(path: Path, content: str) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "sub" / "f.txt").write_text(content)
    return path


def _content(path: Path) -> str:
    return (path / "sub" / "f.txt").read_text()


def _listing(parent: Path) -> list[str]:
    return sorted(os.listdir(parent))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux-only")
def test_exchange_swaps_two_directories(tmp_path: Path) -> None:
    a, b = _dir(tmp_path / "a", "A"), _dir(tmp_path / "b", "B")
    ino_a, ino_b = a.stat().st_ino, b.stat().st_ino
    assert exchange_paths(a, b)
    assert (_content(a), _content(b)) == ("B", "A")
    assert (a.stat().st_ino, b.stat().st_ino) == (ino_b, ino_a)  # the directories themselves moved, no copy
    with pytest.raises(FileNotFoundError):
        exchange_paths(a, tmp_path / "missing")  # an exchange needs both; a real error is not swallowed


def test_replace_dir_replaces_and_leaves_nothing_behind(tmp_path: Path) -> None:
    final = tmp_path / "out"
    replace_dir(_dir(tmp_path / ".tmp1", "first"), final)  # no final yet: a plain rename
    assert _content(final) == "first"
    new = _dir(tmp_path / ".tmp2", "second")
    ino = new.stat().st_ino
    replace_dir(new, final)  # final exists: swapped in (renameat2 on Linux)
    assert _content(final) == "second" and final.stat().st_ino == ino
    assert _listing(tmp_path) == ["out"]  # neither the temp dir nor the old copy is left


def test_kill_between_the_two_renames_is_restored(tmp_path: Path) -> None:
    """The fallback path moves `final` to `.final.old`, then `tmp` to `final`: a kill in between leaves only the
    old copy. The next call (a restart) restores it before swapping, so `final` is never lost."""
    final, old = tmp_path / "out", tmp_path / ".out.old"
    _dir(old, "old")  # the state a kill between the two renames leaves
    leftover_tmp = _dir(tmp_path / ".tmp-killed", "new, never moved in")
    recover_dir(final)
    assert _content(final) == "old" and not old.exists()
    recover_dir(final)  # nothing left to do
    assert _content(final) == "old"

    _dir(old, "old again")
    replace_dir(leftover_tmp, final)  # a restart that goes on with the swap restores first, then replaces
    assert _content(final) == "new, never moved in" and _listing(tmp_path) == ["out"]


def test_kill_while_deleting_the_old_copy(tmp_path: Path) -> None:
    """After the swap `final` is the new directory; a half-deleted `.old` is garbage and is removed."""
    final, old = _dir(tmp_path / "out", "new"), tmp_path / ".out.old"
    _dir(old, "old")
    (old / "sub" / "f.txt").unlink()
    replace_dir(_dir(tmp_path / ".tmp", "newer"), final)
    assert _content(final) == "newer" and _listing(tmp_path) == ["out"]
