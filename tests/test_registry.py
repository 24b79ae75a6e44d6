"""Filesystem registry: versions, aliases and the champion history, tamper refusal, locking under parallel
writers, a register killed mid-copy, the CLI, and the GTO tag mirror."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moeops.cli import UserError
from moeops.registry import (
    champion,
    history,
    list_models,
    promote,
    register,
    register_champion,
    resolve,
    rollback,
    show,
    store,
    verify,
)

REPO = Path(__file__).resolve().parents[1]


def _src(tmp_path: Path, tag: str) -> dict[str, Path]:
    """A model: one file and one directory, as a stage would register them."""
    d = tmp_path / f"src-{tag}"
    (d / "tok" / "sub").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(tag.encode() * 100)
    (d / "tok" / "tokenizer.json").write_text(json.dumps({"tag": tag}))
    (d / "tok" / "sub" / "x.txt").write_text(tag)
    return {"model.safetensors": d / "model.safetensors", "tokenizer": d / "tok"}


def _aliases(root: Path, name: str = "moe") -> dict:
    return json.loads((root / "aliases" / f"{name}.json").read_text())


def _snapshot(root: Path) -> tuple[bytes, bytes, list]:
    return (root / "aliases/moe.json").read_bytes(), (root / "audit.jsonl").read_bytes(), list_models(root)


@pytest.fixture
def reg(tmp_path: Path) -> Path:
    root = tmp_path / "reg"
    assert register(root, "moe", _src(tmp_path, "a"), {"git_commit": "abc"}, {"bpb": 1.5}) == "v1"
    assert register(root, "moe", _src(tmp_path, "b"), {"git_commit": "def"}, {"bpb": 1.4}, reason="nightly") == "v2"
    assert register(root, "moe", _src(tmp_path, "c"), {}, {}) == "v3"
    return root


def test_register_layout_and_manifest(reg: Path) -> None:
    vdir = reg / "versions/moe/v2"
    manifest = json.loads((vdir / "manifest.json").read_text())
    assert (manifest["name"], manifest["version"]) == ("moe", "v2")
    assert manifest["lineage"] == {"git_commit": "def"} and manifest["metrics"] == {"bpb": 1.4}
    assert set(manifest["files"]) == {"model.safetensors", "tokenizer/tokenizer.json", "tokenizer/sub/x.txt"}
    assert (vdir / "tokenizer/sub/x.txt").read_text() == "b"
    assert _aliases(reg) == {"champion": None, "challenger": "v3", "previous": [], "challenger_weight": 0.0}
    assert champion(reg, "moe") is None
    entries = history(reg, "moe")
    assert [(e["action"], e["from"], e["to"], e["reason"]) for e in entries] == [
        ("register", None, "v1", "registered"), ("register", "v1", "v2", "nightly"), ("register", "v2", "v3",
                                                                                     "registered")]
    assert {"time", "user", "pid"} <= set(entries[0]) and entries[0]["time"].endswith("+00:00")
    assert list(os.listdir(reg / ".staging")) == []
    assert show(reg, "moe", "v2")["metrics"] == {"bpb": 1.4} and show(reg, "moe", "challenger")["aliases"] == [
        "challenger"]


def test_promote_rollback_history(reg: Path) -> None:
    promote(reg, "moe", "v1", "first")
    promote(reg, "moe", "v2", "better")
    assert rollback(reg, "moe", "canary failed") == "v1"
    # the alias, the audit log and a reader following the alias all see v1
    assert _aliases(reg)["champion"] == "v1" == champion(reg, "moe")
    assert resolve(reg, "moe", "champion") == reg / "versions/moe/v1"
    last = history(reg, "moe")[-1]
    assert (last["action"], last["from"], last["to"], last["reason"]) == ("rollback", "v2", "v1", "canary failed")
    # a stack: v1, v2, v3 then rollback, rollback gives v2 then v1; nothing earlier is an error
    promote(reg, "moe", "v2", "again")
    assert _aliases(reg)["challenger"] == "v3"
    promote(reg, "moe", "v3", "best")
    assert _aliases(reg) == {"champion": "v3", "challenger": None, "previous": ["v1", "v2"],
                             "challenger_weight": 0.0}  # challenger cleared
    assert rollback(reg, "moe", "r1") == "v2" and rollback(reg, "moe", "r2") == "v1"
    before = _snapshot(reg)
    with pytest.raises(UserError, match="no earlier champion"):
        rollback(reg, "moe", "r3")
    with pytest.raises(UserError, match="already the champion"):
        promote(reg, "moe", "v1", "same")
    with pytest.raises(UserError, match="no such version"):
        promote(reg, "moe", "v9", "x")
    with pytest.raises(UserError, match="reason is required"):
        promote(reg, "moe", "v2", " ")
    assert _snapshot(reg) == before
    assert [e["action"] for e in history(reg, "moe")][3:] == ["promote", "promote", "rollback", "promote", "promote",
                                                             "rollback", "rollback"]
    assert list_models(reg) == [{"name": "moe", "versions": ["v1", "v2", "v3"], "champion": "v1", "challenger": None,
                                 "previous": [], "challenger_weight": 0.0}]
    assert verify(reg, "moe") == ["v1", "v2", "v3"]


def test_readers_create_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert champion(missing, "moe") is None and list_models(missing) == [] and history(missing, "moe") == []
    with pytest.raises(UserError, match="no registry here"):
        promote(missing, "moe", "v1", "x")
    with pytest.raises(UserError, match="no such version"):
        resolve(missing, "moe", "v1")
    assert not missing.exists()


def _tamper_changed(v: Path) -> Path:
    (v / "model.safetensors").write_bytes(b"evil")
    return v / "model.safetensors"


def _tamper_deleted(v: Path) -> Path:
    (v / "tokenizer/sub/x.txt").unlink()
    return v / "tokenizer/sub/x.txt"


def _tamper_added(v: Path) -> Path:
    (v / "tokenizer/extra.bin").write_bytes(b"x")
    return v / "tokenizer/extra.bin"


def _tamper_manifest(v: Path) -> Path:
    m = json.loads((v / "manifest.json").read_text())
    m["metrics"]["bpb"] = 0.1  # a better score than it had
    (v / "manifest.json").write_text(json.dumps(m))
    return v / "manifest.json"


@pytest.mark.parametrize("tamper", [_tamper_changed, _tamper_deleted, _tamper_added, _tamper_manifest])
def test_tampered_version_refused(reg: Path, tamper) -> None:
    promote(reg, "moe", "v1", "first")
    promote(reg, "moe", "v3", "second")
    bad = tamper(reg / "versions/moe/v1")
    before = _snapshot(reg)
    for call in (lambda: resolve(reg, "moe", "v1"), lambda: verify(reg, "moe"), lambda: promote(reg, "moe", "v1", "x"),
                 lambda: rollback(reg, "moe", "x"), lambda: show(reg, "moe", "v1")):
        with pytest.raises(UserError) as e:
            call()
        assert str(bad) in str(e.value) and "\n" not in str(e.value)
    assert _snapshot(reg) == before  # no alias moved, no audit entry
    assert verify(reg, "moe", "v2") == ["v2"] and resolve(reg, "moe", "champion").name == "v3"


@pytest.mark.parametrize("name", ["", "..", ".", "a/b", "../x", "/abs", "Moe", "-x", "x-", "a.b", "a" * 65, "a b", 3])
def test_bad_names_refused(tmp_path: Path, name) -> None:
    with pytest.raises(UserError, match="invalid model name"):
        register(tmp_path / "reg", name, _src(tmp_path, "a"), {}, {})
    for call in (champion, history):
        with pytest.raises(UserError, match="invalid model name"):
            call(tmp_path / "reg", name)
    assert not (tmp_path / "reg").exists()


def test_bad_versions_aliases_destinations_sources(tmp_path: Path, reg: Path) -> None:
    before = _snapshot(reg)
    for bad in ["1", "v", "v0", "v01", "V1", "v1/../v2", "../v1", "/v1", ""]:
        with pytest.raises(UserError, match="invalid version"):
            promote(reg, "moe", bad, "x")
    for bad in ["../../etc", "prod", "previous", "CHAMPION", "v1/.."]:
        with pytest.raises(UserError, match="unknown alias or version"):
            resolve(reg, "moe", bad)
    src = tmp_path / "src-a/model.safetensors"
    for dest in ["../x", "/abs", "a//b", "a/./b", "", "a/", "manifest.json", "a\\b"]:
        with pytest.raises(UserError, match="invalid destination"):
            register(reg, "moe", {dest: src}, {}, {})
    with pytest.raises(UserError, match="overlap"):
        register(reg, "moe", {"a": tmp_path / "src-a/tok", "a/b.bin": src}, {}, {})
    with pytest.raises(UserError, match=f"{tmp_path / 'missing.bin'}: source for 'w.bin' does not exist"):
        register(reg, "moe", {"model.safetensors": src, "w.bin": tmp_path / "missing.bin"}, {}, {})
    with pytest.raises(UserError, match="metrics is not a JSON object"):
        register(reg, "moe", {"m": src}, {}, {"bpb": float("nan")})
    assert _snapshot(reg) == before and os.listdir(reg / ".staging") == []
    # nothing written at all when the first register of a new root fails
    with pytest.raises(UserError, match="does not exist"):
        register(tmp_path / "fresh", "moe", {"m": tmp_path / "missing.bin"}, {}, {})
    assert not (tmp_path / "fresh").exists()


def test_root_not_writable(tmp_path: Path) -> None:
    # a parent that is a regular file: refused as root too (NotADirectoryError)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=f"{tmp_path / 'file' / 'reg'}: cannot create the registry") as e:
        register(tmp_path / "file" / "reg", "moe", _src(tmp_path, "a"), {}, {})
    assert "\n" not in str(e.value) and (tmp_path / "file").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions; covered by test_root_not_writable")
def test_root_read_only(tmp_path: Path, reg: Path) -> None:
    before = _snapshot(reg)
    reg.chmod(0o555)
    try:
        with pytest.raises(UserError, match=f"{reg}: registry root is not writable"):
            promote(reg, "moe", "v1", "x")
    finally:
        reg.chmod(0o755)
    assert _snapshot(reg) == before


def test_lock_timeout(reg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "LOCK_TIMEOUT_S", 0.2)
    before = _snapshot(reg)
    with store.registry_lock(reg):  # another open file description: conflicts even within one process
        with pytest.raises(UserError, match="still locked by another process"):
            promote(reg, "moe", "v1", "x")
    assert _snapshot(reg) == before
    promote(reg, "moe", "v1", "x")


def test_lock_released_when_holder_killed(reg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = ("import sys, time; from pathlib import Path; from moeops.registry import store\n"
            "with store.registry_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code, str(reg)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "locked\n"
        monkeypatch.setattr(store, "LOCK_TIMEOUT_S", 0.2)
        with pytest.raises(UserError, match="still locked"):
            promote(reg, "moe", "v1", "x")
    finally:
        p.kill()
        p.wait()
    assert p.returncode == -signal.SIGKILL
    promote(reg, "moe", "v1", "x")  # the kernel released the lock with the process
    assert champion(reg, "moe") == "v1"


WORKER = """
import sys
from moeops.registry import promote, register, rollback
root, w, n, src = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
for i in range(n):
    v = register(root, "moe", {"m.bin": src}, {"worker": w}, {"i": i}, reason=f"w{w} reg{i}")
    promote(root, "moe", v, f"w{w} promote{i}")  # never the champion yet: only this worker promotes v
    rollback(root, "moe", f"w{w} rollback{i}")  # the stack is never empty: every rollback follows its own promote
