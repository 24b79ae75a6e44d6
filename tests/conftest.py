"""Shared fixtures: a small generated corpus prepared once per session, and a helper that
runs a stage exactly as DVC does (`python -m stages.<name>` in a project directory)."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

# Triton kernels (kernels/) compile on CUDA; elsewhere the Triton interpreter runs them on CPU tensors.
# Read when @triton.jit decorates, so before any kernels module is imported.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
TRITON_INTERPRET = os.environ["TRITON_INTERPRET"] not in ("", "0")
TRITON_DEVICE = "cpu" if TRITON_INTERPRET or not torch.cuda.is_available() else "cuda"  # where kernel tests run


@pytest.fixture
def triton():
    """The triton module; skips the test without it, or for compiled kernels without a CUDA GPU."""
    mod = pytest.importorskip("triton")
    if TRITON_DEVICE == "cpu" and not TRITON_INTERPRET:
        pytest.skip("compiled Triton needs a CUDA GPU (set TRITON_INTERPRET=1 to interpret)")
    return mod

REPO = Path(__file__).resolve().parents[1]

DEBUG_PARAMS = {
    # 8 val documents in the session corpus: the largest is 18% of the scored val tokens (default bound 15%).
    "prepare": {"vocab_size": 384, "val_fraction": 0.2, "val_fraction_tolerance": 0.2, "max_val_doc_share": 0.3},
    "pretrain": {"flavor": "debug", "steps": 30, "batch_size": 8, "seq_len": 64, "warmup_steps": 5,
                 "checkpoint_every": 5, "keep_checkpoints": 2, "log_every": 5, "threads": 1, "lr": 0.003},
    "distill": {"student": {"dim": 32, "inter_dim": 64, "moe_inter_dim": 16, "n_routed_experts": 4}, "steps": 12,
                "batch_size": 4, "seq_len": 32, "warmup_steps": 2, "checkpoint_every": 4, "log_every": 4,
                "threads": 1},
    "quantize": {"int4_block_size": 16, "threads": 1},  # debug kv_lora_rank is 16
    "export": {"threads": 1},
    "evaluate": {"batch_size": 8, "max_tokens_per_doc": 512, "speed_tokens": 512, "decode_prompt_len": 16,
                 "decode_new_tokens": 8, "threads": 1},
    "gate": {"max_bits_per_byte": 8.0, "max_p95_latency_ms": 1000.0, "bootstrap_samples": 500,
             "threads": 1},
}


def make_corpus(root: Path, n_files: int = 60, seed: int = 0) -> Path:
    """Python-like files built from templates: structured enough to learn in a few steps."""
    rng = random.Random(seed)
    names = ["alpha", "beta", "gamma", "delta", "value", "items", "count", "total", "result", "buffer"]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = [f'"""Module {i}: generated for tests."""', "", "import os", ""]
        for j in range(rng.randint(3, 8)):
            a, b = rng.sample(names, 2)
            lines += [f"def {a}_{j}({b}, {a}=None):", f"    if {a} is None:", f"        {a} = {rng.randint(0, 99)}",
                      f"    for x in range({b}):", f"        {a} += x * {rng.randint(1, 9)}", f"    return {a}", ""]
        (root / f"mod_{i:03d}.py").write_text("\n".join(lines))
    return root


def write_params(project: Path, **sections) -> None:
    params = {k: dict(v) for k, v in DEBUG_PARAMS.items()}
    for name, values in sections.items():
        params[name] = {**params.get(name, {}), **values}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stage_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONHASHSEED="0")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_stage(name: str, cwd: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=cwd, env=stage_env(),
                          capture_output=True, text=True, timeout=600, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"stage {name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_stage_in_process(name: str, cwd: Path) -> subprocess.CompletedProcess:
    """What `python -m stages.<name>` runs (run_main(main), which turns a UserError into `error: ...` on
    stderr and its exit code) called in this process with `cwd` as the working directory: for the
    refusals that stop before any work, without an interpreter start-up each (each test file keeps one
    through a real process). Returns what run_stage returns; torch's thread count and determinism flag
    are put back."""
    import contextlib
    import importlib
    import io

    import torch

    from moeops.cli import run_main

    main = importlib.import_module(f"stages.{name}").main
    out, err, here = io.StringIO(), io.StringIO(), Path.cwd()
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                run_main(main)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return subprocess.CompletedProcess([sys.executable, "-m", f"stages.{name}"], code, out.getvalue(), err.getvalue())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PREFECT_SERVER: dict = {}  # the session's Prefect server: process, api_url, home


def pytest_collection_modifyitems(session, config, items):
    """Start the Prefect server as soon as the collected tests are known to need it: it boots (~20 s of
    CPU) on the core the tests leave idle while the tests before the first Prefect test run."""
    if any("prefect_api" in item.fixturenames for item in items):
        from flows.retrain import start_server

        home = Path(tempfile.mkdtemp(prefix="moeops-prefect-"))
        proc, api_url = start_server(port=free_port(), ui=False, log=home / "server.log",
                                     env={"PREFECT_HOME": str(home)})
        PREFECT_SERVER.update(proc=proc, api_url=api_url, home=home)


def pytest_unconfigure(config):
    if PREFECT_SERVER:
        from flows.retrain import stop_server

        stop_server(PREFECT_SERVER["proc"])
        shutil.rmtree(PREFECT_SERVER["home"], ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect server (`prefect server start`, SQLite in a temp PREFECT_HOME) on loopback for
    the session; this process and its children talk to it."""
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.retrain import wait_healthy

    api_url = PREFECT_SERVER["api_url"]
    wait_healthy(api_url, PREFECT_SERVER["proc"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(PREFECT_SERVER["home"]))
        mp.setenv("DVC_NO_ANALYTICS", "1")
        mp.setenv("PREFECT_API_URL", api_url)
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            yield api_url
            APILogWorker.drain_all(timeout=5)  # send the last logs while the server is still up


@pytest.fixture(scope="session")
def prepared_project(tmp_path_factory) -> Path:
    """A project directory with params.yaml and data/ from the real corpus and prepare stages."""
    project = tmp_path_factory.mktemp("prepared")
    corpus = make_corpus(project / "corpus")
    write_params(project, corpus={"source": str(corpus)})
    run_stage("corpus", project)
    run_stage("prepare", project)
    return project


@pytest.fixture(scope="session")
def exported_project(prepared_project, tmp_path_factory) -> Path:
    """The prepared project + a seeded, untrained debug teacher and student (the student's context is
    16 tokens, as `distill.seq_len: 16` makes it: shorter than the export parity check's default 20
    decode steps; routers scaled so routing depends on the token, as in a trained model) → the real
    quantize, export and evaluate stages. Shared by the custody and gate-vs-champion tests: copy it
    before changing anything."""
    import json

    import torch

    from moeops.config import make_model_args
    from moeops.model.io import save_model_dir
    from moeops.model.transformer import build_model

    project = tmp_path_factory.mktemp("exported") / "project"
    shutil.copytree(prepared_project, project)
    tok = project / "data/prepared/tokenizer.json"
    vocab = json.loads((project / "data/prepared/meta.json").read_text())["vocab_size"]
    for name, seq_len in (("teacher", 64), ("student", 16)):
        model = build_model(make_model_args("debug", {"vocab_size": vocab, "max_seq_len": seq_len}), seed=3).eval()
        with torch.no_grad():
            for moe in model.moe_layers():
                moe.gate.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
        save_model_dir(project / "models" / name, model, tok, {"stage": "test", "seed": 3})
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"].update(max_tokens_per_doc=32, speed_tokens=64, decode_prompt_len=4, decode_new_tokens=2)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("quantize", "export", "evaluate"):
        run_stage(stage, project)
    return project


@pytest.fixture(scope="session")
def pretrained_project(prepared_project, tmp_path_factory) -> Path:
    """The prepared project + the real pretrain stage run through on DEBUG_PARAMS (models/teacher, its
    checkpoints, metrics/pretrain.json). Shared by the training and distillation tests: copy it before
    changing anything."""
    project = tmp_path_factory.mktemp("pretrained") / "project"
    shutil.copytree(prepared_project, project)
    run_stage("pretrain", project)
    return project


@pytest.fixture
def project(prepared_project, tmp_path) -> Path:
    """A fresh copy of the prepared project for one test."""
    dst = tmp_path / "project"
    shutil.copytree(prepared_project, dst)
    return dst


# ----------------------------------------------------------------- serving (moeops/serve)

SERVE_CONTEXT = 128  # the served test models' max_seq_len


def build_served_version(project: Path, out: Path, seed: int, head_noise: float = 0.0) -> Path:
    """A seeded, untrained debug model (context SERVE_CONTEXT, the prepared tokenizer) exported and
    quantized to int8 as the quantize stage does: out/onnx/int8/{model.onnx, config.json, tokenizer.json,
    lineage.json with checksums}. Routers scaled so routing depends on the token. head_noise > 0: seeded
    noise of that many standard deviations on the output head (same speed, worse predictions)."""
    import json

    import torch

    from moeops.compress.quantize import quantize_int8
    from moeops.config import make_model_args
    from moeops.export.onnx import export_onnx
    from moeops.model.io import save_model_dir
    from moeops.model.transformer import build_model
    from stages.quantize import describe

    tok = project / "data/prepared/tokenizer.json"
    vocab = json.loads((project / "data/prepared/meta.json").read_text())["vocab_size"]
    model = build_model(make_model_args("debug", {"vocab_size": vocab, "max_seq_len": SERVE_CONTEXT}), seed=seed)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + 1))
        if head_noise:
            w = model.lm_head.weight
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(9)) * head_noise * w.std())
    model.eval()
    save_model_dir(out / "model", model, tok, {"stage": "test", "seed": seed, "head_noise": head_noise})
    export_onnx(model, out / "fp32.onnx")
    variant = out / "onnx/int8"
    variant.mkdir(parents=True)
    quantize_int8(out / "fp32.onnx", variant / "model.onnx")
    describe(variant, out / "model", {"stage": "test", "seed": seed, "variant": "int8"})
    return variant


