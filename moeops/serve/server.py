"""`moeops serve`: the registry's champion (or any alias or version) behind the OpenAI-compatible app, on
uvicorn. Torch-free: onnxruntime, numpy, tokenizers, FastAPI.

Start-up: the port is bound at once (/health/live answers while the model loads), then a background thread
reads the alias's manifest (registry.show: every file's sha256 verified), picks the variant the manifest's
`metrics.candidate` names ("onnx_int8" -> the version's onnx/int8/), builds the Engine (ORT session with the
optimized graph cached on disk, warm-up), makes it current in the router (/health/ready turns 200) and starts
the alias watcher (hot reload). A load that fails (no registry, no champion, a damaged file) ends the process:
one `error:` line, exit 2, never a live server that is never ready.

SIGTERM / SIGINT drain: ready turns 503 and new requests get 503 + Retry-After (a load balancer moves on),
requests in flight finish (serve.drain_timeout_s at most), then uvicorn closes the port and the process
exits 0. The port stays open while draining so that probes see "not ready" rather than a refused connection.
A second signal stops at once.

Canary: serving `--alias champion`, the server also loads the aliases file's challenger beside the champion
(before ready, and whenever it changes: watch.py) and routes challenger_weight of the callers to it (router.py).
Tenants: serve.tenants names tenants.yaml (loaded at start; a bad file is one `error:` line, exit 2), and every
/v1 request needs a tenant's `Authorization: Bearer <key>`. Chaos testing of the canary: env MOEOPS_FAULTS,
e.g. '{"v3": {"error_rate": 0.2, "latency_factor": 3.0}}', makes that version's engine fail a seeded fraction
of its requests (500) and run every step 3x slower.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from moeops.cli import UserError
from moeops.config import ServeParams, load_section
from moeops.ort import first_line

log = logging.getLogger("moeops.serve")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="moeops serve",
                                description="Serve a registry model over an OpenAI-compatible HTTP API.")
    p.add_argument("--params", default=None, help="params.yaml with the serve: and registry: sections "
                                                  "(default: ./params.yaml if present, else built-in defaults)")
    p.add_argument("--registry", default=None, help="registry root (default: $MOEOPS_REGISTRY, else registry.root)")
    p.add_argument("--model", default=None, help="model name in the registry (default: registry.name)")
    p.add_argument("--alias", default="champion", help="champion, challenger or a version vN (default: champion)")
    p.add_argument("--host", default=None, help="default: serve.host")
    p.add_argument("--port", type=int, default=None, help="default: serve.port")
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> tuple[ServeParams, Path, str]:
    """(serve params, registry root, model name): flags over $MOEOPS_REGISTRY over params.yaml."""
    if args.params is None and not Path("params.yaml").is_file():  # a serving image may carry no params.yaml
        serve, root, name = ServeParams(), "registry", "moeops"
    else:
        path = Path(args.params or "params.yaml")
        serve = load_section("serve", path)
        reg = load_section("registry", path)
        root, name = reg.root, reg.name
    root = args.registry or os.environ.get("MOEOPS_REGISTRY") or root
    if args.port is not None and not 1 <= args.port <= 65535:
        raise UserError(f"--port: {args.port} is not a TCP port (1..65535)")
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    return serve.model_copy(update=overrides), Path(root), args.model or name


def variant_dir(version_dir: Path) -> tuple[Path, str]:
    """The model directory a registry version serves and its variant: the manifest's metrics.candidate
    ("onnx_int8" -> onnx/int8, "int8")."""
    manifest_path = version_dir / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        candidate = (manifest.get("metrics") or {}).get("candidate") or "onnx_int8"
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"{manifest_path}: unreadable ({first_line(e)})") from None
    if not isinstance(candidate, str) or not candidate.startswith("onnx_"):
        raise UserError(f"{manifest_path}: metrics.candidate {candidate!r} is not an ONNX variant (onnx_int8 ...)")
    variant = candidate.removeprefix("onnx_")
    model_dir = version_dir / "onnx" / variant
    if not (model_dir / "model.onnx").is_file():
        raise UserError(f"{version_dir}: the manifest names {candidate} but {model_dir}/model.onnx is missing")
    return model_dir, variant


FAULTS_ENV = "MOEOPS_FAULTS"


def parse_faults(text: str | None) -> dict[str, tuple[float, float]]:
    """$MOEOPS_FAULTS -> {version: (error_rate, latency_factor)}; UserError (one line) when malformed."""
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError as e:
        raise UserError(f"{FAULTS_ENV}: not JSON ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise UserError(f'{FAULTS_ENV}: expected {{"vN": {{"error_rate": 0.2, "latency_factor": 3.0}}}}, '
                        f"got {type(data).__name__}")
    faults = {}
    for version, spec in data.items():
        if not isinstance(spec, dict) or not set(spec) <= {"error_rate", "latency_factor"}:
            raise UserError(f"{FAULTS_ENV}: {version}: expected an object with error_rate and/or latency_factor, "
                            f"got {spec!r}")
        rate, factor = spec.get("error_rate", 0.0), spec.get("latency_factor", 1.0)
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
            raise UserError(f"{FAULTS_ENV}: {version}.error_rate: expected a number in [0, 1], got {rate!r}")
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not 1.0 <= factor <= 100.0:
            raise UserError(f"{FAULTS_ENV}: {version}.latency_factor: expected a number in [1, 100], got {factor!r}")
        faults[version] = (float(rate), float(factor))
    return faults


def make_engine(version_dir: Path, version: str, serve: ServeParams, *,
                tenants: dict[str, Any] | None = None, faults: dict[str, tuple[float, float]] | None = None):
    """A loaded, verified, warmed and started Engine for one registry version (the watcher's make_engine).
    tenants: {name: Tenant} (None: no tenants, FCFS); faults: parse_faults' result."""
    from moeops.serve.engine import Engine

    model_dir, variant = variant_dir(version_dir)
    error_rate, latency_factor = (faults or {}).get(version, (0.0, 1.0))
    shares = {t.name: (t.weight, t.max_share) for t in tenants.values()} if tenants else None
    # champion and challenger each get serve.threads: two engines share the cores, neither owns them
    engine = Engine(model_dir, version=version, variant=variant, max_batch=serve.max_batch,
                    max_waiting=serve.max_waiting, request_timeout_s=serve.request_timeout_s, threads=serve.threads,
                    cache_dir=Path(serve.cache_dir) if serve.cache_dir else None, warmup=serve.warmup,
                    scheduling=serve.scheduling, tenants=shares, fairness=serve.fairness,
                    fault_error_rate=error_rate, fault_latency_factor=latency_factor)
    engine.start()
    from moeops.serve.app import vocab_bytes

    vocab_bytes(engine.tokenizer)  # the token-bytes table every response uses: built now, not on the first request
    return engine


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), so that 'ready in' counts the interpreter too."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family=family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from moeops import registry
    from moeops.serve.app import create_app
    from moeops.serve.router import Router

    t_main = time.monotonic()
    age0 = process_age_s()
    params, root, name = settings(args)
    faults = parse_faults(os.environ.get(FAULTS_ENV))
    tenants = None
    if params.tenants:
        from moeops.serve.tenants import Tenants, load_tenants

        tenants = load_tenants(params.tenants)
    if faults:
        log.info("%s: injecting faults into %s", FAULTS_ENV, ", ".join(sorted(faults)))

    def build(version_dir: Path, version: str):
        return make_engine(version_dir, version, params, tenants=tenants, faults=faults)

    router = Router(name)
    app = create_app(router, max_prompt_tokens=params.max_prompt_tokens, max_new_tokens=params.max_new_tokens,
                     tenants=Tenants(tenants) if tenants else None)
    state: dict[str, Any] = {"error": None, "watcher": None, "stopping": False}

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            # uvicorn's own handler closes the port at once and re-raises the signal on the way out (exit -15);
            # here the first signal drains with the port open, the second stops now
            if state["stopping"]:
                self.should_exit = self.force_exit = True
                return
            state["stopping"] = True
            app.state.draining = True
            threading.Thread(target=drain, name="drain", daemon=True).start()

    # keep-alive longer than clients' pool expiry (httpx: 5 s, uvicorn's default too) and load balancers' idle
    # timeouts (60 s): else a client may send on a connection the server is closing, and gets a reset
    config = uvicorn.Config(app, host=params.host, port=params.port, log_level="info", access_log=False,
                            lifespan="off", timeout_graceful_shutdown=5, timeout_keep_alive=75)
    server = Server(config)

    def drain() -> None:
        deadline = time.monotonic() + params.drain_timeout_s
        for engine in router.engines():
            log.info("draining %s (at most %.0f s)", engine.version, params.drain_timeout_s)
            if not engine.drain(max(0.0, deadline - time.monotonic())):
                log.info("%s: requests still running after %.0f s; stopping anyway", engine.version,
                         params.drain_timeout_s)
        server.should_exit = True

    def load() -> None:
        try:
            manifest = registry.show(root, name, args.alias)
            engine = build(Path(manifest["path"]), manifest["version"])
        except Exception as e:  # one line and exit 2, whatever broke: a server that is never ready helps nobody
            where = "" if isinstance(e, UserError) else f"loading {name} {args.alias} from {root}: "
            state["error"] = where + first_line(e)
            server.should_exit = True
            return
        from moeops.serve.watch import AliasWatcher

        watcher = AliasWatcher(root, name, args.alias, router, build, params.watch_interval_s,
                               drain_timeout_s=params.drain_timeout_s)
        if args.alias == "champion":  # the canary split from the first request: the challenger loads before ready
            try:
                watcher.sync_challenger(engine.version)
            except Exception as e:  # a broken challenger never keeps the champion from serving
                log.info("challenger: %s; the champion serves alone", first_line(e))
        if state["stopping"]:
            for e in [engine, *router.engines()]:
                e.close()
            return
        router.set(engine)
        since = "process start" if age0 is not None else "main()"
        total = (age0 or 0.0) + time.monotonic() - t_main
        log.info("ready: %s %s (%s) on http://%s:%d in %.2f s from %s (load %.2f s, warm-up %.2f s, graph cache %s)",
                 name, engine.version, engine.variant, params.host, params.port, total, since,
                 engine.load_seconds, engine.warmup_seconds, "hit" if engine.cache_hit else "miss")
        state["watcher"] = watcher
        if params.watch_interval_s > 0:
            watcher.start()

    sock = listen(params.host, params.port)
    loader = threading.Thread(target=load, name="load", daemon=True)
    loader.start()
    try:
        server.run(sockets=[sock])
    finally:
        state["stopping"] = True
        if state["watcher"] is not None:
            state["watcher"].stop()
        for engine in router.engines():
            engine.close()
    if state["error"] is not None:
        raise UserError(state["error"])
    log.info("stopped")


def main(argv: list[str] | None = None) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="moeops serve: %(message)s")
    serve(parse_args(sys.argv[1:] if argv is None else list(argv)))
