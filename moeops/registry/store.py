"""Filesystem model registry: immutable checksummed versions, atomically switched aliases, an append-only audit log.

Layout under `root`:

  versions/<name>/v<N>/       the registered files + manifest.json; never modified after the rename that creates it
      manifest.json           {name, version, created_at, files: {relpath: {sha256, size}}, lineage, metrics,
                               sha256}: the last one is the sha256 of the rest, so an edited manifest is caught too
  aliases/<name>.json         {"champion": "v3" | null, "challenger": "v4" | null, "previous": ["v1", "v2"],
                               "challenger_weight": 0.1}
                              challenger_weight: the share of requests a server routes to the challenger (canary;
                              0 when absent); registering a challenger, promoting or rejecting it resets it to 0
                              `previous` is the champion history (a stack, oldest first): promote pushes the old
                              champion, rollback pops it back
  audit.jsonl                 one fsynced JSON line per change: time (UTC), action, name, from, to, reason, user, pid
  .staging/<host>-<boot>-<pidns>-<pid>-<hex>/
                              a register in progress (hidden). The next register removes it only when it was made on
                              this host, in this boot (/proc/sys/kernel/random/boot_id) and pid namespace, by a pid
                              that is dead; a dir of another host or boot (a shared filesystem) is left alone
  .lock                       exclusive fcntl.flock target; the kernel drops it when its holder dies

A version is committed by one rename of its fully written, fsynced staging dir; aliases are replaced by a temp
file + fsync + rename. So a kill at any instant leaves the previous state readable and no partial version visible
(a kill between the rename and the alias/audit write leaves a complete, verifiable version that is not the
challenger and has no audit line). Writers (register's commit, promote, rollback) hold the lock; readers (resolve,
show, history, list_models, verify, champion) need none because every file they read is replaced atomically or
never changes. Copying and hashing a register's files happen before the lock, so a big model does not block a
rollback; under the lock the commit re-hashes the staged files against the manifest (a staging dir removed or
changed by another process is never committed), and promote/rollback verify their target's checksums, so nothing
can change in between. register_champion checks that the champion is still the one a gate judged against, commits
and moves the champion alias under that one lock, so two promotions judged against the same champion cannot both
win; register_challenger (a canary) checks the champion the same way and sets the challenger's weight in that
commit's alias write. With `gto_repo`, promote and rollback also write GTO git tags (registry vN = GTO vN.0.0;
see gto.py).

Chain of custody: register's `expected` ({who recorded it: {registered relpath: sha256}}) and the lineage's
`export_checksums` ({registered relpath: sha256}, what the producing stage recorded) are compared with the hashes of
the bytes actually copied into the staging dir; verify_dir (and so resolve, show, verify, promote) checks the
files against `export_checksums` again. Symlinks: a source named in `files` is followed (the caller chose it);
inside a source directory, a symlink to a regular file inside that directory is registered as a regular file with
its target's content, and any other symlink (out of the directory, dangling, or to a directory) is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from moeops.cli import UserError
from moeops.io import atomic_write_json, fsync_dir, fsync_tree, sha256_file

# lowercase, digits, '-' and '_', starting and ending alphanumeric: one path component and a valid GTO artifact name
NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9_-]{0,62}[a-z0-9])?")
VERSION_RE = re.compile(r"v[1-9][0-9]{0,8}")
ALIASES = ("champion", "challenger")
MANIFEST = "manifest.json"
EXPORT_CHECKSUMS = "export_checksums"  # lineage key: {registered relpath: sha256 the producing stage recorded}
LOCK_TIMEOUT_S = 30.0  # read at call time, so tests (and callers) can lower it


def is_weight(weight: object) -> bool:
    """A challenger weight: a number (not a bool) in [0, 1]."""
    return not isinstance(weight, bool) and isinstance(weight, int | float) and 0 <= weight <= 1


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UserError(f"invalid model name {name!r}: use 1-64 of [a-z0-9_-], starting and ending with [a-z0-9]")
    return name


def check_version(version: object) -> str:
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise UserError(f"invalid version {version!r}: expected v<N> with N >= 1, e.g. v3")
    return version


def check_alias(alias: object) -> str:
    """An alias name or a version; anything else (paths included) is refused."""
    if isinstance(alias, str) and (alias in ALIASES or VERSION_RE.fullmatch(alias)):
        return alias
    raise UserError(f"unknown alias or version {alias!r}: use {' or '.join(ALIASES)} or v<N>")


def _check_dest(dest: object) -> str:
    if not isinstance(dest, str) or "\\" in dest or any(c in ("", ".", "..") for c in dest.split("/")):
        raise UserError(f"invalid destination {dest!r}: use a relative path without '.', '..' or empty components")
    if dest.split("/")[0] == MANIFEST:
        raise UserError(f"invalid destination {dest!r}: {MANIFEST} is reserved for the registry")
    return dest


def _check_reason(reason: object) -> str:
    if not isinstance(reason, str) or not reason.strip():
        raise UserError("a reason is required (it goes into the audit log)")
    return reason


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        return str(os.getuid())


def _existing_root(root: str | Path) -> Path:
    """The root of an existing, writable registry (promote / rollback never create one)."""
    root = Path(root)
    if not (root / "versions").is_dir():
        raise UserError(f"{root}: no registry here (register a model first)")
    if not os.access(root, os.W_OK):
        raise UserError(f"{root}: registry root is not writable")
    return root


def _prepare_root(root: str | Path) -> Path:
    root = Path(root)
    try:
        for d in ("versions", "aliases", ".staging"):
            (root / d).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{root}: cannot create the registry ({e.strerror})") from None
    return _existing_root(root)


@contextlib.contextmanager
def registry_lock(root: Path, timeout_s: float | None = None) -> Iterator[None]:
    """Exclusive flock on <root>/.lock; closing the fd (or the holder dying) releases it."""
    timeout_s = LOCK_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"{root / '.lock'}: cannot open the registry lock ({e.strerror})") from None
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise UserError(f"{root / '.lock'}: registry still locked by another process after "
                                    f"{timeout_s:g} s") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)


def _append_audit(root: Path, action: str, name: str, frm: str | None, to: str | None, reason: str) -> None:
    """Append one fsynced JSON line. The caller holds the lock, so lines never interleave."""
    entry = {"time": _now(), "action": action, "name": name, "from": frm, "to": to, "reason": reason,
             "user": _user(), "pid": os.getpid()}
    line = json.dumps(entry, sort_keys=True).encode() + b"\n"
    fd = os.open(root / "audit.jsonl", os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn last line (power loss): keep it on its own line
            line = b"\n" + line
        os.write(fd, line)  # one write with O_APPEND: earlier lines are never rewritten
        os.fsync(fd)
    finally:
        os.close(fd)


def _aliases_path(root: Path, name: str) -> Path:
    return root / "aliases" / f"{name}.json"


def _read_aliases(root: Path, name: str) -> dict[str, Any]:
    path = _aliases_path(root, name)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        data = {}
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable aliases file ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: malformed aliases file (edited by hand?)")
    out = {"champion": data.get("champion"), "challenger": data.get("challenger"), "previous": data.get("previous", []),
           "challenger_weight": data.get("challenger_weight", 0.0)}
    vs = [out["champion"], out["challenger"], *out["previous"]] if isinstance(out["previous"], list) else [0]
    if not all(v is None or (isinstance(v, str) and VERSION_RE.fullmatch(v)) for v in vs) or None in out["previous"]:
        raise UserError(f"{path}: malformed aliases file (edited by hand?)")
    weight = out["challenger_weight"]
    if not is_weight(weight):
        raise UserError(f"{path}: challenger_weight: expected a number in [0, 1], got {weight!r}")
    return out


class ChampionChanged(UserError):
    """register_champion: the champion is no longer the one the caller judged against."""

    def __init__(self, name: str, expected: str | None, current: str | None) -> None:
        self.expected, self.current = expected, current
        super().__init__(f"{name}: champion changed: judged against {expected or 'none'}, the champion is now "
                         f"{current or 'none'}")


def _write_aliases(root: Path, name: str, aliases: dict[str, Any]) -> None:
    atomic_write_json(_aliases_path(root, name), aliases)


def _version_numbers(root: Path, name: str) -> list[int]:
    d = root / "versions" / name
    if not d.is_dir():
        return []
    return sorted(int(p.name[1:]) for p in d.iterdir() if VERSION_RE.fullmatch(p.name) and p.is_dir())


def _version_dir(root: Path, name: str, version: str) -> Path:
    d = Path(root) / "versions" / check_name(name) / check_version(version)
    if not d.is_dir():
        raise UserError(f"{name} {version}: no such version in {root}")
    return d


def _hash_tree(d: Path) -> dict[str, dict[str, Any]]:
    return {p.relative_to(d).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
            for p in sorted(d.rglob("*")) if p.is_file() and p.relative_to(d).as_posix() != MANIFEST}


def _digest(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def verify_dir(vdir: Path) -> dict[str, Any]:
    """Check a version dir against its manifest: the manifest's own digest, its name/version, every file's sha256,
    and no file added. Returns the manifest; raises a one-line UserError naming the first bad file."""
    mpath = vdir / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
        recorded = manifest["files"]
        ok = manifest["sha256"] == _digest(manifest)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{mpath}: missing or unreadable manifest ({type(e).__name__}: {e})") from None
    if not ok or (manifest.get("name"), manifest.get("version")) != (vdir.parent.name, vdir.name):
        raise UserError(f"{mpath}: manifest was edited or moved after registration (its digest or name/version "
                        f"does not match)")
    actual = _hash_tree(vdir)
    for rel, meta in sorted(recorded.items()):
        if rel not in actual:
            raise UserError(f"{vdir / rel}: missing; the file was deleted after registration")
        if actual[rel]["sha256"] != meta["sha256"]:
            raise UserError(f"{vdir / rel}: fails its checksum (sha256 {actual[rel]['sha256'][:12]}, manifest "
                            f"records {meta['sha256'][:12]}); the file was changed after registration")
    extra = sorted(set(actual) - set(recorded))
    if extra:
        raise UserError(f"{vdir / extra[0]}: not in the manifest; the file was added after registration")
    exported = manifest.get("lineage", {}).get(EXPORT_CHECKSUMS) or {}
    for rel, sha in sorted(exported.items()):
        got = actual.get(rel, {}).get("sha256", "missing")
        if got != sha:
            raise UserError(f"{vdir / rel}: sha256 {got}, but its producing stage recorded {sha} (manifest "
                            f"lineage.{EXPORT_CHECKSUMS})")
    return manifest


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "") or None
    except OSError:
        return None


def _owner() -> str | None:
    """'<host>-<boot id>-<pid namespace>' of this process; None where the boot id is unknown (not Linux): then no
    staging dir can be proven abandoned, and none is removed."""
    boot = _boot_id()
    if boot is None:
        return None
    host = re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname()) or "unknown"
    try:
        pidns = re.sub(r"\D", "", os.readlink("/proc/self/ns/pid")) or "0"
    except OSError:
        pidns = "0"
    return f"{host}-{boot}-{pidns}"


def _staging_name() -> str:
    return f"{_owner() or 'unknown-0-0'}-{os.getpid()}-{uuid.uuid4().hex}"


def _clean_stale_staging(root: Path) -> None:
    """Remove staging dirs whose register process is provably gone (killed mid-copy): made by this host, in this
    boot and pid namespace, by a pid that no longer exists. Anything else (another host or boot on a shared
    filesystem, a live or foreign pid, an unknown name) is left alone. Called under the lock."""
    owner = _owner()
    if owner is None:
        return
    for d in (root / ".staging").iterdir():
        parts = d.name.rsplit("-", 2)
        if len(parts) != 3 or parts[0] != owner or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue  # alive (or owned by another user: EPERM)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(d, ignore_errors=True)


def _walk_source(src: Path) -> Iterator[tuple[Path, Path]]:
    """(path, relpath) of every directory and file of a source directory, top first, refusing any symlink that
    leads out of it (see the module docstring) and anything that is not a regular file or a directory."""
    top = src.resolve()
    for dirpath, dirnames, filenames in os.walk(src):  # followlinks=False: a symlinked dir is never entered
        here = Path(dirpath)
        yield here, here.relative_to(src)
        for n in dirnames:
            if (here / n).is_symlink():
                raise UserError(f"{here / n}: a symlink to a directory; the registry copies only regular files")
        for n in filenames:
            path = here / n
            if path.is_symlink():
                dest = path.resolve()
                if not dest.is_relative_to(top) or not dest.is_file():
                    raise UserError(f"{path}: a symlink to {os.readlink(path)}, outside {src} (or not a regular "
                                    f"file); the registry never follows links out of a registered directory")
            elif not stat.S_ISREG(path.lstat().st_mode):
                raise UserError(f"{path}: not a regular file (a fifo, socket or device cannot be registered)")
            yield path, path.relative_to(src)


def _copy_source(src: Path, target: Path) -> None:
    """Copy a file (following a symlink the caller named), or a directory through _walk_source."""
    if not src.is_dir():
        shutil.copy2(src, target)
        return
    for path, rel in _walk_source(src):
        if path.is_dir() and not path.is_symlink():
            (target / rel).mkdir(exist_ok=True)
        else:
            shutil.copy2(path, target / rel)  # an in-tree symlink: its target's content


def _source_of(plan: Mapping[str, Path], rel: str) -> Path:
    """The source path of a registered relpath (for messages)."""
    for dest, src in plan.items():
        if rel == dest:
            return src
        if rel.startswith(dest + "/"):
            return src / rel[len(dest) + 1:]
    return Path(rel)


def _check_expected(plan: Mapping[str, Path], staged: Mapping[str, Mapping[str, Any]],
                    expected: Mapping[str, Mapping[str, str]]) -> None:
    """The bytes copied are the bytes everyone recorded: {who: {registered relpath: sha256}}."""
    for who, hashes in expected.items():
        for rel, sha in sorted(hashes.items()):
            got = staged.get(rel, {}).get("sha256", "missing")
            if got != sha:
                raise UserError(f"{_source_of(plan, rel)}: sha256 {got} as copied into the registry, but {who} "
                                f"records {sha}; nothing registered")


def _check_staged(staging: Path, files: Mapping[str, Any]) -> None:
    """Right before the commit (under the lock): every staged file is there with the manifest's sha256, and nothing
    else, so a staging dir removed (and recreated by the manifest write) or changed by another process is refused."""
    actual = _hash_tree(staging)
    for rel, meta in sorted(files.items()):
        if actual.get(rel, {}).get("sha256") != meta["sha256"]:
            raise UserError(f"{staging / rel}: staged file missing or changed before the commit (was the staging "
                            f"directory removed by another process?); nothing registered")
    extra = sorted(set(actual) - set(files))
    if extra:
        raise UserError(f"{staging / extra[0]}: appeared in the staging directory before the commit; nothing "
                        f"registered")


def register(root: str | Path, name: str, files: Mapping[str, str | Path], lineage: dict[str, Any],
             metrics: dict[str, Any], reason: str = "registered", *,
             expected: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """Copy `files` ({dest relative to the version dir: source file or dir}) into a new immutable version, which
    becomes the challenger. Returns 'vN'. Validates everything before writing anything. `expected`
    ({who recorded them: {dest relpath: sha256}}) and lineage[EXPORT_CHECKSUMS] must match the copied bytes."""
    return _register(root, name, files, lineage, metrics, reason, expected)


def register_champion(root: str | Path, name: str, files: Mapping[str, str | Path], lineage: dict[str, Any],
                      metrics: dict[str, Any], reason: str, *, judged_against: str | None,
                      expected: Mapping[str, Mapping[str, str]] | None = None,
                      gto_repo: str | Path | None = None) -> str:
    """register() + promote() as one step: under one lock, check the champion is still `judged_against` (else
    ChampionChanged, nothing registered), commit the version and make it the champion. Returns 'vN'."""
    return _register(root, name, files, lineage, metrics, reason, expected, promote=True,
                     judged_against=judged_against, gto_repo=gto_repo)


def register_challenger(root: str | Path, name: str, files: Mapping[str, str | Path], lineage: dict[str, Any],
                        metrics: dict[str, Any], reason: str, *, judged_against: str | None, weight: float,
                        expected: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """register() for a canary: under one lock, check the champion is still `judged_against` (else ChampionChanged,
    nothing registered), commit the version and make it the challenger taking `weight` (0..1) of the requests (one
    alias write; the audit line "register" names the weight). Returns 'vN'."""
    return _register(root, name, files, lineage, metrics, reason, expected, check_champion=True,
                     judged_against=judged_against, weight=weight)


def _register(root: str | Path, name: str, files: Mapping[str, str | Path], lineage: dict[str, Any],
              metrics: dict[str, Any], reason: str, expected: Mapping[str, Mapping[str, str]] | None, *,
              promote: bool = False, judged_against: str | None = None,
              gto_repo: str | Path | None = None, check_champion: bool = False, weight: float = 0.0) -> str:
    check_name(name)
    _check_reason(reason)
    if not is_weight(weight):
        raise UserError(f"{name}: challenger weight {weight!r} is not a number in [0, 1]")
    if not files:
        raise UserError(f"{name}: nothing to register (files is empty)")
    plan = {_check_dest(dest): Path(src) for dest, src in files.items()}
    for dest, src in plan.items():
        if not src.exists():
            raise UserError(f"{src}: source for {dest!r} does not exist")
    for dest, src in plan.items():
        for parent in PurePosixPath(dest).parents:
            if str(parent) in plan:
                raise UserError(f"destinations {str(parent)!r} and {dest!r} overlap")
        if src.is_dir():
            for _ in _walk_source(src):  # refuse a bad symlink before creating anything (copying checks again)
                pass
    for what, d in (("lineage", lineage), ("metrics", metrics)):
        try:
            if not isinstance(d, dict):
                raise TypeError(f"expected a dict, got {type(d).__name__}")
            json.dumps(d, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise UserError(f"{name}: {what} is not a JSON object ({e})") from None
    expected = dict(expected or {})
    exported = lineage.get(EXPORT_CHECKSUMS)
    if exported is not None:
        if not isinstance(exported, dict) or not all(isinstance(v, str) for v in exported.values()):
            raise UserError(f"{name}: lineage.{EXPORT_CHECKSUMS}: expected {{registered relpath: sha256}}")
        expected[f"its producing stage (lineage.{EXPORT_CHECKSUMS})"] = exported

    root = _prepare_root(root)
    staging = root / ".staging" / _staging_name()
    staging.mkdir()
    try:
        for dest, src in plan.items():  # slow part (copy, hash, fsync) outside the lock
            target = staging / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                _copy_source(src, target)
            except OSError as e:
                raise UserError(f"{src}: cannot copy into the registry ({str(e)[:300]})") from None
        staged = _hash_tree(staging)
        _check_expected(plan, staged, expected)
        manifest: dict[str, Any] = {"name": name, "files": staged, "lineage": lineage, "metrics": metrics}
        fsync_tree(staging)  # the files and the top dir; the entries of subdirectories too:
        for d in staging.rglob("*"):
            if d.is_dir():
                fsync_dir(d)
        with registry_lock(root):
            _clean_stale_staging(root)
            if promote or check_champion:
                current = _read_aliases(root, name)["champion"]
                if current != judged_against:
                    raise ChampionChanged(name, judged_against, current)
            vroot = root / "versions" / name
            if not vroot.is_dir():
                vroot.mkdir()
                fsync_dir(vroot.parent)
            version = f"v{max(_version_numbers(root, name), default=0) + 1}"
            manifest.update(version=version, created_at=_now())
            manifest["sha256"] = _digest(manifest)
            atomic_write_json(staging / MANIFEST, manifest)
            _check_staged(staging, manifest["files"])
            os.rename(staging, vroot / version)  # the commit point; fails rather than overwrite a version
            fsync_dir(vroot)
            aliases = _read_aliases(root, name)
            old = aliases["challenger"]
            aliases["challenger"], aliases["challenger_weight"] = version, 0.0 if promote else float(weight)
            _write_aliases(root, name, aliases)
            _append_audit(root, "register", name, old, version, reason if not weight or promote else
                          f"{reason}; challenger weight {weight:g}")
            if promote:
                _set_champion(root, name, version, reason, gto_repo)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return version


def _tag(gto_repo: str | Path | None, root: Path, name: str, version: str, reason: str, previous: str | None) -> None:
    """GTO tags are a mirror: a failure is a warning, never an error (the registry is the source of truth)."""
    if gto_repo is None:
        return
    from moeops.registry import gto

    try:
        lineage = json.loads((root / "versions" / name / version / MANIFEST).read_text()).get("lineage", {})
        gto.tag_assignment(gto_repo, name, version, lineage, reason, previous)
    except Exception as e:  # any failure of git must not undo a registry change
        print(f"warning: {name} {version}: GTO tags not written in {gto_repo}: {e}", file=sys.stderr)


def promote(root: str | Path, name: str, version: str, reason: str, *, gto_repo: str | Path | None = None) -> None:
    """Make `version` the champion (after verifying its files); the old champion is pushed on the history stack.
    A challenger equal to `version` is cleared."""
    check_name(name)
    check_version(version)
    _check_reason(reason)
    root = _existing_root(root)
    with registry_lock(root):
        verify_dir(_version_dir(root, name, version))  # never point an alias at damaged files
        _set_champion(root, name, version, reason, gto_repo)


def _set_champion(root: Path, name: str, version: str, reason: str, gto_repo: str | Path | None) -> None:
    """The alias move of promote; the caller holds the lock and has verified `version`."""
    aliases = _read_aliases(root, name)
    old = aliases["champion"]
    if old == version:
        raise UserError(f"{name} {version}: already the champion")
    if old is not None:
        aliases["previous"].append(old)
    aliases["champion"] = version
    if aliases["challenger"] == version:
        aliases["challenger"], aliases["challenger_weight"] = None, 0.0
    _write_aliases(root, name, aliases)
    _append_audit(root, "promote", name, old, version, reason)
    _tag(gto_repo, root, name, version, reason, old)


def rollback(root: str | Path, name: str, reason: str, *, gto_repo: str | Path | None = None) -> str:
    """Pop the champion history: the previous champion is champion again (one atomic alias write). Returns it."""
    check_name(name)
    _check_reason(reason)
    root = _existing_root(root)
    with registry_lock(root):
        aliases = _read_aliases(root, name)
        if not aliases["previous"]:
            raise UserError(f"{name}: no earlier champion to roll back to")
        cur, prev = aliases["champion"], aliases["previous"][-1]
        verify_dir(_version_dir(root, name, prev))
        aliases["champion"] = aliases["previous"].pop()
        _write_aliases(root, name, aliases)
        _append_audit(root, "rollback", name, cur, prev, reason)
        _tag(gto_repo, root, name, prev, f"rollback: {reason}", cur)
    return prev


def set_challenger_weight(root: str | Path, name: str, weight: float, reason: str) -> str:
    """Route `weight` (0..1) of the requests of every server following this registry to the challenger (one atomic
    alias write, one audit line "weight"). Returns the challenger's version; no challenger is an error."""
    check_name(name)
    _check_reason(reason)
    if not is_weight(weight):
        raise UserError(f"{name}: challenger weight {weight!r} is not a number in [0, 1]")
    root = _existing_root(root)
    with registry_lock(root):
        aliases = _read_aliases(root, name)
        if aliases["challenger"] is None:
            raise UserError(f"{name}: no challenger to route traffic to")
        old, aliases["challenger_weight"] = aliases["challenger_weight"], float(weight)
        _write_aliases(root, name, aliases)
        _append_audit(root, "weight", name, f"{aliases['challenger']}@{old:g}", f"{aliases['challenger']}@{weight:g}",
                      reason)
    return aliases["challenger"]