"""


def test_parallel_writers(tmp_path: Path, reg: Path) -> None:
    promote(reg, "moe", "v1", "seed")
    promote(reg, "moe", "v2", "seed")
    src = tmp_path / "w.bin"
    src.write_bytes(os.urandom(4096))
    workers, n = 4, 4
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(reg), str(w), str(n), str(src)],
                              stderr=subprocess.PIPE, text=True) for w in range(workers)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * workers, errs
    lines = (reg / "audit.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b""
    entries = [json.loads(x) for x in lines[:-1]]  # every line valid JSON
    assert len(entries) == 5 + workers * n * 3
    assert sorted(e["reason"] for e in entries[5:]) == sorted(
        f"w{w} {op}{i}" for w in range(workers) for i in range(n) for op in ("reg", "promote", "rollback"))
    assert len({e["pid"] for e in entries[5:]}) == workers
    # replaying the audit log in file order (= lock order) gives exactly the final aliases
    state = {"champion": None, "challenger": None, "previous": [], "challenger_weight": 0.0}
    for e in entries:
        if e["action"] == "register":
            assert e["from"] == state["challenger"]
            state["challenger"] = e["to"]
        elif e["action"] == "promote":
            assert e["from"] == state["champion"]
            if state["champion"]:
                state["previous"].append(state["champion"])
            state["champion"] = e["to"]
            state["challenger"] = None if state["challenger"] == e["to"] else state["challenger"]
        else:
            assert (e["from"], e["to"]) == (state["champion"], state["previous"][-1])
            state["champion"] = state["previous"].pop()
    assert _aliases(reg) == state
    assert verify(reg, "moe") == [f"v{i}" for i in range(1, 4 + workers * n)]
    assert os.listdir(reg / ".staging") == []


KILLED = """
import sys
from moeops.registry import register
register(sys.argv[1], "moe", {"big": sys.argv[2]}, {}, {})
"""


def test_register_killed_midway(tmp_path: Path, reg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    promote(reg, "moe", "v1", "first")
    big = tmp_path / "big"
    big.mkdir()
    for i in range(3000):  # copying, hashing and fsyncing these takes far longer than the poll below
        (big / f"{i:04d}.bin").write_bytes(b"x" * 512)
    before = _snapshot(reg)
    child = subprocess.Popen([sys.executable, "-c", KILLED, str(reg), str(big)])
    staging = reg / ".staging"
    deadline = time.monotonic() + 30
    while not any(any(d.rglob("*.bin")) for d in staging.iterdir()):
        assert child.poll() is None and time.monotonic() < deadline, "register finished before it could be killed"
        time.sleep(0.002)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL  # it really died from the signal, mid-register
    [stale] = list(staging.iterdir())
    assert any(stale.rglob("*.bin")) and not (reg / "versions/moe/v4").exists()
    assert _snapshot(reg) == before  # no version visible, aliases and audit log unchanged
    with pytest.raises(UserError, match="no such version"):
        resolve(reg, "moe", "v4")
    assert verify(reg, "moe") == ["v1", "v2", "v3"]
    monkeypatch.setattr(store, "LOCK_TIMEOUT_S", 1.0)  # the lock is free right away
    assert register(reg, "moe", _src(tmp_path, "d"), {}, {}) == "v4"
    assert not stale.exists() and os.listdir(staging) == []
    assert verify(reg, "moe") == ["v1", "v2", "v3", "v4"] and resolve(reg, "moe", "champion").name == "v1"


def _cli(*args: str, module: tuple[str, ...] = ("moeops.registry",), **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *module, *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **env})


def test_cli(reg: Path, tmp_path: Path) -> None:
    r = _cli("--root", str(reg), "promote", "moe", "v1", "--reason", "gate passed")
    assert r.returncode == 0 and r.stdout == "moe: champion -> v1\n", r.stderr
    r = _cli("registry", "promote", "moe", "v2", "--reason", "better", module=("moeops",), MOEOPS_REGISTRY=str(reg))
    assert r.returncode == 0, r.stderr
    assert "champion=v2 challenger=v3 weight=0 previous=v1 versions=v1,v2,v3" in _cli("--root", str(reg), "list").stdout
    r = _cli("registry", "--root", str(reg), "rollback", "moe", "--reason", "canary failed", module=("moeops",))
    assert r.returncode == 0 and r.stdout == "moe: champion -> v1\n", r.stderr
    assert json.loads(_cli("--root", str(reg), "show", "moe").stdout)["version"] == "v1"
    hist = [json.loads(x) for x in _cli("--root", str(reg), "history", "moe").stdout.splitlines()]
    assert [(e["action"], e["to"], e["reason"]) for e in hist][-3:] == [
        ("promote", "v1", "gate passed"), ("promote", "v2", "better"), ("rollback", "v1", "canary failed")]
    assert _cli("--root", str(reg), "verify", "moe").stdout == "moe: ok (v1, v2, v3)\n"
    for args in (("promote", "../x", "v1", "--reason", "x"), ("show", "moe", "../../etc"), ("verify", "moe", "v7")):
        bad = _cli("--root", str(reg), *args)
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, bad.stderr
    (reg / "versions/moe/v3/model.safetensors").write_bytes(b"evil")
    bad = _cli("--root", str(reg), "verify", "moe")
    assert bad.returncode == 2 and "v3/model.safetensors: fails its checksum" in bad.stderr
    bad = _cli("frobnicate", module=("moeops",))
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown command 'frobnicate'")
    assert _aliases(reg)["champion"] == "v1"


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None or not (Path(sys.executable).parent / "gto").exists(),
                    reason="needs git and gto")
def test_gto_tags_agree(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from gto.api import find_versions_in_stage

    repo, root = tmp_path / "repo", tmp_path / "reg"
    repo.mkdir()
    _git(repo, "init", "-q")
    commits = []
    for i in range(2):
        (repo / "f").write_text(str(i))
        _git(repo, "add", "f")
        _git(repo, "commit", "-qm", f"c{i}")
        commits.append(_git(repo, "rev-parse", "HEAD"))
    register(root, "moe", _src(tmp_path, "a"), {"git_commit": commits[0] + "-dirty"}, {})
    register(root, "moe", _src(tmp_path, "b"), {"git_commit": commits[1]}, {})
    register(root, "moe", _src(tmp_path, "c"), {"git_commit": commits[0]}, {})  # same commit as v1

    def prod() -> list[str]:
        return [v.version for v in find_versions_in_stage(repo, "moe", "prod")]

    promote(root, "moe", "v1", "first", gto_repo=repo)
    promote(root, "moe", "v2", "better", gto_repo=repo)  # same second as v1's tags: ordering must still hold
    assert prod() == ["v2.0.0"]
    assert rollback(root, "moe", "canary failed", gto_repo=repo) == "v1"
    gto = str(Path(sys.executable).parent / "gto")
    out = subprocess.run([gto, "show", "moe#prod", "--version"], cwd=repo, capture_output=True, text=True)
    assert out.stdout.strip() == "v1.0.0", out.stderr
    assert prod() == ["v1.0.0"]
    assert _git(repo, "rev-parse", "moe@v1.0.0^{commit}") == commits[0]
    assert _git(repo, "rev-parse", "moe@v2.0.0^{commit}") == commits[1]
    promote(root, "moe", "v3", "retrained", gto_repo=repo)  # GTO allows one version per commit: a child commit
    assert prod() == ["v3.0.0"] and _git(repo, "rev-parse", "moe@v3.0.0^{commit}^") == commits[0]
    assert _git(repo, "tag", "-l", "moe#prod#*", "--sort=taggerdate").split() == [
        "moe#prod#1", "moe#prod#3", "moe#prod#5", "moe#prod#7"]
    assert _git(repo, "status", "--porcelain") == "" and _git(repo, "rev-parse", "HEAD") == commits[1]
    assert capsys.readouterr().err == ""
    # not a git repository: the registry change stands, the failure is a warning
    promote(root, "moe", "v2", "again", gto_repo=tmp_path)
    assert champion(root, "moe") == "v2"
    assert "warning: moe v2: GTO tags not written" in capsys.readouterr().err


def test_staging_removed_before_the_commit_is_refused(tmp_path: Path, reg: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process removes this register's staging dir after the copy, before the commit: the manifest write
    would recreate the dir holding only the manifest; the commit re-checks the staged files under the lock."""
    real_lock = store.registry_lock

    @contextlib.contextmanager
    def lock_after_removal(root: Path, timeout_s: float | None = None):
        for d in (root / ".staging").iterdir():  # what a wrong cleanup by another writer would do
            shutil.rmtree(d)
        with real_lock(root, timeout_s):
            yield

    monkeypatch.setattr(store, "registry_lock", lock_after_removal)
    before = _snapshot(reg)
    with pytest.raises(UserError, match=r"/\.staging/.*/model\.safetensors: staged file missing or changed before "
                                        r"the commit") as e:
        register(reg, "moe", _src(tmp_path, "d"), {}, {})
    assert "\n" not in str(e.value)
    assert _snapshot(reg) == before and not (reg / "versions/moe/v4").exists() and os.listdir(reg / ".staging") == []


