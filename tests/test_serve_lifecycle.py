"""The server's lifecycle: hot reload under load, SIGTERM drain, no torch in the process, the prewarm cache, and
load failures (at start and on reload). Real `moeops serve` processes (conftest.start_server) on a copy of the
session's served registry, so promotions here never leak into other tests; one in-process AliasWatcher test
with real engines for the reload rules (log once, retry only when the alias moves)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import start_server, stop_server, wait_for

from moeops import registry
from moeops.io import atomic_write_json

PROMPT = "the model"


@pytest.fixture
def reg(served_registry, tmp_path) -> dict:
    """A private copy of the served registry (v1 champion, v2 registered), safe to promote and damage."""
    root = tmp_path / "registry"
    shutil.copytree(served_registry["root"], root)
    return {**served_registry, "root": root, "versions": {v: root / "versions/moeops" / v for v in ("v1", "v2")}}


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(data)


def set_alias(reg: dict, champion: str | None) -> None:
    """Point the champion alias at a version the way the registry writes it (atomic replace) but without its
    checks: promote refuses damaged files, and these tests need an alias that names a damaged version."""
    path = reg["root"] / "aliases" / f"{reg['name']}.json"
    atomic_write_json(path, {**json.loads(path.read_text()), "champion": champion})


def served_version(url: str) -> str | None:
    try:
        return httpx.get(url + "/version", timeout=5).json()["version"]
    except (httpx.HTTPError, KeyError, ValueError):
        return None


def log_lines(workdir: Path, needle: str) -> list[str]:
    return [ln for ln in (workdir / "server.log").read_text().splitlines() if needle in ln]


def loaded_versions() -> set[str]:
    """The versions moeops_model_info holds in this process (an engine's close forgets its version)."""
    from moeops.serve.metrics import MODEL_INFO

    return {s.labels["model_version"] for m in MODEL_INFO.collect() for s in m.samples}


# ------------------------------------------------------------------------------------------- in process


def test_watcher_swaps_engines_and_keeps_serving_on_a_bad_version(reg, capsys):
    from moeops.serve.engine import Engine, EngineClosed, SamplingParams
    from moeops.serve.router import Router
    from moeops.serve.watch import AliasWatcher

    async def greedy(engine):
        return [d async for d in engine.generate([5, 6, 7], SamplingParams(max_tokens=2, temperature=0))]

    def make_engine(vdir: Path, version: str) -> Engine:
        engine = Engine(vdir / "onnx/int8", version=version, threads=1, max_batch=4, warmup=False)
        engine.start()
        return engine

    router = Router(reg["name"])
    router.set(make_engine(registry.resolve(reg["root"], reg["name"], "champion"), "v1"))
    watcher = AliasWatcher(reg["root"], reg["name"], "champion", router, make_engine, 0.05, drain_timeout_s=5.0)
    watcher.start()
    try:
        first = router.current
        registry.promote(reg["root"], reg["name"], "v2", "test")
        wait_for(lambda: router.current.version == "v2", what="the switch to v2")
        # the old engine drains in the background, then closes (forgetting its metrics) and admits nothing more
        wait_for(lambda: "v1" not in loaded_versions() and "v2" in loaded_versions(), what="v1 closed")
        with pytest.raises(EngineClosed):
            asyncio.run(greedy(first))
        assert asyncio.run(greedy(router.current))[-1].finish_reason in ("stop", "length")

        # a damaged version: one log line naming the file, the old engine keeps serving, no retry every poll
        flip_byte(reg["versions"]["v1"] / "onnx/int8/model.onnx")
        set_alias(reg, "v1")
        time.sleep(0.5)  # ~10 polls
        set_alias(reg, "v1")  # rewritten but the same version: still not retried
        time.sleep(0.3)
        assert router.current.version == "v2"
        failed = [ln for ln in capsys.readouterr().err.splitlines() if "hot reload to v1 failed" in ln]
        assert len(failed) == 1 and "model.onnx" in failed[0] and "still serving v2" in failed[0], failed

        set_alias(reg, None)  # unset: keep serving, say so once
        time.sleep(0.3)
        assert router.current.version == "v2"
        assert len([ln for ln in capsys.readouterr().err.splitlines() if "is unset" in ln]) == 1
    finally:
        watcher.stop()
        router.current.close()


# ------------------------------------------------------------------------------------------- processes


def completion(url: str, max_tokens: int = 8, **kw) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"model": "moeops", "prompt": PROMPT, "max_tokens": max_tokens,
                                                      "temperature": 0, **kw}, timeout=60)