def reject(root: str | Path, name: str, version: str, reason: str) -> None:
    """The challenger `version` failed its canary: weight 0 and no challenger, in one alias write; the audit line
    ("reject") carries the reason (which metric failed, its values and thresholds). The champion is untouched."""
    check_name(name)
    check_version(version)
    _check_reason(reason)
    root = _existing_root(root)
    with registry_lock(root):
        aliases = _read_aliases(root, name)
        if aliases["challenger"] != version:
            raise UserError(f"{name} {version}: not the challenger (the challenger is {aliases['challenger']})")
        aliases["challenger"], aliases["challenger_weight"] = None, 0.0
        _write_aliases(root, name, aliases)
        _append_audit(root, "reject", name, version, aliases["champion"], reason)


def champion(root: str | Path, name: str) -> str | None:
    """The champion version, or None (no champion, no such model, no registry). Creates nothing."""
    check_name(name)
    if not _aliases_path(Path(root), name).is_file():
        return None
    return _read_aliases(Path(root), name)["champion"]


def resolve(root: str | Path, name: str, alias_or_version: str) -> Path:
    """The directory of a version ('vN') or of an alias's target, after checking every file's sha256."""
    root = Path(root)
    check_name(name)
    version = check_alias(alias_or_version)
    if version in ALIASES:
        version = _read_aliases(root, name)[alias_or_version]
        if version is None:
            raise UserError(f"{name}: alias {alias_or_version!r} is not set in {root}")
    vdir = _version_dir(root, name, version)
    verify_dir(vdir)
    return vdir


