"""The canary as a Prefect flow: the challenger takes a growing share of live traffic, is measured against the
champion in a real Prometheus after every step, and becomes champion or is rolled back (issue 12 §1-2).

  python -m flows.rollout [--repo .] [--challenger vN]     exit 0 promoted, 1 rolled back, 3 inconclusive, 2 bad input

Run by flows.promote after a passing gate (which registered the candidate as challenger at rollout.traffic_ratio),
or by hand. Steps (params `rollout.steps`, Argo Rollouts-style), after the initial traffic_ratio:

  set_weight: P   registry.set_challenger_weight(P / 100) (audited); then wait, bounded, until the server's
                  /version reports that weight for the challenger
  analyze: {interval_s, count}
                  the quality probe (moeops.rollout.probe) scores held-out documents through both versions and
                  pushes its bound; then one AnalysisRun (moeops.rollout.analysis): a measurement of every metric
                  each interval_s over the last interval_s
  promote: true   registry.promote(challenger): the server's watcher makes it champion; the old champion stays
                  the rollback target. Reached after the last step too.

A Failed analysis: at once weight 0 and the challenger rejected (registry.reject, one alias write; the audit line
names the failed metric, its values and the thresholds); the champion keeps serving. An Inconclusive one (too few
requests, no data, the probe could not run), a server that does not apply a weight, or a Prometheus / server not
reachable at all: the challenger is left registered at weight 0, neither promoted nor rejected (exit 3), so that low
traffic or a laptop without a server never promotes. Every step and each analysis's measurements are Prefect
artifacts (markdown per step, a table per analysis, the `rollout` summary naming the failed metric).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from moeops.cli import UserError
from moeops.config import load_section
from moeops.registry.promotion import registry_location
from moeops.rollout.analysis import AnalysisRun, Thresholds, run_analysis

EXIT = {"promoted": 0, "rolled_back": 1, "inconclusive": 3}
WEIGHT_TIMEOUT_S = 60.0  # a set_weight waits at most this long for the server to report it (load + warm-up)
PREPARED = Path("data/prepared")


@dataclass
class Canary:
    """What one rollout works on (resolved once, at the start)."""

    repo: Path
    root: Path
    name: str
    gto: bool
    challenger: str
    stable: str
    rollout: Any  # RolloutParams
    gate: Any  # GateParams


def get_json(url: str, timeout_s: float = 5.0) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return json.loads(r.read())


def unreachable(c: Canary) -> str | None:
    """Why the canary cannot be measured at all (Prometheus or the server down), else None."""
    for what, url in (("Prometheus", c.rollout.prometheus_url.rstrip("/") + "/-/ready"),
                      ("the server", c.rollout.server_url.rstrip("/") + "/version")):
        try:
            get_json(url) if what == "the server" else urllib.request.urlopen(url, timeout=5).close()
        except (OSError, ValueError) as e:
            return f"{what} is unreachable at {url} ({getattr(e, 'reason', None) or e})"
    return None


def served_weight(info: dict[str, Any], challenger: str) -> float | None:
    """The share the server routes to `challenger` by its /version answer ({"challenger": "v4",
    "challenger_weight": 0.1}): 0.0 when it serves no challenger, None when it serves another one."""
    version = info.get("challenger")
    if version is None:
        return 0.0
    return float(info.get("challenger_weight") or 0.0) if version == challenger else None


def wait_for_weight(server_url: str, challenger: str, weight: float, timeout_s: float) -> float:
    """Poll /version until the server routes `weight` to `challenger`; seconds it took. UserError past the bound."""
    t0 = time.monotonic()
    seen: Any = None
    while True:
        try:
            seen = served_weight(get_json(server_url.rstrip("/") + "/version"), challenger)
        except (OSError, ValueError) as e:
            seen = f"unreachable ({getattr(e, 'reason', None) or e})"
        if isinstance(seen, float) and abs(seen - weight) < 1e-9:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise UserError(f"{server_url}/version: the server did not apply challenger {challenger} weight "
                            f"{weight:g} within {timeout_s:g} s (it reports {seen})")
        time.sleep(0.1)


def aliases(c: Canary) -> dict[str, Any]:
    from moeops.registry import list_models

    return next((m for m in list_models(c.root) if m["name"] == c.name), {"champion": None, "challenger": None})


@task(name="set-weight", cache_policy=NO_CACHE)
def set_weight(c: Canary, weight: float, reason: str) -> float:
    """Route `weight` of the requests to the challenger (registry, audited); wait for the server to apply it."""
    from moeops.registry import set_challenger_weight

    set_challenger_weight(c.root, c.name, weight, reason)
    took = wait_for_weight(c.rollout.server_url, c.challenger, weight, WEIGHT_TIMEOUT_S)
    create_markdown_artifact(f"**{c.name} {c.challenger}: weight {weight:.0%}** (server applied it in {took:.1f} s)"
                             f" — {reason}", description=f"rollout step: set_weight {weight:.0%}")
    return took


@task(name="analyze", cache_policy=NO_CACHE)
def analyze(c: Canary, index: int, interval_s: float, count: int) -> dict[str, Any]:
    """The quality probe, then one AnalysisRun; a table artifact of every measurement."""
    from moeops.rollout import probe

    log = get_run_logger()
    t = Thresholds(c.rollout.max_error_rate, c.rollout.max_latency_ratio, c.rollout.min_requests,
                   c.gate.max_regression)
    run = AnalysisRun(t, count, c.rollout.failure_limit, c.rollout.consecutive_error_limit)
    probe_note = ""
    try:
        texts = probe.probe_texts(c.repo / PREPARED, c.rollout.probe_documents, c.rollout.probe_max_tokens)
        q = probe.run(c.rollout.server_url, c.rollout.pushgateway_url, c.name, c.challenger, c.stable, texts,
                      c.gate.confidence, c.gate.bootstrap_samples, c.gate.seed)
        probe_note = (f"quality probe: bits/byte {q['canary_bits_per_byte']:.4f} vs {q['stable_bits_per_byte']:.4f} "
                      f"over {q['documents']} documents, upper bound {q['upper_bound']:+.2%}")
    except UserError as e:  # nothing pushed: the quality metric stays empty, so the analysis is inconclusive
        probe_note = f"quality probe could not run: {e}"
    log.info(probe_note)

    def logged(r: AnalysisRun) -> None:
        m = r.measurements[-1]
        log.info("analysis %d measurement %d: %s", index, len(r.measurements),
                 ", ".join(f"{k}={v if not isinstance(v, float) else round(v, 4)} {m['phases'][k]}"
                           for k, v in m["values"].items()))

    run_analysis(run, c.rollout.prometheus_url, c.challenger, c.stable, interval_s, on_measurement=logged)
    create_table_artifact(run.rows(), key="rollout-analysis",
                          description=f"analysis {index} of {c.challenger} vs {c.stable}: {run.phase} — "
                                      f"{run.message}; {probe_note}")
    return {"phase": run.phase, "message": run.message, "probe": probe_note, "measurements": len(run.measurements)}


def finish(c: Canary, outcome: str, reason: str, steps: list[str], server_up: bool = True) -> dict[str, Any]:
    """The registry action of the outcome, the `rollout` summary artifact, the result (with how long the server
    took to stop routing to a failed challenger, unless `server_up` is False: it was not answering)."""
    from moeops.registry import promote, reject, set_challenger_weight

    t0 = time.monotonic()
    if outcome == "rolled_back":
        reject(c.root, c.name, c.challenger, f"canary failed: {reason}")
    elif outcome == "inconclusive":
        if aliases(c)["challenger"] == c.challenger:
            set_challenger_weight(c.root, c.name, 0.0, f"canary inconclusive: {reason}")
    else:
        promote(c.root, c.name, c.challenger, f"canary passed: {reason}", gto_repo=c.repo if c.gto else None)
    applied = None
    if outcome != "promoted" and server_up:
        try:  # how long until the server stopped routing to the challenger (a bound, not a promise)
            applied = wait_for_weight(c.rollout.server_url, c.challenger, 0.0, WEIGHT_TIMEOUT_S) + \
                (time.monotonic() - t0)
        except UserError as e:
            get_run_logger().warning(str(e))
    head = {"promoted": f"**{c.name}: {c.challenger} promoted** — champion now (was {c.stable}, the rollback target)",
            "rolled_back": f"**{c.name}: {c.challenger} rolled back** — weight 0, rejected; {c.stable} stays champion",
            "inconclusive": f"**{c.name}: {c.challenger} inconclusive** — weight 0, neither promoted nor rejected; "
                            f"{c.stable} stays champion"}[outcome]
    body = "\n".join(f"{i}. {s}" for i, s in enumerate(steps, 1))
    create_markdown_artifact(f"{head}\n\n{reason}\n\n{body}\n", key="rollout",
                             description=f"rollout of {c.name} {c.challenger}: {outcome}")
    return {"outcome": outcome, "reason": reason, "name": c.name, "challenger": c.challenger, "stable": c.stable,
            "steps": steps, "weight_zero_s": applied}


def resolve(repo: Path, challenger: str | None) -> Canary:
    from moeops.registry import list_models
    from moeops.registry.store import check_version

    repo = repo.resolve()
    ro, gate = load_section("rollout", repo / "params.yaml"), load_section("gate", repo / "params.yaml")
    root, name, gto = registry_location(repo)
    model = next((m for m in list_models(root) if m["name"] == name), None)
    if model is None:
        raise UserError(f"{root}: no model {name!r} in the registry")
    current = model["challenger"]
    if challenger is not None and check_version(challenger) != current:
        raise UserError(f"{name} {challenger}: not the challenger (the challenger is {current or 'none'})")
    if current is None:
        raise UserError(f"{name}: no challenger to roll out (a passing gate registers one)")
    if model["champion"] is None:
        raise UserError(f"{name}: no champion to compare the challenger {current} with")
    return Canary(repo, root, name, gto, current, model["champion"], ro, gate)


@flow(name="rollout")
def rollout(repo: str = ".", challenger: str | None = None) -> dict[str, Any]:
    """Walk rollout.steps for the registry's challenger; returns {outcome, reason, steps, ...}."""
    c = resolve(Path(repo), challenger)
    log = get_run_logger()
    steps: list[str] = []
    why = unreachable(c)
    if why is not None:
        log.warning("rollout inconclusive: %s", why)
        return finish(c, "inconclusive", why, steps, server_up=False)
    weight = c.rollout.traffic_ratio
    plan = [("set_weight", weight)]  # traffic_ratio first, then the steps (set_weight in percent)
    for step in c.rollout.steps:
        plan += [(k, v / 100 if k == "set_weight" else v) for k, v in step.model_dump(exclude_none=True).items()]
    analyses = 0
    for kind, arg in plan:
        if kind == "set_weight":
            weight = arg
            try:
                took = set_weight(c, weight, f"canary step {len(steps) + 1}: weight {weight:g}")
            except UserError as e:
                return finish(c, "inconclusive", str(e), steps, server_up=False)
            steps.append(f"set_weight {weight:.0%}: applied by the server in {took:.1f} s")
        elif kind == "analyze":
            analyses += 1
            if weight == 0:
                return finish(c, "inconclusive", "an analysis at weight 0 measures nothing", steps)
            a = analyze(c, analyses, arg["interval_s"], arg["count"])
            steps.append(f"analysis {analyses} at {weight:.0%} ({a['measurements']} measurements of "
                         f"{arg['interval_s']:g} s): {a['phase']} — {a['message']}; {a['probe']}")
            if a["phase"] == "Failed":
                return finish(c, "rolled_back", f"analysis {analyses} failed: {a['message']}", steps)
            if a["phase"] != "Successful":
                return finish(c, "inconclusive", f"analysis {analyses} inconclusive: {a['message']}", steps)
        else:
            break  # promote: true
    if aliases(c)["champion"] != c.stable:
        return finish(c, "inconclusive", f"the champion changed during the canary (was {c.stable}, now "
                                         f"{aliases(c)['champion']}); not promoting over it", steps)
    steps.append("promote")
    return finish(c, "promoted", f"{analyses} analyses passed", steps)


def report(result: dict[str, Any]) -> int:
    """One line (stdout for a promotion, stderr otherwise); the exit code."""
    line = {"promoted": f"{result['name']}: canary passed, {result['challenger']} is champion",
            "rolled_back": f"{result['name']}: canary FAILED, {result['challenger']} rolled back",
            "inconclusive": f"{result['name']}: canary inconclusive, {result['challenger']} left at weight 0",
            }[result["outcome"]] + f" ({result['reason']})"
    print(line, file=sys.stdout if result["outcome"] == "promoted" else sys.stderr)
    return EXIT[result["outcome"]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.rollout", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=".", help="the DVC repository whose params.yaml has rollout: (default: .)")
    parser.add_argument("--challenger", default=None, help="vN: refuse unless it is the registry's challenger")
    args = parser.parse_args(argv)
    try:
        resolve(Path(args.repo), args.challenger)  # bad input: one line before a flow run starts
        result = rollout(repo=args.repo, challenger=args.challenger)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    sys.exit(report(result))


if __name__ == "__main__":
    main()
