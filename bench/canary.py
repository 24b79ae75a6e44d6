"""The canary, measured (issue 12 §5): rollback time and user-visible failures of a bad challenger, no failure
beyond the injected ones across a promotion and a rollback, and the throughput cost of a second loaded version.

    python -m bench.canary [--repeats 3] [--interval 5] [--rate 20] [--project .] [--model-dir DIR]

One `moeops serve` process (serve.watch_interval_s 0.5) follows a fresh registry whose champion v1 is
exports/onnx/int8 (or --model-dir); a real Prometheus (moeops.prometheus, 1 s scrapes) scrapes it and holds the
quality probe's pushes; the rollout flow (flows.rollout, Prefect's API from the environment or an ephemeral one) runs
in this process. Per repeat:

  throughput   closed loop, 8 callers, 16 new tokens each (greedy, ignore_eos), --duration s: output tokens/s with
               the champion alone, then with a challenger (a copy) loaded at weight 0, and at weight 0.5
  promote      the copy v2 rolled out at traffic_ratio 0.1: one analysis (--interval s x 2), then promoted
  rollback     v3, a copy with 20% injected 5xx (MOEOPS_FAULTS), rolled out at 0.1: analysis (--interval s x 3)

Open-loop traffic (Poisson, --rate requests/s, `user` varied so the router splits it by weight) runs through the
promote and rollback phases; a monitor polls /version every 50 ms. Figures:

  rollback_intervals      (weight 0 on the server) - (the client's first answer from v3), in analysis intervals
  failed_vs_bound         failed requests during the rollback / (rate x traffic_ratio x detection window x 0.2)
  failed_beyond_injected  failed requests (5xx, dropped) not answered by v3 across promote and rollback: must be 0
  two_loaded_tps_ratio    output tokens/s with two versions loaded (weight 0.5) over one version

Targets: rollback_intervals <= 2, failed_vs_bound <= 1, failed_beyond_injected = 0 (judged on the worst repeat).
Writes bench/results/canary.json ($MOEOPS_BENCH_OUT for scratch runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

from bench.common import save, spread, verdict
from bench.serve import MODEL, REPO, free_port, start_moeops, stop

TRAFFIC_RATIO, ERROR_RATE = 0.1, 0.2
FAULTS = {"v3": {"error_rate": ERROR_RATE}}
TARGETS = {"rollback_intervals": (2.0, False), "failed_vs_bound": (1.0, False), "failed_beyond_injected": (0.0, False)}
PROMPT = "def parse(line):\n    "


def registry(model_dir: Path, tokenizer: Path, root: Path) -> dict:
    from moeops.registry import promote, register

    files = {"onnx/int8": model_dir, "tokenizer.json": tokenizer}
    v1 = register(root, MODEL, files, {"bench": "canary"}, {"candidate": "onnx_int8"}, "bench.canary")
    promote(root, MODEL, v1, "bench.canary")
    return files


async def _saturate(url: str, duration: float, callers: int = 8) -> float:
    tokens, end = 0, time.perf_counter() + duration

    async def caller(k: int) -> None:
        nonlocal tokens
        i = 0
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            while time.perf_counter() < end:
                i += 1
                r = await c.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 16,
                                                          "temperature": 0, "ignore_eos": True,
                                                          "user": f"sat-{k}-{i}"})
                if r.status_code == 200:
                    tokens += r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(callers)))
    return tokens / (time.perf_counter() - t0)


class Traffic:
    """Open-loop Poisson callers in a thread: every answer as (sent, answered, version header, status)."""

    def __init__(self, url: str, rate: float, seed: int) -> None:
        self.url, self.rate, self.seed = url, rate, seed
        self.answers: list[tuple[float, float, str | None, int]] = []
        self.stop_ = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        rng = np.random.default_rng(self.seed)
        async with httpx.AsyncClient(base_url=self.url, timeout=60,
                                     limits=httpx.Limits(max_connections=64)) as c:
            async def one(i: int) -> None:
                t = time.perf_counter()
                try:
                    r = await c.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 8,
                                                              "temperature": 0, "ignore_eos": True,
                                                              "user": f"user-{rng.integers(1 << 30)}"})
                    self.answers.append((t, time.perf_counter(), r.headers.get("x-moeops-model-version"),
                                         r.status_code))
                except httpx.HTTPError:
                    self.answers.append((t, time.perf_counter(), None, 0))

            tasks, i = [], 0
            while not self.stop_.is_set():
                await asyncio.sleep(float(rng.exponential(1 / self.rate)))
                i += 1
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_.set()
        self.thread.join()


class Monitor:
    """/version every 50 ms: (time, challenger, weight)."""

    def __init__(self, url: str) -> None:
        self.url, self.seen = url, []
        self.stop_ = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5) as c:
            while not self.stop_.wait(0.05):
                try:
                    v = c.get("/version").json()
                    self.seen.append((time.perf_counter(), v.get("challenger"), v.get("challenger_weight", 0.0)))
                except (httpx.HTTPError, ValueError):
                    pass

    def __enter__(self) -> Monitor:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_.set()
        self.thread.join()


def set_weight(root: Path, url: str, version: str, weight: float) -> None:
    from flows.rollout import wait_for_weight
    from moeops.registry import set_challenger_weight

    set_challenger_weight(root, MODEL, weight, "bench.canary")
    wait_for_weight(url, version, weight, 120)


def wait_challenger(url: str, version: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while httpx.get(url + "/version", timeout=5).json().get("challenger") != version:
        if time.monotonic() > deadline:
            raise SystemExit(f"error: the server did not load challenger {version} in {timeout_s:g} s")
        time.sleep(0.1)


def project_params(project: Path, root: Path, prom, url: str, interval: float, count: int) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["registry"] = {"root": str(root), "name": MODEL, "gto_tags": "off"}
    params["rollout"] = {"canary": True, "traffic_ratio": TRAFFIC_RATIO,
                         "steps": [{"analyze": {"interval_s": interval, "count": count}}],
                         "prometheus_url": prom.url, "pushgateway_url": prom.pushgateway_url, "server_url": url,
                         "probe_documents": 8, "probe_max_tokens": 64}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def one_repeat(r: int, model_dir: Path, prepared: Path, work: Path, interval: float, rate: float,
               duration: float) -> dict:
    from flows.rollout import rollout
    from moeops.prometheus import Prometheus
    from moeops.registry import register

    root = work / "registry"
    files = registry(model_dir, prepared / "tokenizer.json", root)
    project = work / "project"
    (project / "data").mkdir(parents=True)
    (project / "data/prepared").symlink_to(prepared.resolve())
    os.environ["MOEOPS_FAULTS"] = json.dumps(FAULTS)  # the server's environment (bench_env copies it)
    proc, url, _ = start_moeops(work, root, f"server{r}", watch_interval_s=0.5)
    out: dict = {}
    try:
        with Prometheus(work / "prometheus", free_port(), free_port(), scrape_interval_s=1.0) as prom:
            target = url.removeprefix("http://")
            prom.add_target(target)
            prom.wait_for_target(target)
            out["one_version_tps"] = asyncio.run(_saturate(url, duration))
            v2 = register(root, MODEL, files, {"bench": "canary good"}, {"candidate": "onnx_int8"}, "good copy")
            wait_challenger(url, v2)
            out["two_loaded_weight0_tps"] = asyncio.run(_saturate(url, duration))
            set_weight(root, url, v2, 0.5)
            out["two_loaded_weight50_tps"] = asyncio.run(_saturate(url, duration))
            set_weight(root, url, v2, TRAFFIC_RATIO)
            with Traffic(url, rate, 100 + r) as traffic, Monitor(url) as monitor:
                time.sleep(interval)  # steady traffic before the canary's first window
                project_params(project, root, prom, url, interval, 2)
                good = rollout(repo=str(project), challenger=v2)
                v3 = register(root, MODEL, files, {"bench": "canary bad"}, {"candidate": "onnx_int8"}, "bad copy")
                wait_challenger(url, v3)
                project_params(project, root, prom, url, interval, 3)
                bad = rollout(repo=str(project), challenger=v3)
                time.sleep(1.0)
    finally:
        stop(proc)
        os.environ.pop("MOEOPS_FAULTS", None)
    answers = traffic.answers
    from_v3 = [a for a in answers if a[2] == v3]
    first_v3 = min((a[1] for a in from_v3), default=None)
    zero = next((t for t, ch, w in monitor.seen if first_v3 is not None and t > first_v3 and (ch is None or w == 0)),
                None)
    failed = [a for a in answers if a[3] == 0 or a[3] >= 500]
    injected = [a for a in failed if a[2] == v3]
    window = (zero - first_v3) if zero is not None and first_v3 is not None else None
    bound = rate * TRAFFIC_RATIO * window * ERROR_RATE if window is not None else None
    out.update({
        "good_outcome": good["outcome"], "bad_outcome": bad["outcome"], "bad_reason": bad["reason"],
        "requests": len(answers), "answered_by_v3": len(from_v3), "failed": len(failed),
        "failed_injected": len(injected), "failed_beyond_injected": len(failed) - len(injected),
        "detection_window_s": round(window, 3) if window is not None else None,
        "rollback_intervals": round(window / interval, 3) if window is not None else None,
        "failed_bound": round(bound, 3) if bound is not None else None,
        "failed_vs_bound": round(len(injected) / bound, 3) if bound else None,
        "two_loaded_tps_ratio": round(out["two_loaded_weight50_tps"] / out["one_version_tps"], 4),
        "two_loaded_weight0_tps_ratio": round(out["two_loaded_weight0_tps"] / out["one_version_tps"], 4),
    })
    return out


def run(model_dir: Path, prepared: Path, repeats: int, interval: float, rate: float, duration: float) -> dict:
    per_repeat = []
    for r in range(repeats):
        print(f"repeat {r + 1}/{repeats}", flush=True)
        work = Path(tempfile.mkdtemp(prefix="bench-canary-"))
        try:
            per_repeat.append(one_repeat(r, model_dir, prepared, work, interval, rate, duration))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print("  " + json.dumps(per_repeat[-1]), flush=True)
    keys = ("rollback_intervals", "failed_vs_bound", "failed_beyond_injected", "two_loaded_tps_ratio",
            "two_loaded_weight0_tps_ratio", "one_version_tps", "two_loaded_weight50_tps", "detection_window_s")
    summary = {k: spread([p[k] for p in per_repeat]) for k in keys}
    verdicts = {k: verdict(summary[k], t, hi) for k, (t, hi) in TARGETS.items()}
    return {"settings": {"interval_s": interval, "rate": rate, "duration_s": duration, "repeats": repeats,
                         "traffic_ratio": TRAFFIC_RATIO, "error_rate": ERROR_RATE, "model_dir": str(model_dir)},
            "summary": summary, "targets": {k: {"target": t, "verdict": verdicts[k]} for k, (t, _) in TARGETS.items()},
            "repeats": per_repeat}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.canary", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--interval", type=float, default=5.0, help="analysis interval_s (the window), seconds")
    p.add_argument("--rate", type=float, default=20.0, help="open-loop requests/s during the canary")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of each throughput run")
    p.add_argument("--project", type=Path, default=Path("."), help="a project after `make pipeline`")
    p.add_argument("--model-dir", type=Path, default=None, help="an int8 model dir (default: exports/onnx/int8)")
    a = p.parse_args(argv)
    model_dir = a.model_dir or a.project / "exports/onnx/int8"
    prepared = a.project / "data/prepared"
    for f in (model_dir / "model.onnx", prepared / "tokenizer.json"):
        if not f.is_file():
            raise SystemExit(f"error: {f}: missing; run `make pipeline` (or pass --project / --model-dir) first")
    result = run(model_dir, prepared, a.repeats, a.interval, a.rate, a.duration)
    path = save("canary", "bench.canary", argv, result)
    for k, t in result["targets"].items():
        print(f"{k}: {result['summary'][k]} (target {t['target']}: {t['verdict']})")
    print(f"two versions loaded / one: {result['summary']['two_loaded_tps_ratio']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
