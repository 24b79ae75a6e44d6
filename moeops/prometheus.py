"""A real Prometheus and Pushgateway on loopback, as child processes: for `make prometheus`, the tests' session
fixture and the rollout flow's analysis (PromQL over HTTP). Torch-free.

The binaries are Debian's `prometheus` and `prometheus-pushgateway` packages (`make prometheus-install`). Both
run from a work dir: prometheus.yml (generated), targets.json (file_sd: the servers to scrape, rewritten
atomically, so a target added at run time is scraped without a restart), tsdb/ and the two logs. Prometheus
scrapes every target's /metrics and the Pushgateway (honor_labels: the pushed job/instance labels win).

    python -m moeops.prometheus [--target host:port ...] [--port 9090] [--pushgateway-port 9091]
                                [--dir .cache/prometheus] [--scrape-interval 5]

runs both in the foreground until Ctrl-C; with no --target it scrapes params.yaml's serve.host:serve.port.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from moeops.cli import UserError, run_main

PROMETHEUS, PUSHGATEWAY = "prometheus", "prometheus-pushgateway"  # Debian's binary names
START_TIMEOUT_S = 60.0


def write_config(workdir: Path, scrape_interval_s: float, pushgateway: str) -> Path:
    """prometheus.yml: job `moeops` scrapes the file_sd targets in targets.json, job `pushgateway` scrapes
    the Pushgateway at host:port with honor_labels."""
    interval = f"{max(1, round(scrape_interval_s * 1000))}ms"
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
        "scrape_configs": [
            {"job_name": "moeops", "file_sd_configs": [{"files": [str(workdir / "targets.json")],
                                                        "refresh_interval": interval}]},
            {"job_name": "pushgateway", "honor_labels": True, "static_configs": [{"targets": [pushgateway]}]},
        ],
    }
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _get_json(url: str, timeout_s: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return json.loads(r.read())


class Prometheus:
    """Prometheus + Pushgateway as child processes of this one. `start()` returns once both answer
    /-/ready; `stop()` (or leaving the `with` block) ends both."""

    def __init__(self, workdir: str | Path, port: int = 9090, pushgateway_port: int = 9091,
                 scrape_interval_s: float = 5.0, targets: tuple[str, ...] | list[str] = (), host: str = "127.0.0.1"):
        self.workdir = Path(workdir)
        self.url = f"http://{host}:{port}"
        self.pushgateway_url = f"http://{host}:{pushgateway_port}"
        self.host, self.port, self.pushgateway_port = host, port, pushgateway_port
        self.scrape_interval_s = scrape_interval_s
        self._targets = list(dict.fromkeys(targets))
        self._procs: list[subprocess.Popen] = []

    # --- processes ---------------------------------------------------------------------------------------------

    def start(self) -> Prometheus:
        binaries = [shutil.which(b) for b in (PROMETHEUS, PUSHGATEWAY)]
        if None in binaries:
            raise UserError(f"{(PROMETHEUS, PUSHGATEWAY)[binaries.index(None)]} is not installed: run "
                            "`make prometheus-install` (Debian packages prometheus, prometheus-pushgateway)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_targets()
        config = write_config(self.workdir, self.scrape_interval_s, f"{self.host}:{self.pushgateway_port}")
        self._spawn([binaries[1], f"--web.listen-address={self.host}:{self.pushgateway_port}"], "pushgateway.log")
        self._spawn([binaries[0], f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                     f"--web.listen-address={self.host}:{self.port}", "--storage.tsdb.retention.time=1d"],
                    "prometheus.log")
        try:
            urls, logs = (self.pushgateway_url, self.url), ("pushgateway.log", "prometheus.log")
            for proc, url, log in zip(self._procs, urls, logs, strict=True):
                self._wait_ready(proc, url, log)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, cmd: list[str], log: str) -> None:
        with open(self.workdir / log, "ab") as out:
            # own session: a Ctrl-C in the terminal reaches this process, which stops both in order
            self._procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

    def _wait_ready(self, proc: subprocess.Popen, url: str, log: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            tail = (self.workdir / log).read_text(errors="replace").strip().splitlines()[-1:] or [""]
            if proc.poll() is not None:
                raise UserError(f"{proc.args[0]} exited with code {proc.returncode} before {url} was ready "
                                f"({self.workdir / log}: {tail[0][:300]})")
            if time.monotonic() > deadline:
                raise UserError(f"{proc.args[0]} not ready at {url} within {START_TIMEOUT_S:g} s "
                                f"({self.workdir / log})")
            time.sleep(0.1)

    def alive(self) -> bool:
        return bool(self._procs) and all(proc.poll() is None for proc in self._procs)

    def stop(self) -> None:
        """SIGTERM both (Prometheus flushes its head block), SIGKILL what is left after 20 s."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs = []

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- targets -----------------------------------------------------------------------------------------------

    @property
    def targets(self) -> list[str]:
        return list(self._targets)

    def add_target(self, hostport: str) -> None:
        """Scrape http://hostport/metrics from the next file_sd refresh on (no restart)."""
        if hostport not in self._targets:
            self._targets.append(hostport)
            self._write_targets()

    def remove_target(self, hostport: str) -> None:
        if hostport in self._targets:
            self._targets.remove(hostport)
            self._write_targets()

    def _write_targets(self) -> None:
        # atomic (temp file + rename), as file_sd asks: Prometheus never reads a half-written file
        path = self.workdir / "targets.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps([{"targets": self._targets, "labels": {}}] if self._targets else []))
        os.replace(tmp, path)

    def wait_for_target(self, hostport: str, timeout_s: float = 30.0) -> None:
        """Until /api/v1/targets shows hostport scraped and up (UserError naming its last error if not)."""
        deadline, last = time.monotonic() + timeout_s, "not discovered"
        while time.monotonic() < deadline:
            for t in _get_json(self.url + "/api/v1/targets?state=active")["data"]["activeTargets"]:
                if t["labels"].get("instance") == hostport:
                    if t["health"] == "up":
                        return
                    last = f"health {t['health']} {t.get('lastError', '')}".strip()
            time.sleep(0.2)
        raise UserError(f"prometheus at {self.url}: target {hostport} not up within {timeout_s:g} s ({last})")

    # --- queries -----------------------------------------------------------------------------------------------

    def query(self, promql: str) -> list[dict]:
        """An instant query through the HTTP API (/api/v1/query); the API's result list (for a vector:
        [{"metric": {labels}, "value": [t, "v"]}, ...]). UserError with Prometheus' message on a bad query."""
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            body = _get_json(url)
        except urllib.error.HTTPError as e:  # 400/422: the error is in the JSON body
            body = json.loads(e.read() or b"{}")
        if body.get("status") != "success":
            raise UserError(f"prometheus at {self.url}: {body.get('error', 'query failed')} (query: {promql})")
        return body["data"]["result"]