def metric_versions(metrics: str, name: str) -> set[str]:
    return set(re.findall(rf'^{name}{{[^}}]*model_version="(v\d+)"', metrics, re.M))


def test_hot_reload_under_load_drops_nothing(reg, tmp_path):
    """Ten alias switches (promote v2 / roll back to v1) while clients stream and poll back to back: every request
    answers 200 with a finished completion, /version follows each switch, the metrics keep both versions' request
    counts but only the loaded version's model_info. Then an alias pointing at a damaged version: one log line,
    still serving v1, still no failed request."""
    proc, url = start_server(reg, tmp_path / "srv")
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)  # no hidden retries
    stop, results = threading.Event(), []

    def load(stream: bool) -> None:
        while not stop.is_set():
            try:
                r = client.completions.create(model="moeops", prompt=PROMPT, max_tokens=4, temperature=0,
                                              stream=stream)
                finishes = [c.choices[0].finish_reason for c in (r if stream else [r]) if c.choices]
                finishes = [f for f in finishes if f is not None]
                results.append(None if finishes in (["stop"], ["length"]) else f"unfinished: {finishes}")
            except Exception as e:  # any error is a dropped request
                results.append(repr(e))

    clients = [threading.Thread(target=load, args=(i % 2 == 0,), daemon=True) for i in range(4)]
    for t in clients:
        t.start()
    try:
        for i in range(10):
            before = len(results)
            if i % 2 == 0:
                registry.promote(reg["root"], reg["name"], "v2", "test: hot reload")
                target = "v2"
            else:
                target = registry.rollback(reg["root"], reg["name"], "test: hot reload")
            wait_for(lambda t=target: served_version(url) == t, what=f"/version to say {target}")
            wait_for(lambda b=before: len(results) > b + 4, what="requests served across the switch")
        assert served_version(url) == "v1"

        flip_byte(reg["versions"]["v2"] / "onnx/int8/model.onnx")
        set_alias(reg, "v2")
        failed = wait_for(lambda: log_lines(tmp_path / "srv", "hot reload to v2 failed"), what="the failure line")
        before = len(results)
        wait_for(lambda: len(results) > before + 8, what="requests after the failed reload")
        assert served_version(url) == "v1"
        assert len(log_lines(tmp_path / "srv", "hot reload to v2 failed")) == 1, "retried a damaged version"
        assert "model.onnx" in failed[0] and "still serving v1" in failed[0], failed
    finally:
        stop.set()
        for t in clients:
            t.join(60)
        metrics = httpx.get(url + "/metrics", timeout=10).text
        code = stop_server(proc)
    errors = [r for r in results if r is not None]
    assert not errors, f"{len(errors)} of {len(results)} requests failed: {errors[:5]}"
    assert code == 0
    assert {"v1", "v2"} <= metric_versions(metrics, "moeops_requests_total")
    assert metric_versions(metrics, "moeops_model_info") == {"v1"}


def engine_load(url: str) -> int:
    """Requests the server's engine holds now: moeops_requests_running + moeops_requests_waiting."""
    text = httpx.get(url + "/metrics", timeout=5).text
    return int(sum(float(v) for v in re.findall(r"^moeops_requests_(?:running|waiting){[^}]*} (\S+)$", text, re.M)))


