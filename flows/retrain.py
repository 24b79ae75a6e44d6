"""Scheduled retraining: the pipeline flow (DVC stages, gate, promotion) served as the deployment
`pipeline/retrain` with the cron schedule of params `flow.retrain_cron` / `flow.retrain_timezone`.

    python -m flows.retrain [--repo .] [--server]

Serving needs a Prefect API: PREFECT_API_URL, or --server to start one here (`make ui`): a real
`prefect server start` on 127.0.0.1:4200 whose database is SQLite under PREFECT_HOME, or Postgres when
PREFECT_SERVER_DATABASE_CONNECTION_URL is set (postgresql+asyncpg://user:pass@host/db). The
deployment, its schedule, every run, its logs and its gate artifact are then in the UI. Ctrl-C
stops serving (and the server it started). A team points PREFECT_API_URL at a shared server or
uses a work pool instead of `serve`; the flow is the same.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from moeops.cli import UserError
from moeops.config import load_section

DEPLOYMENT = "retrain"
SERVER_START_TIMEOUT_S = 120.0


def schedule(repo: Path):
    from prefect.schedules import Cron

    p = load_section("flow", repo / "params.yaml")
    return Cron(p.retrain_cron, timezone=p.retrain_timezone)


def wait_healthy(api_url: str, proc: subprocess.Popen | None = None, timeout_s: float = SERVER_START_TIMEOUT_S) -> None:
    """Poll <api>/health until the server answers (or its process died, or the time ran out)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        if proc is not None and proc.poll() is not None:
            raise UserError(f"prefect server exited with code {proc.returncode} before answering at {api_url}")
        if time.monotonic() > deadline:
            raise UserError(f"prefect server did not answer at {api_url} within {timeout_s:g} s")
        time.sleep(0.5)


def start_server(host: str = "127.0.0.1", port: int = 4200, ui: bool = True, log: Path | None = None,
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start `prefect server start` in its own process group (not waiting for it); (process, API URL)."""
    env = {**os.environ, **(env or {}), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": str(ui).lower()}
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    with open(log or os.devnull, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://{host}:{port}/api"


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group; SIGKILL it if it is not gone within 20 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def prefect_server(host: str = "127.0.0.1", port: int = 4200, ui: bool = True) -> Iterator[str]:
    """A real Prefect server for the duration of the block; yields its API URL once it answers."""
    proc, api_url = start_server(host, port, ui)
    try:
        wait_healthy(api_url, proc)
        yield api_url
    finally:
        stop_server(proc)


def serve(repo: Path) -> None:
    """Create (or update) the `retrain` deployment and run its scheduled and triggered runs until
    interrupted. Each run is a subprocess that executes flows.pipeline over `repo`."""
    from flows.pipeline import pipeline

    pipeline.serve(name=DEPLOYMENT, schedule=schedule(repo), parameters={"repo": str(repo)},
                   description="Retrain: every DVC stage, the gate, then promotion or a reject report.",
                   tags=["moeops", "retrain"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.retrain", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=".", help="the DVC repository (default: .)")
    parser.add_argument("--server", action="store_true", help="start a Prefect server first (127.0.0.1:4200)")
    parser.add_argument("--port", type=int, default=4200)
    args = parser.parse_args(argv)
    repo = Path(args.repo).resolve()
    try:
        schedule(repo)  # bad params: one line before anything starts
        if not args.server:
            serve(repo)
            return
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with prefect_server(port=args.port) as api_url:
            print(f"Prefect UI: {api_url.removesuffix('/api')}  (deployment pipeline/{DEPLOYMENT})", flush=True)
            os.environ["PREFECT_API_URL"] = api_url  # for the flow-run subprocesses
            with temporary_settings(updates={PREFECT_API_URL: api_url}):
                serve(repo)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
