"""Hot reload: follow the registry's aliases file and swap engines without dropping a request.

The registry replaces `<root>/aliases/<name>.json` atomically (temp file + rename), so a poll either sees the
old file or the new one, never half of it; a stat (inode, mtime, size) tells whether it changed, and only then is
it parsed. Serving `--alias champion` follows the whole file, reconciled at every poll:

- champion: a new version is loaded, verified and warmed BESIDE the serving one and the router switches in one
  assignment; when the new champion is the loaded challenger (a promoted canary) the router just promotes that
  engine, no reload;
- challenger: a new one is loaded and warmed beside the champion; a cleared one (rejected) is retired;
- challenger_weight: the router's share for the challenger, from this poll on.

A replaced or retired engine drains its in-flight requests in the background before it is closed (which frees
its ORT session and forgets its gauge series): no request is dropped by a swap. Serving another alias (challenger)
or a fixed version follows that one alone, with no challenger. A version that fails to load is logged once and not
retried until the alias moves again: retrying a damaged version every poll would spam the log and burn the CPU the
serving engine needs. Torch-free.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moeops import registry
from moeops.ort import first_line
from moeops.registry.store import ALIASES, is_weight


def _log(msg: str) -> None:
    print(f"moeops serve: {msg}", file=sys.stderr, flush=True)


class AliasWatcher:
    def __init__(self, root: Path, name: str, alias: str, router, make_engine: Callable[[Path, str], object],
                 interval_s: float, *, drain_timeout_s: float = 30.0) -> None:
        self.root, self.name, self.alias, self.router = Path(root), name, alias, router
        self.make_engine, self.interval_s, self.drain_timeout_s = make_engine, interval_s, drain_timeout_s
        self.path = self.root / "aliases" / f"{name}.json"
        self._seen: tuple[int, int, int] | None = None  # the aliases file's (inode, mtime_ns, size) last parsed
        self._last: dict[str, Any] = {}  # what it said then
        self._failed: dict[str, str | None] = {"champion": None, "challenger": None}  # not retried until it moves
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

    def _read(self) -> dict[str, Any]:
        """The aliases file as last parsed ({} when there is none); re-parsed only when it changed."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._seen, self._last = None, {}
            return self._last
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        if sig != self._seen:
            self._seen = sig
            try:
                data = json.loads(self.path.read_text())
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object")
                self._last = data
            except (OSError, ValueError) as e:
                _log(f"{self.path}: unreadable ({first_line(e)}); keeping the last versions seen")
        return self._last

    def wanted(self) -> tuple[str | None, str | None, float]:
        """(champion, challenger, challenger weight) this server should serve now."""
        if self.alias not in ALIASES:  # a version given as the alias is fixed
            return self.alias, None, 0.0
        data = self._read()
        if self.alias != "champion":
            return data.get(self.alias), None, 0.0
        weight = data.get("challenger_weight", 0.0)
        if not is_weight(weight):
            weight = 0.0  # the registry never writes this; a hand-edited file must not break routing
        return data.get("champion"), data.get("challenger"), float(weight)

    def poll(self) -> None:
        """One reconciliation of what is served with what the aliases file says."""
        champion, challenger, weight = self.wanted()
        self._sync_champion(champion)
        current = self.router.current
        self._sync_challenger(challenger, weight, current.version if current is not None else None)

    def sync_challenger(self, champion: str) -> None:
        """Load the file's challenger and weight alone, beside `champion`: the server calls this once at start-up,
        before it is ready, so that it serves the canary split from its first request."""
        _, challenger, weight = self.wanted()
        self._sync_challenger(challenger, weight, champion)

    def _sync_challenger(self, version: str | None, weight: float, champion: str | None) -> None:
        if version == champion:
            version = None  # the champion already serves it
        loaded = self.router.challenger
        have = loaded.version if loaded is not None else None
        if version == have:
            self._failed["challenger"] = None
        elif version is None:
            self.router.set_challenger(None)
            _log(f"challenger {have} retired")
            self._retire_later(loaded)
        elif version != self._failed["challenger"]:
            new = self._load(version, "challenger")
            if new is not None:
                old = self.router.set_challenger(new)
                _log(f"challenger {version} loaded beside {champion}"
                     + (f" (replaces {have})" if old is not None else ""))
                self._retire_later(old)
        old_weight = self.router.set_weight(weight)
        if old_weight != weight:
            _log(f"challenger weight {old_weight:g} -> {weight:g}")

    def _sync_champion(self, version: str | None) -> None:
        current = self.router.current
        serving = current.version if current is not None else None
        if version is None:
            if not self._unset_logged:
                _log(f"{self.name}: alias {self.alias!r} is unset; still serving {serving}")
                self._unset_logged = True
            return
        self._unset_logged = False
        if version == serving:
            self._failed["champion"] = None
            return
        if version == self._failed["champion"]:
            return
        loaded = self.router.challenger
        if loaded is not None and loaded.version == version:  # a promoted canary: its engine is already warm
            old = self.router.promote()
            _log(f"hot reload: now serving {version} (was {serving}; promoted the loaded challenger)")
            self._retire_later(old)
            return
        self.reload(version, serving)

    def reload(self, version: str, serving: str | None) -> None:
        new = self._load(version, "champion", serving)
        if new is None:
            return
        old = self.router.set(new)
        _log(f"hot reload: now serving {version} (was {serving})")
        self._retire_later(old)

    def _load(self, version: str, role: str, serving: str | None = None):
        """A started engine for `version`, or None (logged once; not retried until the alias moves)."""
        try:
            new = self.make_engine(registry.resolve(self.root, self.name, version), version)
        except Exception as e:
            self._failed[role] = version
            if role == "champion":
                _log(f"hot reload to {version} failed: {first_line(e)}; still serving {serving}")
            else:
                _log(f"challenger {version} failed to load: {first_line(e)}; the champion serves alone")
            return None
        if self._stop.is_set():  # shutting down: the server is draining what it serves; do not swap under it
            new.close()
            return None
        return new

    def _retire_later(self, old) -> None:
        if old is None:
            return
        t = threading.Thread(target=self._retire, args=(old,), name=f"drain-{old.version}", daemon=True)
        self._drains = [d for d in self._drains if d.is_alive()] + [t]
        t.start()

    def _retire(self, old) -> None:
        if not old.drain(self.drain_timeout_s):
            _log(f"{old.version}: requests still running after {self.drain_timeout_s} s; closing it anyway")
        old.close()
