"""Promotion as a Prefect flow: metrics/gate.json → the registry (moeops.registry.promotion).

`python -m flows.promote --from-gate metrics/gate.json` is the one entry point CI calls. With
`rollout.canary: true` (the default) a passing gate registers the candidate as challenger and this
flow then runs the canary (flows/rollout.py) as a subflow; exit 0 promoted (or already champion),
1 rejected by the gate or rolled back by the canary, 3 canary inconclusive (the challenger left at
weight 0: no Prometheus or server to measure it with, too little traffic), 2 bad input. With
`rollout.canary: false` a passing gate promotes at once (exit 0). The pipeline flow runs the same
tasks after its gate stage. Either way the decision and the gate
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

from flows.rollout import EXIT, rollout
from moeops.cli import UserError
from moeops.registry.promotion import promote_from_gate

REPORT = Path("reports/gate.md")


def outcome(result: dict[str, Any]) -> str:
    name, champion = result["name"], result["champion"] or "none"
    if result["decision"] == "reject":
        return f"**{name}: rejected** — the champion stays {champion}."
    if result.get("challenger"):
        return (f"**{name}: challenger** — registered {result['version']} at weight {result['weight']:.0%} beside "
                f"champion {champion}; the canary decides.")
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
    """The gate's decision into the registry; the canary when it made a challenger (result["rollout"])."""
    root = Path(repo).resolve()
    result = promote_task(root / gate, root)
    return result | {"rollout": rollout(repo=str(root), challenger=result["challenger"])
                     if result.get("challenger") else None}


def exit_code(result: dict[str, Any]) -> int:
    """0 promoted (or nothing to do), 1 rejected by the gate or rolled back, 3 canary inconclusive."""
    if result["decision"] == "reject":
        return 1
    return EXIT[result["rollout"]["outcome"]] if result.get("rollout") else 0


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
    if result.get("rollout"):
        from flows.rollout import report

        report(result["rollout"])
    code = exit_code(result)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