def default_target(params: str | Path) -> str:
    """params.yaml's serve.host:serve.port (a wildcard host scraped over loopback)."""
    from moeops.config import load_section

    serve = load_section("serve", params)
    host = "127.0.0.1" if serve.host in ("0.0.0.0", "", "::") else serve.host
    return f"{host}:{serve.port}"


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m moeops.prometheus",
                                description="Run Prometheus + Pushgateway on loopback, scraping the moeops server.")
    p.add_argument("--target", action="append", default=None, metavar="HOST:PORT",
                   help="a server to scrape (repeatable; default: params.yaml serve.host:serve.port)")
    p.add_argument("--params", default="params.yaml", help="for the default target (default: params.yaml)")
    p.add_argument("--port", type=int, default=9090, help="Prometheus' port (default: 9090)")
    p.add_argument("--pushgateway-port", type=int, default=9091, help="the Pushgateway's port (default: 9091)")
    p.add_argument("--dir", default=".cache/prometheus", help="work dir: config, targets, tsdb, logs")
    p.add_argument("--scrape-interval", type=float, default=5.0, help="seconds (default: 5)")
    args = p.parse_args(argv)
    for flag, port in (("--port", args.port), ("--pushgateway-port", args.pushgateway_port)):
        if not 1 <= port <= 65535:
            raise UserError(f"{flag}: {port} is not a port (1-65535)")
    if args.scrape_interval <= 0:
        raise UserError(f"--scrape-interval: must be > 0, got {args.scrape_interval:g}")
    targets = args.target or [default_target(args.params)]
    prom = Prometheus(args.dir, args.port, args.pushgateway_port, args.scrape_interval, targets)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops both children too, as Ctrl-C does
    with prom:
        print(f"prometheus {prom.url} (scraping {', '.join(targets)} every {args.scrape_interval:g} s), "
              f"pushgateway {prom.pushgateway_url}; data in {prom.workdir}. Ctrl-C stops both.", flush=True)
        while prom.alive():
            time.sleep(0.5)
        raise UserError(f"a child exited; see {prom.workdir}/prometheus.log and pushgateway.log")


if __name__ == "__main__":
    run_main(main)