def test_stale_staging_recognised_by_host_boot_and_pid(tmp_path: Path, reg: Path) -> None:
    owner = store._owner()
    if owner is None:
        pytest.skip("no /proc/sys/kernel/random/boot_id: no staging dir is ever removed")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host, boot, pidns = owner.rsplit("-", 2)
    other_boot = "0" * 32 if boot != "0" * 32 else "1" * 32
    names = {"mine-dead": f"{owner}-{dead}-{'a' * 32}", "mine-alive": f"{owner}-{os.getpid()}-{'b' * 32}",
             "other-host": f"elsewhere-{boot}-{pidns}-{dead}-{'c' * 32}",
             "other-boot": f"{host}-{other_boot}-{pidns}-{dead}-{'d' * 32}",
             "other-pidns": f"{host}-{boot}-1{pidns}-{dead}-{'e' * 32}", "old-format": f"{dead}-{'f' * 32}"}
    for name in names.values():
        (reg / ".staging" / name).mkdir()
        (reg / ".staging" / name / "model.safetensors").write_bytes(b"half")
    assert register(reg, "moe", _src(tmp_path, "d"), {}, {}) == "v4"
    assert sorted(os.listdir(reg / ".staging")) == sorted(v for k, v in names.items() if k != "mine-dead")


def test_copied_bytes_must_match_what_was_recorded(tmp_path: Path, reg: Path) -> None:
    src = _src(tmp_path, "d")
    good = store.sha256_file(src["model.safetensors"])
    before = _snapshot(reg)
    with pytest.raises(UserError) as e:
        register(reg, "moe", src, {}, {}, expected={"the gate": {"model.safetensors": "0" * 64}})
    assert str(e.value) == (f"{src['model.safetensors']}: sha256 {good} as copied into the registry, but the gate "
                            f"records {'0' * 64}; nothing registered")
    with pytest.raises(UserError, match=r"src-d/tok/sub/x.txt: sha256 \w+ as copied into the registry, but its "
                                        r"producing stage \(lineage.export_checksums\) records 1{64}"):
        register(reg, "moe", src, {"export_checksums": {"tokenizer/sub/x.txt": "1" * 64}}, {})
    with pytest.raises(UserError, match="tok/missing.bin: sha256 missing as copied"):
        register(reg, "moe", src, {}, {}, expected={"x": {"tokenizer/missing.bin": good}})
    assert _snapshot(reg) == before and os.listdir(reg / ".staging") == []

    v = register(reg, "moe", src, {"export_checksums": {"model.safetensors": good}}, {},
                 expected={"the gate": {"model.safetensors": good}})
    assert verify(reg, "moe", v) == [v]
    # A manifest rewritten consistently (files and digest) after the model changed: the export's hash still
    # catches it.
    vdir = reg / "versions/moe" / v
    (vdir / "model.safetensors").write_bytes(b"changed")
    m = json.loads((vdir / "manifest.json").read_text())
    m["files"]["model.safetensors"] = {"sha256": store.sha256_file(vdir / "model.safetensors"), "size": 7}
    m["sha256"] = store._digest(m)
    (vdir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match=f"{vdir / 'model.safetensors'}: sha256 \\w+, but its producing stage "
                                        f"recorded {good}"):
        verify(reg, "moe", v)


