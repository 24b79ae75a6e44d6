"""The evaluation gate: the candidate against absolute budgets and against the registry's champion.

Quality is compared per document, not on one number: every val document is scored by both models
with the evaluation evaluate uses (moeops/evaluate/scoring.py: each document capped, strided windows;
each model with its own tokenizer, so bits-per-byte stays comparable if the tokenizer changed), and a
paired bootstrap over documents gives a one-sided upper confidence bound on the candidate's
relative bits-per-byte change. The candidate is rejected when that bound exceeds `max_regression`:
it must show, at the configured confidence, that it is not worse than the champion by more than
the margin (a non-inferiority test; an identical model passes with a zero-width interval).
"""

from __future__ import annotations

from typing import Any

from moeops.evaluate.bootstrap import paired_bootstrap, relative_change  # noqa: F401 (the gate's API)


def rule(name: str, value: float | None, threshold: float, detail: str) -> dict[str, Any]:
    """One gate rule: passes when value <= threshold; value None = not applicable (skipped)."""
    verdict = "skip" if value is None else "pass" if value <= threshold else "fail"
    return {"rule": name, "value": value, "threshold": threshold, "verdict": verdict, "detail": detail}


def decide(rules: list[dict[str, Any]]) -> tuple[str, list[str]]:
    failed = [f"{r['rule']}: {r['detail']}" for r in rules if r["verdict"] == "fail"]
    return ("reject" if failed else "promote"), failed


def markdown_report(gate: dict[str, Any]) -> str:
    """reports/gate.md: the decision, then one table row per rule."""
    mark = {"pass": "✅ pass", "fail": "❌ fail", "skip": "➖ skip"}
    champion = gate["champion"]
    against = f"champion **{champion['version']}**" if champion else "no champion yet (budgets only)"
    lines = [f"# Gate: **{gate['decision'].upper()}**", "",
             f"Candidate `{gate['candidate']['variant']}` ({gate['candidate']['path']}) vs {against}, "
             f"on {gate['candidate']['documents']} val documents ({gate['candidate']['bytes']:,} bytes).", "",
             "| rule | value | threshold | verdict | detail |", "| --- | --- | --- | --- | --- |"]
    for r in gate["rules"]:
        value = "—" if r["value"] is None else f"{r['value']:.6g}"
        detail = r["detail"].replace("|", "\\|")  # a pipe would end the table cell
        lines.append(f"| {r['rule']} | {value} | {r['threshold']:.6g} | {mark[r['verdict']]} | {detail} |")
    if gate["reasons"]:
        lines += ["", "## Why rejected", "", *[f"- {reason}" for reason in gate["reasons"]]]
    return "\n".join(lines) + "\n"