def test_sigterm_drains_in_flight_streams_then_exits_0(served_registry, tmp_path, monkeypatch):
    # every model call 5x slower (injected latency), so all n streams are surely in flight together when the
    # signal comes (at full speed the first could finish before the last arrives on a busy machine)
    monkeypatch.setenv("MOEOPS_FAULTS", '{"v1": {"latency_factor": 5.0}}')
    proc, url = start_server(served_registry, tmp_path / "srv")
    n = 10  # more than max_batch (8): some wait in the queue when SIGTERM arrives, and must finish too
    streams = [{"events": [], "error": None} for _ in range(n)]

    def consume(s: dict) -> None:
        body = {"model": "moeops", "prompt": PROMPT, "max_tokens": 60, "seed": 1, "ignore_eos": True,
                "stream": True}
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                s["status"] = r.status_code
                s["events"].extend(ln[len("data: "):] for ln in r.iter_lines() if ln.startswith("data: "))
        except httpx.HTTPError as e:
            s["error"] = repr(e)

    readers = [threading.Thread(target=consume, args=(s,), daemon=True) for s in streams]
    for t in readers:
        t.start()
    # SIGTERM once the server holds all of them (a request still on the wire would rightly be refused)
    wait_for(lambda: engine_load(url) == n, what=f"{n} requests running or queued")
    proc.send_signal(signal.SIGTERM)

    try:
        ready = httpx.get(url + "/health/ready", timeout=5).status_code
    except httpx.ConnectError:
        ready = "refused"
    try:
        new = completion(url).status_code
    except httpx.ConnectError:
        new = "refused"
    for t in readers:
        t.join(60)
    assert proc.wait(30) == 0
    assert ready in (503, "refused") and new in (503, "refused"), (ready, new)
    for s in streams:
        assert s["error"] is None and s["status"] == 200, s
        assert s["events"][-1] == "[DONE]", s["events"][-3:]
        finishes = [c["finish_reason"] for e in s["events"][:-1] for c in json.loads(e)["choices"]]
        assert [f for f in finishes if f is not None] in (["stop"], ["length"]), finishes


def test_prewarm_cache_and_no_torch(served_registry, tmp_path):
    """A fresh cache dir: the first start optimizes the graph and saves it (cache_hit false), the second loads it
    (true); both answer the same greedy completion. The serving process never maps torch's libraries."""
    cache, seen = tmp_path / "ort-cache", []
    for i in range(2):
        t0 = time.monotonic()
        proc, url = start_server(served_registry, tmp_path / f"srv{i}", cache_dir=str(cache))
        ready_s = time.monotonic() - t0
        try:
            version = httpx.get(url + "/version", timeout=5).json()
            r = completion(url, max_tokens=12)
            maps = Path(f"/proc/{proc.pid}/maps").read_text()
        finally:
            code = stop_server(proc)
        assert code == 0 and r.status_code == 200, r.text
        torch_maps = sorted({ln.split()[-1] for ln in maps.splitlines() if "torch" in ln})
        assert not torch_maps, f"the server loaded torch: {torch_maps[:3]}"
        seen.append((version["cache_hit"], r.json()["choices"][0]["text"]))
        print(f"start {i + 1}: start→ready {ready_s:.2f} s, cache_hit {version['cache_hit']}")
    assert [hit for hit, _ in seen] == [False, True]
    assert seen[0][1] == seen[1][1]


def test_damaged_champion_exits_2_naming_the_file(reg, tmp_path):
    bad = reg["versions"]["v1"] / "onnx/int8/model.onnx"
    flip_byte(bad)
    with pytest.raises(RuntimeError, match="server exited 2"):
        start_server(reg, tmp_path / "srv")
    log = (tmp_path / "srv/server.log").read_text()
    assert "Traceback" not in log
    assert len([ln for ln in log.splitlines() if str(bad) in ln]) == 1, log[-2000:]
