"""The DVC pipeline as a Prefect flow: one task per dvc.yaml stage, in order, then the eval metrics
and, when the gate stage ran, promotion (flows.promote).

DVC owns the DAG and the caching; this flow adds retries, a per-stage timeout, run history and
logs in the Prefect UI, a table artifact of metrics/eval.json and a markdown artifact of the gate's
decision, then the canary when the gate made a challenger (flows.rollout; it ends inconclusive at
once, the challenger left at weight 0, where no Prometheus or server runs). `python -m flows.pipeline`
runs it on Prefect's ephemeral API (no server needed); flows.retrain serves it on a schedule.

Why each stage runs in its own process group: Prefect only signals the flow process on a cancel,
so child processes are orphaned (PrefectHQ/prefect#20979, #17593), and a sync task's timeout
cannot interrupt the thread that runs it (#15760). So `run_stage` starts `dvc repro` in a new
session, times it out itself with `Popen.wait(timeout)`, and a `finally` kills the whole group
(SIGTERM, then SIGKILL after a grace period). A SIGTERM to the flow process reaches that
`finally` because Prefect's flow engine turns SIGTERM into a `TerminationSignal` exception in
the main thread, where sync tasks of a sync flow run; Ctrl-C arrives as KeyboardInterrupt.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import io
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO, Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from moeops.cli import UserError
from moeops.config import load_section
from moeops.io import read_json_object

KILL_GRACE_S = 10.0  # between SIGTERM and SIGKILL of a stage's process group
TAIL_LINES = 200  # output lines kept to explain a failure
PROGRESS_EVERY_S = 30.0  # log a progress bar (a line ended by a bare \r) at most this often
ERROR_LINES = 5  # at most this many error lines in a failure message
GATE_STAGE, GATE = "gate", Path("metrics/gate.json")


class StageFailed(RuntimeError):
    """A stage exited non-zero; the message names the stage, its exit code and its own error lines."""


class StageTimeout(StageFailed):
    """A stage ran past `flow.stage_timeout_s`; its process group was killed."""


# ---------------------------------------------------------------- the stage task


def _dvc() -> list[str]:
    """The dvc of this interpreter's environment, not whatever `dvc` is first on PATH."""
    exe = Path(sys.executable).parent / "dvc"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dvc"]


def _stage_env() -> dict[str, str]:
    # Stage commands say `python -m stages.x`: make that this environment's python, and make its
    # output arrive line by line instead of in 8 KiB blocks.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "PYTHONUNBUFFERED": "1"}


