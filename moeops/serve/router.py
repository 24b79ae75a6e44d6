"""Which engine answers a request: the champion, or the challenger for a weighted share of the callers (a
canary). One place decides it, so the routes never know whether a canary runs. Torch-free.

A request names the model by its registry name ("moeops": the champion, or the challenger for `weight` of the
callers) or pinned to a version ("moeops@v3": that version's engine, champion or challenger; unknown otherwise).

Sticky routing: a caller's key (tenant + user or session, built by the app) hashes to a fixed point in [0, 1)
(blake2b, the same in every process and run, unlike hash()); the caller goes to the challenger while that point
is below the weight. So one conversation stays on one version, and raising the weight from 0.1 to 0.5 only moves
callers from the champion to the challenger, never back. A request without a key draws at random.
"""

from __future__ import annotations

import hashlib
import random
import threading
from typing import TYPE_CHECKING

from moeops.serve.engine import EngineClosed

if TYPE_CHECKING:
    from moeops.serve.engine import Engine


def sticky_point(key: str) -> float:
    """A stable point in [0, 1) for a routing key."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2.0**64


class Router:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self._lock = threading.Lock()  # the setters run on the loader / watcher threads, get() on the event loop
        self._champion: Engine | None = None
        self._challenger: Engine | None = None
        self._weight = 0.0  # the challenger's share of the callers, 0..1

    def set(self, engine: Engine) -> Engine | None:
        """Make `engine` the champion from the next get(); returns the one it replaces."""
        with self._lock:
            old, self._champion = self._champion, engine
        return old

    def set_challenger(self, engine: Engine | None) -> Engine | None:
        """Serve `engine` beside the champion (None: no challenger); returns the one it replaces."""
        with self._lock:
            old, self._challenger = self._challenger, engine
        return old

    def set_weight(self, weight: float) -> float:
        """Route `weight` (0..1) of the callers to the challenger (while there is one); returns the old weight."""
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"challenger weight {weight!r} is not in [0, 1]")
        with self._lock:
            old, self._weight = self._weight, float(weight)
        return old

    def promote(self) -> Engine | None:
        """The challenger becomes the champion (its loaded engine: no reload) and the weight 0, in one step;
        returns the old champion (to drain and close)."""
        with self._lock:
            if self._challenger is None:
                raise RuntimeError(f"{self.model_name}: no challenger to promote")
            old, self._champion, self._challenger, self._weight = self._champion, self._challenger, None, 0.0
        return old

    def get(self, model: str, key: str | None = None) -> Engine:
        """The engine for a request naming `model` from the caller `key` (None: no stickiness). KeyError: no such
        model here; EngineClosed: none loaded yet."""
        with self._lock:
            champion, challenger, weight = self._champion, self._challenger, self._weight
        name, pinned, version = model.partition("@")
        if name != self.model_name:
            raise KeyError(model)
        if champion is None:
            raise EngineClosed(f"{self.model_name}: no model version loaded yet")
        if pinned:
            for engine in (champion, challenger):
                if engine is not None and engine.version == version:
                    return engine
            raise KeyError(model)
        if challenger is not None and weight > 0.0:
            point = random.random() if key is None else sticky_point(key)
            if point < weight:
                return challenger
        return champion

    def serves(self, engine: Engine) -> bool:
        """Whether `engine` is still routed to (champion or challenger)."""
        with self._lock:
            return engine is self._champion or engine is self._challenger

    @property
    def current(self) -> Engine | None:
        """The champion."""
        with self._lock:
            return self._champion

    @property
    def challenger(self) -> Engine | None:
        with self._lock:
            return self._challenger

    @property
    def weight(self) -> float:
        with self._lock:
            return self._weight

    def engines(self) -> list[Engine]:
        """The loaded engines: champion first, then the challenger."""
        with self._lock:
            return [e for e in (self._champion, self._challenger) if e is not None]

    @property
    def ready(self) -> bool:
        return self.current is not None

    def served_models(self) -> list[str]:
        """The ids /v1/models lists: the name, then name@version of the champion and of the challenger."""
        return [self.model_name] + [f"{self.model_name}@{e.version}" for e in self.engines()]
