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


def make_engine(version_dir: Path, version: str, serve: ServeParams):
    """A loaded, verified, warmed and started Engine for one registry version (the watcher's make_engine)."""
    from moeops.serve.engine import Engine

    model_dir, variant = variant_dir(version_dir)
    engine = Engine(model_dir, version=version, variant=variant, max_batch=serve.max_batch,
                    max_waiting=serve.max_waiting, request_timeout_s=serve.request_timeout_s, threads=serve.threads,
                    cache_dir=Path(serve.cache_dir) if serve.cache_dir else None, warmup=serve.warmup,
                    scheduling=serve.scheduling)
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
    router = Router(name)
    app = create_app(router, max_prompt_tokens=params.max_prompt_tokens, max_new_tokens=params.max_new_tokens)
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
        engine = router.current
        if engine is not None:
            log.info("draining %s (at most %.0f s)", engine.version, params.drain_timeout_s)
            if not engine.drain(params.drain_timeout_s):
                log.info("requests still running after %.0f s; stopping anyway", params.drain_timeout_s)
        server.should_exit = True

    def load() -> None:
        try:
            manifest = registry.show(root, name, args.alias)
            engine = make_engine(Path(manifest["path"]), manifest["version"], params)
        except Exception as e:  # one line and exit 2, whatever broke: a server that is never ready helps nobody
            where = "" if isinstance(e, UserError) else f"loading {name} {args.alias} from {root}: "
            state["error"] = where + first_line(e)
            server.should_exit = True
            return
        if state["stopping"]:
            engine.close()
            return
        router.set(engine)
        since = "process start" if age0 is not None else "main()"
        total = (age0 or 0.0) + time.monotonic() - t_main
        log.info("ready: %s %s (%s) on http://%s:%d in %.2f s from %s (load %.2f s, warm-up %.2f s, graph cache %s)",
                 name, engine.version, engine.variant, params.host, params.port, total, since,
                 engine.load_seconds, engine.warmup_seconds, "hit" if engine.cache_hit else "miss")
        if params.watch_interval_s > 0:
            from moeops.serve.watch import AliasWatcher

            watcher = AliasWatcher(root, name, args.alias, router, lambda d, v: make_engine(d, v, params),
                                   params.watch_interval_s, drain_timeout_s=params.drain_timeout_s)
            state["watcher"] = watcher
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
        engine = router.current
        if engine is not None:
            engine.close()
    if state["error"] is not None:
        raise UserError(state["error"])
    log.info("stopped")


def main(argv: list[str] | None = None) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="moeops serve: %(message)s")
    serve(parse_args(sys.argv[1:] if argv is None else list(argv)))
