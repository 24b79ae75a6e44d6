"""Promotion as a Prefect flow: metrics/gate.json → the registry (moeops.registry.promotion).

`python -m flows.promote --from-gate metrics/gate.json` is the one entry point CI calls (same
flags and exit codes as `moeops promote`: 0 promoted or already champion, 1 rejected, 2 bad input);
the pipeline flow runs the same task after its gate stage. Either way the decision and the gate
report are published as the `gate` markdown artifact of the flow run, so a reject's reasons are in
the Prefect UI. Two flow runs (or CI jobs, on any hosts sharing the registry) promoting candidates
judged against the same champion cannot both win: the registry checks the champion, commits and
moves the alias under one lock; the loser ends with the one-line "champion changed" error (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from moeops.cli import UserError
from moeops.registry.promotion import promote_from_gate

REPORT = Path("reports/gate.md")


def outcome(result: dict[str, Any]) -> str:
    name, champion = result["name"], result["champion"] or "none"
    if result["decision"] == "reject":
        return f"**{name}: rejected** — the champion stays {champion}."
    if result["registered"]:
        previous = result["previous"] or "none"
        return f"**{name}: promoted** — registered {result['version']}, now champion (previous: {previous})."
    return f"**{name}: promote** — {result['reasons'][0]}."


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(gate: Path, repo: Path) -> dict[str, Any]:
    """Act on the gate's decision; publish it with the gate report as the `gate` artifact."""
    result = promote_from_gate(gate, repo)
    report = repo / REPORT
    body = report.read_text() if report.is_file() else ""
    create_markdown_artifact(f"{outcome(result)}\n\n{body}", key="gate",
                             description=f"gate: {result['decision']} ({result['name']})")
    return result


@flow(name="promote")
def promote(gate: str = "metrics/gate.json", repo: str = ".") -> dict[str, Any]:
    root = Path(repo).resolve()
    return promote_task(root / gate, root)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.promote", description=__doc__.splitlines()[0])
    parser.add_argument("--from-gate", required=True, metavar="GATE_JSON", help="metrics/gate.json of the gate stage")
    parser.add_argument("--repo", default=".", help="the DVC repository (default: .)")
    args = parser.parse_args(argv)
    try:
        result = promote(gate=args.from_gate, repo=args.repo)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    out = sys.stderr if result["decision"] == "reject" else sys.stdout
    print(outcome(result).replace("**", ""), file=out)
    for reason in result["reasons"]:
        print(f"  {reason}", file=out)
    if result["decision"] == "reject":
        sys.exit(1)


if __name__ == "__main__":
    main()
