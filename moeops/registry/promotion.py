"""Act on the gate: `moeops promote --from-gate metrics/gate.json` (also `python -m flows.promote`).

promote: register the run's artifacts as a new version (ONNX variants, HF export, tokenizer, eval
metrics, gate report, lineage). With `rollout.canary: true` (the default) and a champion to compare
with, the new version becomes the **challenger** taking `rollout.traffic_ratio` of the requests, and
only a passing canary (flows/rollout.py, which `python -m flows.promote` runs next) makes it champion.
With `rollout.canary: false`, or no champion yet, it becomes the champion at once, the old champion
staying the rollback target; GTO tags too when `registry.gto_tags` is auto and the repository is a
git repository. reject: the registry is untouched. Exit 0 = promoted, registered as challenger (or
already champion), 1 = rejected, 2 = bad input. The gate.json must describe the artifacts on disk
(every input's sha256) and the champion it was compared with must still be the champion; otherwise
nothing is registered.

Chain of custody: every registered model directory (exports/onnx/*, exports/hf) must carry a
lineage.json whose `checksums` its files match; the bytes copied into the registry must equal both
what the gate judged (gate.json lineage.inputs) and what the producing stage recorded, and the
version's manifest keeps the latter as lineage.export_checksums, which `moeops registry verify` (and
every resolve) checks again. The champion check, the registration and the alias move happen under
one registry lock (store.register_champion), so of two promotions judged against the same champion
only the first wins; a challenger's registration checks the champion under that lock the same way
(store.register_challenger).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from moeops.cli import UserError, run_main
from moeops.config import load_section
from moeops.io import sha256_file
from moeops.lineage import git_commit

DECISIONS = ("promote", "reject")
# model directories: each carries a lineage.json with the sha256 of its files
MODEL_DIRS = ("onnx/fp32", "onnx/int8", "onnx/int4", "hf")
# registered path -> path in the repository
ARTIFACTS = {"onnx/fp32": "exports/onnx/fp32", "onnx/int8": "exports/onnx/int8", "onnx/int4": "exports/onnx/int4",
             "hf": "exports/hf", "tokenizer.json": "data/prepared/tokenizer.json",
             "metrics/eval.json": "metrics/eval.json", "metrics/export.json": "metrics/export.json",
             "reports/gate.md": "reports/gate.md", "params.yaml": "params.yaml", "dvc.lock": "dvc.lock"}


def registry_location(repo: Path) -> tuple[Path, str, bool]:
    """(root, name, write GTO tags) from the repository's params.yaml `registry` section;
    $MOEOPS_REGISTRY overrides the root (CI points it at persistent storage). A relative root is
    relative to the repository."""
    reg = load_section("registry", repo / "params.yaml")
    root = Path(os.environ.get("MOEOPS_REGISTRY") or reg.root)
    return (root if root.is_absolute() else repo / root), reg.name, reg.gto_tags == "auto"


def read_gate(path: Path) -> dict[str, Any]:
    try:
        gate = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; run the gate stage (dvc repro) first") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(gate, dict) or gate.get("decision") not in DECISIONS:
        raise UserError(f"{path}: decision: expected one of {list(DECISIONS)}")
    lineage = gate.get("lineage")
    inputs = lineage.get("inputs") if isinstance(lineage, dict) else None
    if not isinstance(inputs, dict) or not inputs:
        raise UserError(f"{path}: lineage.inputs: missing; the file was not written by the gate stage")
    if not isinstance(gate.get("candidate"), dict) or "variant" not in gate["candidate"]:
        raise UserError(f"{path}: candidate.variant: missing")
    return gate


def check_inputs(gate: dict[str, Any], gate_path: Path, repo: Path) -> None:
    """The gate judged exactly the files on disk, or nothing is registered."""
    for rel, recorded in sorted(gate["lineage"]["inputs"].items()):
        path = repo / rel
        if not path.is_file():
            raise UserError(f"{gate_path}: lineage mismatch: {rel} is missing (the candidate the gate judged is gone)")
        if sha256_file(path) != recorded:
            raise UserError(f"{gate_path}: lineage mismatch: {rel} changed since the gate ran; re-run `dvc repro`")


def check_champion(gate: dict[str, Any], gate_path: Path, current_champion: str | None) -> None:
    """The gate compared against the champion that is still the champion."""
    judged = gate["lineage"].get("champion")
    if judged != current_champion:
        raise champion_changed(gate_path, judged, current_champion)


def champion_changed(gate_path: Path, judged: str | None, current: str | None) -> UserError:
    return UserError(f"{gate_path}: champion changed: the gate compared against champion {judged or 'none'}, "
                     f"the registry's champion is now {current or 'none'}; re-run the gate stage")


def registered_relpath(rel: str) -> str | None:
    """Where a repository file lands in the version (None: not registered)."""
    for dst, src in ARTIFACTS.items():
        if rel == src or rel.startswith(src + "/"):
            return dst + rel[len(src):]
    return None


def export_checksums(repo: Path) -> tuple[dict[str, str], dict[str, str]]:
    """({registered relpath: sha256 its producing stage recorded}, {registered lineage.json: sha256 of the bytes
    read}) for every model directory, after verify_checksums has checked the directory. The second pins the
    lineage.json files, so the recorded hashes are those of the lineage.json that gets registered."""
    from moeops.lineage import verify_checksums

    recorded, pinned = {}, {}
    for dst in MODEL_DIRS:
        model_dir = repo / ARTIFACTS[dst]
        verify_checksums(model_dir)  # no lineage.json, or a file that fails it: one line, exit 2
        path = model_dir / "lineage.json"
        try:
            raw = path.read_bytes()
            checksums = json.loads(raw)["checksums"]
            recorded.update({f"{dst}/{name}": str(sha) for name, sha in checksums.items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{path}: unreadable or without checksums ({type(e).__name__})") from None
        pinned[f"{dst}/lineage.json"] = hashlib.sha256(raw).hexdigest()
    return recorded, pinned


def version_lineage(repo: Path, gate: dict[str, Any]) -> dict[str, Any]:
    meta_path, lock = repo / "data/prepared/meta.json", repo / "dvc.lock"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return {
        "git_commit": git_commit(repo),
        "dvc_lock_sha256": sha256_file(lock) if lock.is_file() else None,
        "data_sha256": sha256_file(meta_path) if meta_path.is_file() else None,  # the prepared data's meta.json
        "source_manifest_sha256": meta.get("source_manifest_sha256"),
        "params": yaml.safe_load((repo / "params.yaml").read_text()),
        "gate": {"decision": gate["decision"], "champion": gate["lineage"].get("champion"),
                 "inputs": gate["lineage"]["inputs"]},
    }


def same_model(champion_manifest: dict[str, Any], gate: dict[str, Any], files: dict[str, Path]) -> bool:
    """The champion was promoted as the same variant as the gate's candidate, with the same files
    (the manifest's verified sha256 against the candidate's)."""
    variant = gate["candidate"]["variant"]
    prefix = "onnx/" + variant.removeprefix("onnx_")
    if champion_manifest.get("metrics", {}).get("candidate") != variant or not files[prefix].is_dir():
        return False
    registered = {rel.removeprefix(prefix + "/"): meta["sha256"]
                  for rel, meta in champion_manifest["files"].items() if rel.startswith(prefix + "/")}
    current = {f.relative_to(files[prefix]).as_posix(): sha256_file(f)
               for f in files[prefix].rglob("*") if f.is_file()}
    return registered == current


def promote_from_gate(gate_path: Path, repo: Path = Path(".")) -> dict[str, Any]:
    """Register on a `promote` decision (as challenger for a canary, else as champion), nothing on `reject`.
    Returns what happened: {decision, champion, previous, version, challenger, weight, reasons, registered}."""
    from moeops.registry import champion, register_challenger, register_champion, show
    from moeops.registry.store import EXPORT_CHECKSUMS, ChampionChanged

    repo = repo.resolve()
    gate_path = gate_path if gate_path.is_absolute() else repo / gate_path
    root, name, gto = registry_location(repo)
    gate = read_gate(gate_path)
    current = champion(root, name)
    check_inputs(gate, gate_path, repo)
    rollout = load_section("rollout", repo / "params.yaml")
    out = {"decision": gate["decision"], "reasons": gate.get("reasons", []), "name": name, "registry": str(root),
           "previous": current, "champion": current, "version": None, "registered": False, "challenger": None,
           "weight": 0.0}
    files = {dst: repo / src for dst, src in ARTIFACTS.items()}
    if gate["decision"] == "promote" and current and same_model(show(root, name, current), gate, files):
        return out | {"version": current, "reasons": [f"{name} {current} is this model already: nothing to do"]}
    check_champion(gate, gate_path, current)
    if gate["decision"] == "reject":
        return out
    for dst, src in files.items():
        if not src.exists():
            raise UserError(f"{src}: missing (registered as {dst}); run `dvc repro` first")
    recorded, pinned = export_checksums(repo)
    judged = {dst: sha for rel, sha in gate["lineage"]["inputs"].items() if (dst := registered_relpath(rel))}
    files["metrics/gate.json"] = gate_path
    metrics = {"bits_per_byte": gate["candidate"].get("bits_per_byte"), "candidate": gate["candidate"]["variant"]}
    reason = f"gate promote vs {current or 'no champion'}"
    lineage = version_lineage(repo, gate) | {EXPORT_CHECKSUMS: recorded}
    expected = {f"{gate_path.name} lineage.inputs (what the gate judged)": judged,
                "the lineage.json checked before the copy": pinned}
    canary = rollout.canary and current is not None  # no champion: nothing to compare a canary with
    try:  # copies and hashes, then under one lock: champion still `current`, commit, champion/challenger alias
        if canary:
            version = register_challenger(root, name, files, lineage, metrics, f"{reason}; canary",
                                          judged_against=current, weight=rollout.traffic_ratio, expected=expected)
        else:
            version = register_champion(root, name, files, lineage, metrics, reason, judged_against=current,
                                        expected=expected, gto_repo=repo if gto else None)
    except ChampionChanged as e:
        raise champion_changed(gate_path, e.expected, e.current) from None
    if canary:
        return out | {"challenger": version, "version": version, "registered": True, "weight": rollout.traffic_ratio}
    return out | {"champion": version, "version": version, "registered": True}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="moeops promote", description=__doc__.splitlines()[0])
    parser.add_argument("--from-gate", required=True, type=Path, metavar="GATE_JSON",
                        help="metrics/gate.json written by the gate stage")
    parser.add_argument("--repo", type=Path, default=Path("."), help="the DVC repository (default: .)")
    args = parser.parse_args(argv)
    result = promote_from_gate(args.from_gate, args.repo)
    name = result["name"]
    if result["decision"] == "reject":
        print(f"{name}: REJECTED by the gate; champion stays {result['champion'] or 'none'}", file=sys.stderr)
        for reason in result["reasons"]:
            print(f"  {reason}", file=sys.stderr)
        sys.exit(1)
    if result["challenger"]:
        print(f"{name}: registered {result['version']} as challenger at weight {result['weight']:g} beside champion "
              f"{result['champion']} in {result['registry']}; the canary (python -m flows.rollout) decides")
    elif result["registered"]:
        print(f"{name}: registered {result['version']} and promoted it to champion "
              f"(previous: {result['previous'] or 'none'}) in {result['registry']}")
    else:
        print(f"{name}: {result['reasons'][0]}")


if __name__ == "__main__":
    run_main(main)
