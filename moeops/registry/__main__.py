"""python -m moeops.registry [--root DIR] list | show | promote | rollback | weight | reject | history | verify
(also `python -m moeops registry ...`). --root defaults to $MOEOPS_REGISTRY, else params.yaml's registry.root
when run in a project, else ./registry."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from moeops.cli import run_main
from moeops.registry import store
from moeops.registry.promotion import registry_location


def default_root() -> Path:
    if os.environ.get("MOEOPS_REGISTRY") or not Path("params.yaml").is_file():
        return Path(os.environ.get("MOEOPS_REGISTRY") or "registry")
    return registry_location(Path("."))[0]


def main(argv: list[str] | None = None, prog: str = "python -m moeops.registry") -> None:
    p = argparse.ArgumentParser(prog=prog, description="Model registry: versions, aliases, promote, rollback, audit.")
    p.add_argument("--root", default=None,
                   help="default: $MOEOPS_REGISTRY, else params.yaml's registry.root, else ./registry")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="models, versions and aliases")
    s = sub.add_parser("show", help="a version's manifest (files verified)")
    s.add_argument("name")
    s.add_argument("version", nargs="?", default="champion", help="vN, champion or challenger (default: champion)")
    for cmd in ("promote", "rollback"):
        what = "make VERSION the champion" if cmd == "promote" else "restore the previous champion"
        s = sub.add_parser(cmd, help=what)
        s.add_argument("name")
        if cmd == "promote":
            s.add_argument("version")
        s.add_argument("--reason", required=True, help="why (goes into the audit log)")
        s.add_argument("--gto-repo", help="also write GTO tags (name@vN.0.0, name#prod#K) in this git repository")
    s = sub.add_parser("weight", help="route a share of the requests to the challenger (canary)")
    s.add_argument("name")
    s.add_argument("weight", type=float, help="0..1")
    s.add_argument("--reason", required=True, help="why (goes into the audit log)")
    s = sub.add_parser("reject", help="drop the challenger VERSION (weight 0); the champion is untouched")
    s.add_argument("name")
    s.add_argument("version")
    s.add_argument("--reason", required=True, help="why (goes into the audit log)")
    s = sub.add_parser("history", help="the audit log of a model")
    s.add_argument("name")
    s = sub.add_parser("verify", help="check one version or all: every file against the manifest's sha256 and "
                                      "the producing stage's recorded ones (lineage.export_checksums)")
    s.add_argument("name")
    s.add_argument("version", nargs="?")
    a = p.parse_args(argv)
    a.root = a.root or default_root()

    if a.cmd == "list":
        for m in store.list_models(a.root):
            print(f"{m['name']}: champion={m['champion'] or '-'} challenger={m['challenger'] or '-'} "
                  f"weight={m['challenger_weight']:g} previous={','.join(m['previous']) or '-'} "
                  f"versions={','.join(m['versions']) or '-'}")
    elif a.cmd == "show":
        print(json.dumps(store.show(a.root, a.name, a.version), indent=2, sort_keys=True))
    elif a.cmd == "promote":
        store.promote(a.root, a.name, a.version, a.reason, gto_repo=a.gto_repo)
        print(f"{a.name}: champion -> {a.version}")
    elif a.cmd == "rollback":
        print(f"{a.name}: champion -> {store.rollback(a.root, a.name, a.reason, gto_repo=a.gto_repo)}")
    elif a.cmd == "weight":
        version = store.set_challenger_weight(a.root, a.name, a.weight, a.reason)
        print(f"{a.name}: challenger {version} weight -> {a.weight:g}")
    elif a.cmd == "reject":
        store.reject(a.root, a.name, a.version, a.reason)
        print(f"{a.name}: challenger {a.version} rejected")
    elif a.cmd == "history":
        for e in store.history(a.root, a.name):
            print(json.dumps(e, sort_keys=True))
    elif a.cmd == "verify":
        print(f"{a.name}: ok ({', '.join(store.verify(a.root, a.name, a.version))})")


if __name__ == "__main__":
    run_main(main)