@pytest.fixture(scope="session")
def served_registry(prepared_project, tmp_path_factory) -> dict:
    """A filesystem registry with two versions of model `moeops`: v1 (seed 3) the champion, v2 (seed 5)
    registered beside it (the challenger). {root, name, versions: {v1: model dir, v2: ...}, tokenizer}."""
    from moeops.registry import promote, register

    base = tmp_path_factory.mktemp("served")
    root, name = base / "registry", "moeops"
    tok = prepared_project / "data/prepared/tokenizer.json"
    versions = {}
    for seed in (3, 5):
        variant = build_served_version(prepared_project, base / f"seed{seed}", seed)
        version = register(root, name, {"onnx/int8": variant, "tokenizer.json": tok},
                           {"test_seed": seed}, {"candidate": "onnx_int8"}, f"test model seed {seed}")
        versions[version] = variant
    promote(root, name, "v1", "test champion")
    return {"root": root, "name": name, "versions": versions, "tokenizer": tok}


def wait_for(predicate, timeout_s: float = 60.0, what: str = "condition"):
    """Poll `predicate` every 50 ms until it returns something truthy (returned); AssertionError past the timeout."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def serve_params(path: Path, **serve) -> Path:
    """A params.yaml with the repository's sections and `serve:` overridden for tests (small batch, short
    intervals)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["serve"] = {**params.get("serve", {}), "max_batch": 8, "max_waiting": 32, "threads": 1,
                       "watch_interval_s": 0.2, "drain_timeout_s": 10.0, **serve}
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def start_server(registry: dict, workdir: Path, port: int | None = None, alias: str = "champion",
                 **serve) -> tuple[subprocess.Popen, str]:
    """`moeops serve` as a real process on loopback; returns (process, base URL) once /health/ready says 200.
    The caller stops it (stop_server)."""
    import time
    import urllib.request

    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    params = serve_params(workdir / "params.yaml", **serve)
    log = open(workdir / "server.log", "ab")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen([sys.executable, "-m", "moeops", "serve", "--params", str(params),
                             "--registry", str(registry["root"]), "--model", registry["name"], "--alias", alias,
                             "--host", "127.0.0.1", "--port", str(port)],
                            cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env=stage_env())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n{(workdir / 'server.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health/ready", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server not ready in 120 s:\n{(workdir / 'server.log').read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> int:
    """SIGTERM (drain), then wait; returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.fixture(scope="session")
def server(served_registry, tmp_path_factory) -> str:
    """One `moeops serve` process for the session, serving the test registry's champion (v1); its base URL.
    Tests that restart, drain or hot-reload a server start their own (start_server)."""
    proc, url = start_server(served_registry, tmp_path_factory.mktemp("server"))
    yield url
    stop_server(proc)


# ----------------------------------------------------------------- Prometheus (moeops/prometheus.py)

@pytest.fixture(scope="session")
def prometheus(tmp_path_factory):
    """A real Prometheus + Pushgateway (Debian's packages: `make prometheus-install`) on free loopback ports for
    the session, scraping every 1 s: `.url`, `.pushgateway_url`, `.add_target("127.0.0.1:PORT")`,
    `.remove_target(...)`, `.wait_for_target(...)` (a new target is picked up within ~5 s: Prometheus applies
    discovered targets on a 5 s tick), `.query(promql)` -> the HTTP API's result list. A test that starts a
    server adds it as a target (and removes it when the server stops)."""
    from moeops.prometheus import Prometheus

    port = free_port()
    pushgateway_port = free_port()
    while pushgateway_port == port:
        pushgateway_port = free_port()
    with Prometheus(tmp_path_factory.mktemp("prometheus"), port, pushgateway_port, scrape_interval_s=1.0) as prom:
        yield prom