def test_symlinks_never_lead_out_of_a_registered_directory(tmp_path: Path, reg: Path) -> None:
    src = _src(tmp_path, "d")
    tok = src["tokenizer"]
    (tok / "alias.json").symlink_to("tokenizer.json")  # in the tree: registered as a regular file
    v = register(reg, "moe", src, {}, {})
    copied = reg / "versions/moe" / v / "tokenizer/alias.json"
    assert not copied.is_symlink() and copied.read_text() == (tok / "tokenizer.json").read_text()
    before = _snapshot(reg)
    (tmp_path / "secret").write_text("outside")
    for link, target in (("out.json", tmp_path / "secret"), ("up.json", Path("../model.safetensors")),
                         ("dangling.json", Path("nope")), ("subdir", Path("sub"))):
        (tok / link).symlink_to(target)
        with pytest.raises(UserError, match=f"{tok / link}: a symlink to ") as e:
            register(reg, "moe", src, {}, {})
        assert "\n" not in str(e.value)
        (tok / link).unlink()
    assert _snapshot(reg) == before and os.listdir(reg / ".staging") == []


def test_register_champion_checks_the_champion_under_the_lock(tmp_path: Path, reg: Path) -> None:
    promote(reg, "moe", "v1", "first")
    before, src = _snapshot(reg), _src(tmp_path, "d")
    with pytest.raises(store.ChampionChanged, match="moe: champion changed: judged against none, the champion is "
                                                    "now v1") as e:
        register_champion(reg, "moe", src, {}, {}, "gate", judged_against=None)
    assert (e.value.expected, e.value.current) == (None, "v1")
    assert _snapshot(reg) == before and not (reg / "versions/moe/v4").exists()
    assert os.listdir(reg / ".staging") == []
    assert register_champion(reg, "moe", src, {}, {}, "gate", judged_against="v1") == "v4"
    assert _aliases(reg) == {"champion": "v4", "challenger": None, "previous": ["v1"], "challenger_weight": 0.0}
    assert [e["action"] for e in history(reg, "moe")][-2:] == ["register", "promote"]