def show(root: str | Path, name: str, alias_or_version: str = "champion") -> dict[str, Any]:
    """A verified version's manifest plus its path and the aliases pointing at it."""
    vdir = resolve(root, name, alias_or_version)
    manifest = json.loads((vdir / MANIFEST).read_text())
    aliases = _read_aliases(Path(root), name)
    return {**manifest, "path": str(vdir), "aliases": [a for a in ALIASES if aliases[a] == vdir.name]}


def history(root: str | Path, name: str) -> list[dict[str, Any]]:
    """The audit entries of `name`, oldest first."""
    check_name(name)
    path = Path(root) / "audit.jsonl"
    if not path.is_file():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        try:
            entry = json.loads(line)
        except ValueError:
            raise UserError(f"{path}:{i}: not valid JSON (torn write or tampering)") from None
        if entry.get("name") == name:
            out.append(entry)
    return out


def list_models(root: str | Path) -> list[dict[str, Any]]:
    """[{name, versions, champion, challenger, previous}] for every model; [] when there is no registry."""
    root = Path(root)
    vroot = root / "versions"
    if not vroot.is_dir():
        return []
    names = sorted(p.name for p in vroot.iterdir() if NAME_RE.fullmatch(p.name) and p.is_dir())
    return [{"name": n, "versions": [f"v{i}" for i in _version_numbers(root, n)], **_read_aliases(root, n)}
            for n in names]


def verify(root: str | Path, name: str, version: str | None = None) -> list[str]:
    """Check one version (or all, and that the aliases point at existing versions). Returns the versions checked;
    raises a UserError naming the first bad file."""
    root = Path(root)
    check_name(name)
    if version is not None:
        versions = [check_version(version)]
    else:
        versions = [f"v{i}" for i in _version_numbers(root, name)]
        if not versions:
            raise UserError(f"{name}: no versions in {root}")
        aliases = _read_aliases(root, name)
        for v in (aliases["champion"], aliases["challenger"], *aliases["previous"]):
            if v is not None and v not in versions:
                raise UserError(f"{_aliases_path(root, name)}: points at {v}, which does not exist")
    for v in versions:
        verify_dir(_version_dir(root, name, v))
    return versions
