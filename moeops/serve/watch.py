"""Hot reload: follow a registry alias and swap engines without dropping a request.

The registry replaces `<root>/aliases/<name>.json` atomically (temp file + rename), so a poll either sees the
old file or the new one, never half of it; a stat (inode, mtime, size) tells whether it changed, and only then is
it parsed. On a new version the engine is loaded, verified and warmed BESIDE the serving one, the router switches
in one assignment, and the old engine drains its in-flight requests in the background before it is closed (which
frees its ORT session and forgets its gauge series). A version that fails to load is logged once and not retried
until the alias moves again: retrying a damaged version every poll would spam the log and burn the CPU the
serving engine needs. Torch-free.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from moeops import registry
from moeops.ort import first_line
from moeops.registry.store import ALIASES


def _log(msg: str) -> None:
    print(f"moeops serve: {msg}", file=sys.stderr, flush=True)


class AliasWatcher:
    def __init__(self, root: Path, name: str, alias: str, router, make_engine: Callable[[Path, str], object],
                 interval_s: float, *, drain_timeout_s: float = 30.0) -> None:
        self.root, self.name, self.alias, self.router = Path(root), name, alias, router
        self.make_engine, self.interval_s, self.drain_timeout_s = make_engine, interval_s, drain_timeout_s
        self.path = self.root / "aliases" / f"{name}.json"
        self._seen: tuple[int, int, int] | None = None  # the alias file's (inode, mtime_ns, size) last parsed
        self._last: str | None = None  # the version it named then
        self._failed: str | None = None  # a version that failed to load: not retried until the alias moves
        self._unset_logged = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._drains: list[threading.Thread] = []

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="alias-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling (waits for a load in progress) and for the old engines still draining."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for t in self._drains:
            t.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception as e:  # the watcher must never die and leave a stale alias unnoticed
                _log(f"alias watcher: {first_line(e)}")

    def _target(self) -> str | None:
        """The version the alias names now (None: unset or no file). A version given as the alias is fixed."""
        if self.alias not in ALIASES:
            return self.alias
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        if sig == self._seen:
            return self._last
        self._seen = sig
        try:
            self._last = json.loads(self.path.read_text()).get(self.alias)
        except (OSError, ValueError, AttributeError) as e:
            _log(f"{self.path}: unreadable ({first_line(e)}); keeping the last version seen")
        return self._last

    def poll(self) -> None:
        """One check; reloads when the alias names another version than the router's current engine."""
        version = self._target()
        current = self.router.current
        serving = current.version if current is not None else None
        if version is None:
            if not self._unset_logged:
                _log(f"{self.name}: alias {self.alias!r} is unset; still serving {serving}")
                self._unset_logged = True
            return
        self._unset_logged = False
        if version == serving:
            self._failed = None
            return
        if version == self._failed:
            return
        self.reload(version, serving)

    def reload(self, version: str, serving: str | None) -> None:
        try:
            new = self.make_engine(registry.resolve(self.root, self.name, version), version)
        except Exception as e:
            self._failed = version
            _log(f"hot reload to {version} failed: {first_line(e)}; still serving {serving}")
            return
        if self._stop.is_set():  # shutting down: the server is draining what it serves; do not swap under it
            new.close()
            return
        old = self.router.set(new)
        _log(f"hot reload: now serving {version} (was {serving})")
        if old is not None:
            t = threading.Thread(target=self._retire, args=(old,), name=f"drain-{old.version}", daemon=True)
            self._drains = [d for d in self._drains if d.is_alive()] + [t]
            t.start()

    def _retire(self, old) -> None:
        if not old.drain(self.drain_timeout_s):
            _log(f"{old.version}: requests still running after {self.drain_timeout_s} s; closing it anyway")
        old.close()
