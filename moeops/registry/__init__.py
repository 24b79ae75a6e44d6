"""Filesystem model registry (issue 5 §2): versions, champion/challenger aliases, promote, rollback, audit log.
See store.py for the on-disk layout and gto.py for the optional GTO git-tag mirror."""

from moeops.registry.store import (
    champion,
    history,
    list_models,
    promote,
    register,
    register_challenger,
    register_champion,
    reject,
    resolve,
    rollback,
    set_challenger_weight,
    show,
    verify,
)

__all__ = ["champion", "history", "list_models", "promote", "register", "register_challenger", "register_champion",
           "reject", "resolve", "rollback", "set_challenger_weight", "show", "verify"]