def _kill_group(proc: subprocess.Popen, grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM the process group led by `proc`, then SIGKILL whatever is left after `grace_s`.

    A no-op once the group is empty, so it is also safe after a normal exit (it then only
    reaps stragglers a stage left behind)."""
    pgid = proc.pid  # start_new_session=True: the leader's pid is the group id
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader: a zombie still counts as a group member
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    proc.wait()


def _pump(stream: IO[str], logger: logging.Logger | logging.LoggerAdapter, tail: deque[str]) -> None:
    """Log the stage's output line by line (runs in a thread) and keep the last lines.

    `stream` keeps line endings (newline=""): a line ended by a bare \r is a progress bar that the
    next one overwrites (tqdm), logged only every PROGRESS_EVERY_S instead of once per update."""
    last_progress = -PROGRESS_EVERY_S
    for raw in stream:
        line = raw.rstrip()
        if not line:
            continue
        if raw.endswith("\r"):
            if time.monotonic() - last_progress < PROGRESS_EVERY_S:
                continue
            last_progress = time.monotonic()
        else:
            tail.append(line)
        logger.info(line)


def _failure_message(stage: str, returncode: int, lines: list[str]) -> str:
    """The stage's own `error: ...` lines (see moeops.cli.run_main), else its last line of output
    (a traceback's exception) and DVC's error line."""
    ours = [l for l in lines if l.startswith("error:")]
    # DVC's line may follow an unfinished progress bar on the same line.
    dvc = [l[l.index("ERROR: "):] for l in lines if "ERROR: " in l]
    other = [l for l in lines if "ERROR: " not in l and not l.startswith(("Running stage '", "> "))]
    reasons = ours[-ERROR_LINES:] or other[-1:] + dvc[-1:]
    # dvc exits 255 for any failed stage; the stage's own exit code is in DVC's line.
    codes = re.findall(r"exited with (-?\d+)", " ".join(dvc))
    code = int(codes[-1]) if codes else returncode
    return f"stage {stage!r} failed with exit code {code}: " + " | ".join(reasons or ["(no output)"])


@task(name="run_stage", task_run_name="{stage}", cache_policy=NO_CACHE)
def run_stage(stage: str, repo: Path, timeout_s: float) -> None:
    """`dvc repro --single-item <stage>` in its own process group, logging its output.

    --single-item: the flow already runs the stages in order, so each task does exactly one
    stage's work (and an always_changed upstream stage does not run again for every stage)."""
    try:
        logger: logging.Logger | logging.LoggerAdapter = get_run_logger()
    except MissingContextError:  # called as run_stage.fn(...)
        logger = logging.getLogger(__name__)
    cmd = [*_dvc(), "repro", "--single-item", stage]
    logger.info("%s (timeout %g s)", " ".join(cmd), timeout_s)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(cmd, cwd=repo, env=_stage_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    stream = io.TextIOWrapper(proc.stdout, encoding="utf-8", errors="replace", newline="")
    # The reader logs in the run's context (its Prefect settings and run ids), not a bare thread's.
    reader = threading.Thread(target=contextvars.copy_context().run, args=(_pump, stream, logger, tail), daemon=True)
    reader.start()
    try:
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise StageTimeout(f"stage {stage!r} timed out after {timeout_s:g} s (flow.stage_timeout_s); "
                               "killed its process group") from None
    finally:  # also on a timeout, KeyboardInterrupt, or Prefect's TerminationSignal (SIGTERM, cancel)
        _kill_group(proc)
        reader.join(timeout=5)
    if returncode != 0:
        raise StageFailed(_failure_message(stage, returncode, list(tail)))


# ---------------------------------------------------------------- metrics


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_metrics(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, {} when there is no such file."""
    return read_json_object(path) or {}


@task(name="publish_metrics", cache_policy=NO_CACHE)
def publish_metrics(path: Path) -> dict[str, Any]:
    """Publish metrics/eval.json as the `eval-metrics` table artifact; return it as read."""
    metrics = read_metrics(path)
    if metrics:
        rows = [{"metric": k, "value": v} for k, v in flatten(metrics).items()]
        create_table_artifact(rows, key="eval-metrics", description=f"Evaluation metrics from `{path.name}`")
    else:
        get_run_logger().warning("%s: no metrics to publish", path)
    return metrics


# ---------------------------------------------------------------- the flow


def stage_names(repo: Path) -> list[str]:
    """The stages of `repo/dvc.yaml`, in the order written."""
    path = repo / "dvc.yaml"
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: cannot read ({str(e).splitlines()[0]})") from None
    stages = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(stages, dict) or not stages:
        raise UserError(f"{path}: no stages")
    return list(stages)


def select_stages(repo: Path, stages: list[str] | None) -> list[str]:
    known = stage_names(repo)
    for stage in stages or []:
        if stage not in known:
            raise UserError(f"{repo / 'dvc.yaml'}: {stage}: unknown stage, expected one of {known}")
    return list(stages) if stages else known


@flow(name="pipeline")
def pipeline(repo: str = ".", stages: list[str] | None = None, promote: bool = True) -> dict[str, Any]:
    """Run the DVC stages of `repo` in order (all of dvc.yaml by default; a given list runs as
    listed, each stage alone), publish metrics/eval.json, then act on the gate's decision when the
    gate stage ran and `promote` is on. Returns {"eval": metrics, "promotion": result or None}."""
    from flows.promote import promote_task
    from flows.rollout import rollout

    root = Path(repo).resolve()
    params = load_section("flow", root / "params.yaml")
    todo = select_stages(root, stages)
    stage_task = run_stage.with_options(retries=params.retries, retry_delay_seconds=params.retry_delay_s)
    for stage in todo:
        stage_task(stage, root, params.stage_timeout_s)
    metrics = publish_metrics(root / "metrics" / "eval.json")
    promotion = promote_task(root / GATE, root) if promote and GATE_STAGE in todo else None
    if promotion and promotion.get("challenger"):  # the canary (inconclusive at once without a server to measure)
        promotion["rollout"] = rollout(repo=str(root), challenger=promotion["challenger"])
    return {"eval": metrics, "promotion": promotion}


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("stages", nargs="*", help="stages to run, in this order (default: all of dvc.yaml)")
    parser.add_argument("--repo", default=".", help="the DVC repository (default: the current directory)")
    parser.add_argument("--no-promote", action="store_true", help="do not act on the gate's decision")
    args = parser.parse_args(argv)
    repo, stages = Path(args.repo), args.stages or None
    try:
        # Bad params or stage names: one line before any flow run starts, not a failed run.
        load_section("flow", repo / "params.yaml")
        select_stages(repo, stages)
        result = pipeline(repo=str(repo), stages=stages, promote=not args.no_promote)
    except (UserError, StageFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code if isinstance(e, UserError) else 1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    for key, value in flatten(result).items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    # SIGTERM (a plain `kill`) unwinds like Ctrl-C instead of ending the process on the spot, so the
    # `finally` that kills a stage's process group and atexit (which stops Prefect's ephemeral API
    # server) both run. During a flow run Prefect's SIGTERM handler comes first, then re-sends it here.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    main()
