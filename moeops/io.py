"""Atomic writes: temp file in the same directory, fsync, rename. A kill at any instant
leaves either the old file or the new one, never a half-written one (directories: see replace_dir)."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from moeops.cli import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(root)


# renameat2(2) flag: swap two existing paths in one step (Linux 3.15+, glibc 2.28+; most local filesystems)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_paths(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths with renameat2(RENAME_EXCHANGE). Returns False, having changed
    nothing, where the C library or the filesystem does not offer it (not Linux, old glibc, some network
    filesystems); raises OSError for any other failure."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _old_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def recover_dir(final: Path) -> None:
    """Finish what a killed replace_dir left: a `.<name>.old` copy is restored when `final` is missing (the kill
    came between moving the old directory aside and moving the new one in), and deleted when `final` is there
    (the kill came after the swap, while the old copy was being deleted)."""
    old = _old_path(final)
    if not old.exists():
        return
    if final.exists():
        shutil.rmtree(old)
    else:
        os.rename(old, final)
        fsync_dir(final.parent)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory `tmp` to `final`, replacing it, so that at every instant of a kill either
    the old or the new directory is at `final`, or the old one is at `.<name>.old` and the next call (or
    recover_dir) puts it back. On Linux an existing `final` is swapped with `tmp` in one renameat2
    (RENAME_EXCHANGE); elsewhere the old directory is moved aside first, then the new one moved in. Either way the
    old copy ends at `.<name>.old` and is then deleted."""
    fsync_tree(tmp)
    recover_dir(final)
    old = _old_path(final)
    if final.exists() and exchange_paths(tmp, final):  # final: new; tmp: old
        fsync_dir(final.parent)
        os.rename(tmp, old)
    else:
        if final.exists():
            os.rename(final, old)  # a kill from here to the next rename leaves only .old: recover_dir restores it
        os.rename(tmp, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json_object(path: str | Path) -> dict[str, Any] | None:
    """The JSON object in `path`; None when there is no such file; a one-line UserError when the file
    is not valid JSON or holds something other than an object."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); re-run the stage that writes it") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a JSON object ({type(data).__name__}); re-run the stage that writes it")
    return data
