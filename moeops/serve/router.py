"""Which engine answers a request. One place decides it, so that the next step (a challenger taking a
weighted share of the traffic) changes this file and nothing in the routes. Torch-free.

A request names the model by its registry name ("moeops": whatever version serves it now) or pinned to
a version ("moeops@v3": only that version; unknown once another version serves).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from moeops.serve.engine import EngineClosed

if TYPE_CHECKING:
    from moeops.serve.engine import Engine


class Router:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self._lock = threading.Lock()  # set() runs on the loader / watcher threads, get() on the event loop
        self._engine: Engine | None = None

    def set(self, engine: Engine) -> Engine | None:
        """Make `engine` the one that answers from the next get(); returns the one it replaces."""
        with self._lock:
            old, self._engine = self._engine, engine
        return old

    def get(self, model: str) -> Engine:
        """The engine for a request naming `model`. KeyError: no such model here; EngineClosed: none loaded yet."""
        with self._lock:
            engine = self._engine
        name, pinned, version = model.partition("@")
        if name != self.model_name:
            raise KeyError(model)
        if engine is None:
            raise EngineClosed(f"{self.model_name}: no model version loaded yet")
        if pinned and version != engine.version:
            raise KeyError(model)
        return engine

    @property
    def current(self) -> Engine | None:
        with self._lock:
            return self._engine

    @property
    def ready(self) -> bool:
        return self.current is not None

    def served_models(self) -> list[str]:
        """The ids /v1/models lists: the name, and name@version of what serves it now."""
        engine = self.current
        return [self.model_name] + ([f"{self.model_name}@{engine.version}"] if engine is not None else [])
