"""Corpus discovery: turn `corpus.source` into a sorted manifest of files with their name, size and sha256.

The manifest is the only thing later DVC stages depend on (the corpus stage is always_changed), so it
must be byte-identical whenever the files are: sorted absolute paths, sorted JSON keys, no timestamps.

A file's `name` is its path relative to the root of the source that lists it (`source_root`): the
stdlib directory, the configured directory, a glob's directory part, a file's own directory. The
name is the document's identity, which decides its train/val split, so it must not depend on which
other files the corpus holds: adding a file anywhere never renames (and so never re-splits) another.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from collections.abc import Iterable
from pathlib import Path

from moeops.cli import UserError
from moeops.io import atomic_write_bytes, sha256_file

STDLIB = "stdlib"
# Directories never taken from the standard library: third-party packages live under it in many
# installs, and the test suites are mostly fixtures (deliberately broken encodings, huge generated
# data) rather than representative code.
EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
GLOB_CHARS = set("*?[")
ALL_FILES = "*"  # in `corpus.extensions`: every file of a directory source; decoding then decides what is text


def is_test_dir(name: str) -> bool:
    """A directory name that holds tests: `test`, `tests`, `idle_test`, `test_*` or `*_test`."""
    return name in EXCLUDED_DIRS or name.startswith("test_") or name.endswith("_test")


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The `.py` files of this interpreter's standard library (or `root`), test and package dirs excluded."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending into excluded trees at all (site-packages is big).
        dirnames[:] = [d for d in dirnames if not is_test_dir(d)]
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return found


def dir_files(root: Path, extensions: Iterable[str]) -> list[Path]:
    """Files under `root` (recursive) whose suffix is one of `extensions` ("" takes files without a
    suffix, like LICENSE; "*" takes every file). Hidden files and dirs (.git, .DS_Store) are skipped."""
    extensions = list(extensions)
    suffixes = {e if e.startswith(".") or not e else f".{e}" for e in extensions}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath, f) for f in filenames
                  if not f.startswith(".") and (ALL_FILES in extensions or Path(f).suffix in suffixes)]
    return found


def source_root(source: str) -> Path:
    """The directory a source's file names are relative to: the stdlib directory, the directory itself,
    a file's parent, or a glob's leading directory part without glob characters ("src" for src/**/*.txt)."""
    if source == STDLIB:
        return Path(os.path.abspath(sysconfig.get_paths()["stdlib"]))
    path = Path(source).expanduser()
    if path.is_dir():
        return Path(os.path.abspath(path))
    if path.is_file():
        return Path(os.path.abspath(path.parent))
    plain = []
    for part in path.parts:
        if GLOB_CHARS & set(part):
            break
        plain.append(part)
    return Path(os.path.abspath(Path(*plain) if plain else Path(".")))


def resolve_source(source: str, extensions: Iterable[str]) -> list[Path]:
    """The files one `corpus.source` entry names. A source that names nothing is a UserError."""
    if source == STDLIB:
        return stdlib_files()
    if not source.strip():
        raise UserError("corpus.source: empty path")  # Path("") would silently mean the working dir
    path = Path(source).expanduser()
    if path.is_dir():
        return dir_files(path, extensions)
    if path.is_file():
        return [path]
    if GLOB_CHARS & set(source):
        files = [Path(p) for p in glob.glob(str(path), recursive=True) if os.path.isfile(p)]
        if not files:
            raise UserError(f"corpus.source: {source}: pattern matches no files")
        return files
    raise UserError(f"corpus.source: {source}: no such file or directory")


def named_corpus(source: str | list[str], extensions: Iterable[str]) -> dict[Path, str]:
    """Every file of every source (absolute path) -> its name relative to its source's root, in manifest
    order (sorted paths). A file listed by several sources takes its name from the first of them."""
    sources = [source] if isinstance(source, str) else list(source)
    if not sources:
        raise UserError("corpus.source: empty list")
    extensions = list(extensions)
    names: dict[Path, str] = {}
    for s in sources:
        root = source_root(s)
        for p in resolve_source(s, extensions):
            path = Path(os.path.abspath(p))
            names.setdefault(path, Path(os.path.relpath(path, root)).as_posix())
    check_names(names)
    if not names:
        raise UserError(f"corpus: no documents found in {', '.join(sources)} (extensions: {' '.join(extensions)})")
    return {p: names[p] for p in sorted(names, key=str)}


def check_names(files: Iterable[Path]) -> None:
    for f in files:
        try:
            str(f).encode("utf-8")
        except UnicodeEncodeError:  # os.walk hands back undecodable names as surrogates
            raise UserError(f"corpus: {str(f).encode('utf-8', 'surrogateescape')!r}: file name is not UTF-8; "
                            "rename or exclude it") from None


def list_corpus(source: str | list[str], extensions: Iterable[str]) -> list[Path]:
    """All files of all sources, absolute, deduplicated and sorted (the manifest order)."""
    return list(named_corpus(source, extensions))


def manifest_entry(path: Path, name: str) -> dict:
    try:
        return {"name": name, "path": str(path), "size": path.stat().st_size, "sha256": sha256_file(path)}
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def manifest_bytes(entries: list[dict]) -> bytes:
    """One JSON line per file; fixed key order and separators so equal inputs give equal bytes."""
    return b"".join(json.dumps(e, sort_keys=True).encode() + b"\n" for e in entries)


def write_manifest(source: str | list[str], extensions: Iterable[str], out: str | Path) -> list[dict]:
    """List the corpus and write the manifest atomically; an identical manifest is left untouched."""
    out = Path(out)
    entries = [manifest_entry(p, name) for p, name in named_corpus(source, extensions).items()]
    data = manifest_bytes(entries)
    if not (out.is_file() and out.read_bytes() == data):
        try:
            atomic_write_bytes(out, data)
        except OSError as e:
            raise UserError(f"{out}: cannot write ({e.strerror})") from None
    return entries


def read_manifest(path: str | Path) -> list[dict]:
    """Parse a manifest written by `write_manifest`; a missing or malformed one is a UserError."""
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: not found (run `python -m stages.corpus` first)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    entries = []
    for lineno, line in enumerate(lines, 1):
        try:
            e = json.loads(line)
            entry = {"name": str(e["name"]), "path": str(e["path"]), "size": int(e["size"]),
                     "sha256": str(e["sha256"])}
        except (ValueError, TypeError, KeyError):
            raise UserError(f"{path}:{lineno}: not a manifest line (expected name, path, size, sha256); "
                            "rerun `python -m stages.corpus`") from None
        entries.append(entry)
    if not entries:
        raise UserError(f"{path}: empty manifest (run `python -m stages.corpus`)")
    return entries
