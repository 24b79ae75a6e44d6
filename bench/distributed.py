"""Distributed pretraining, measured through the real stage (`python -m stages.pretrain`) in fresh
project copies whose data/prepared links to `--prepared`:

    python -m bench.distributed layouts     [--steps 12] [--repeats 3]  tokens/s per process layout vs 1 process
    python -m bench.distributed compression [--steps 150]               DP2 gradients none / bf16 / int8: bytes, loss
    python -m bench.distributed recovery    [--checkpoint-every 10]     kill -9 a rank: time until training resumes
    python -m bench.distributed memory      [--steps 6] [--repeats 2]   activation checkpointing off / on: peak RSS
    python -m bench.distributed same_loss   [--flavor debug] [--steps 20]  every layout's losses vs 1 process

Common options: --flavor (small), --seq-len / --batch-size (params.yaml's; the debug flavor needs
--seq-len 64), --prepared (data/prepared). Every run starts from params.yaml's pretrain section.
Results: bench/results/<subcommand>.json (machine, command, date, every run, and per measure the
spread of the repeats: values, min, median, max); a table on stdout. Ratios are taken per repeat
(repeat i of a layout against repeat i of 1 process: runs are interleaved).
All processes of a run share this machine's cores (2 on the reference laptop): a layout of N
processes gets cores / N threads each, so these numbers measure overhead, not scaling.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
LIVE = Path("dvclive/pretrain/plots/metrics")

# name -> pretrain overrides. Extend freely: a layout the stage refuses (exit 2) is skipped.
LAYOUTS: dict[str, dict] = {
    "1proc": {},
    "dp2": {"world_size": 2},
    "dp2-zero2": {"world_size": 2, "zero_stage": 2},
    "ep2": {"world_size": 2, "ep_size": 2},
    "dp2xep2-zero1": {"world_size": 4, "ep_size": 2, "zero_stage": 1},
    "pp2": {"world_size": 2, "pp_size": 2},
    "pp2xdp2xep2": {"world_size": 4, "pp_size": 2, "ep_size": 2},
}
COMPRESSIONS = ["none", "bf16", "int8"]


# ---------------------------------------------------------------- helpers (bench/balance.py uses them too)


def add_common_args(ap: argparse.ArgumentParser, flavor: bool = True) -> None:
    if flavor:
        ap.add_argument("--flavor", default="small")
    ap.add_argument("--seq-len", type=int, default=None, help="default: params.yaml's")
    ap.add_argument("--batch-size", type=int, default=None, help="default: params.yaml's")
    ap.add_argument("--prepared", type=Path, default=REPO / "data" / "prepared")


def pretrain_params(a: argparse.Namespace, flavor: str | None = None, **overrides) -> dict:
    """params.yaml's pretrain section with the command line's flavor/seq_len/batch_size and `overrides`
    (a `model` override is merged into params.yaml's); warmup is capped at the step count. Exits with
    the stage's one-line message if the result is invalid."""
    from pydantic import ValidationError

    from moeops.config import PretrainParams, format_validation_error

    base = yaml.safe_load(PARAMS.read_text())["pretrain"]
    p = {**base, "flavor": flavor or a.flavor, **overrides, "model": {**base.get("model", {}),
                                                                         **overrides.get("model", {})}}
    if a.seq_len:
        p["seq_len"] = a.seq_len
    if a.batch_size:
        p["batch_size"] = a.batch_size
    p["warmup_steps"] = min(p["warmup_steps"], p["steps"])
    try:
        PretrainParams.model_validate(p)
    except ValidationError as e:
        raise SystemExit(f"error: {format_validation_error('pretrain', e, 'bench params')}") from None
    return p


def make_project(tmp: Path, prepared: Path, pretrain: dict) -> Path:
    """A fresh project directory under `tmp`: params.yaml with this pretrain section, data/prepared linked."""
    project = Path(tempfile.mkdtemp(dir=tmp, prefix="project-"))
    (project / "data").mkdir()
    (project / "data" / "prepared").symlink_to(prepared.resolve(), target_is_directory=True)
    (project / "params.yaml").write_text(yaml.safe_dump({"pretrain": pretrain}, sort_keys=False))
    return project


def stage_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), PYTHONHASHSEED="0", PYTHONUNBUFFERED="1",
                DVC_NO_ANALYTICS="1", DO_NOT_TRACK="1")


def stage_cmd() -> list[str]:
    return [sys.executable, "-m", "stages.pretrain"]


def run_stage(project: Path) -> tuple[subprocess.CompletedProcess, float]:
    """Run the pretrain stage in `project`; (the finished process, wall seconds)."""
    t = time.perf_counter()
    proc = subprocess.run(stage_cmd(), cwd=project, env=stage_env(), capture_output=True, text=True)
    return proc, time.perf_counter() - t


def failure(proc: subprocess.CompletedProcess) -> str:
    lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
    return f"exit {proc.returncode}: {lines[-1] if lines else ''}"


def check(proc: subprocess.CompletedProcess) -> None:
    if proc.returncode:
        raise SystemExit(f"pretrain stage failed ({failure(proc)})\n{proc.stderr[-3000:]}")


def stage_metrics(project: Path) -> dict:
    return json.loads((project / "metrics" / "pretrain.json").read_text())


def read_tsv(project: Path, metric: str) -> list[tuple[int, float]]:
    """dvclive rows of `metric` (e.g. "train/loss") as (step, value); [] if not written yet."""
    path = project / LIVE / f"{metric}.tsv"
    if not path.is_file():
        return []
    name = metric.rsplit("/", 1)[-1]
    with open(path) as f:
        return [(int(r["step"]), float(r[name])) for r in csv.DictReader(f, delimiter="\t") if r.get(name)]


def steady_tokens_per_s(project: Path) -> float:
    """Median per-step tokens/s after the first logged step (log_every 1): no start-up, no final save."""
    rows = read_tsv(project, "train/tokens_per_s")
    return statistics.median(v for _, v in (rows[1:] or rows))


def final_loss(project: Path, last: int = 10) -> float:
    return statistics.mean(v for _, v in read_tsv(project, "train/loss")[-last:])


def val_loss(project: Path, prepared: Path, batches: int = 8, batch_size: int = 8, seed: int = 1234) -> float:
    """Mean cross-entropy of models/teacher on `batches` fixed val batches at its training seq_len."""
    import torch
    import torch.nn.functional as F

    from moeops.model.io import load_model_dir
    from moeops.train.data import get_batch, load_tokens

    model = load_model_dir(project / "models" / "teacher")
    val = load_tokens(prepared, "val")
    total = 0.0
    with torch.no_grad():
        for i in range(batches):
            x_BS, y_BS = get_batch(val, seed, i, 0, batch_size, model.args.max_seq_len)
            total += float(F.cross_entropy(model(x_BS).flatten(0, 1), y_BS.flatten()))
    return total / batches


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(x: float | None, y: float | None) -> float | None:
    return round(x / y, 4) if x is not None and y else None


def save(name: str, module: str, result: dict, argv: list[str] | None = None) -> Path:
    from bench.common import save as save_result

    return save_result(name, module, argv, result)


def paired_spread(runs: list[dict], reference: list[dict], key: str) -> dict | None:
    """Spread of run[key] / reference[key] over the repeats both have (same repeat index)."""
    from bench.common import spread

    ref = {r["repeat"]: r[key] for r in reference}
    return spread((r[key] / ref[r["repeat"]] for r in runs if ref.get(r["repeat"])), 4)


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


def table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells)


# ---------------------------------------------------------------- layouts


def layouts(a: argparse.Namespace, tmp: Path) -> dict:
    base = pretrain_params(a, steps=a.steps, log_every=1, checkpoint_every=a.steps)
    runs: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
    skipped: dict[str, str] = {}
    for repeat in range(a.repeats):  # interleaved: every layout sees the same machine state
        for name, layout in LAYOUTS.items():
            if name in skipped:
                continue
            project = make_project(tmp, a.prepared, {**base, **layout})
            proc, wall = run_stage(project)
            if proc.returncode:  # 2: params refused (e.g. a layout not implemented yet); else a crash
                skipped[name] = ("refused, " if proc.returncode == 2 else "failed, ") + failure(proc)
                print(f"{name}: skipped ({skipped[name]})", flush=True)
                continue
            m = stage_metrics(project)
            runs[name].append({"repeat": repeat, "tokens_per_s": m["tokens_per_s"],
                               "steady_tokens_per_s": round(steady_tokens_per_s(project), 1),
                               "train_seconds": m["train_seconds"], "wall_seconds": round(wall, 1),
                               "all_to_all_bytes_per_step": m["all_to_all_bytes_per_step"],
                               "grad_bytes_per_step": m["grad_bytes_per_step"],
                               "final_train_loss": m["final_train_loss"]})
            print(f"{name} #{repeat}: {runs[name][-1]}", flush=True)
            shutil.rmtree(project)
    summary = {}
    for name, rs in runs.items():
        if rs:
            summary[name] = {key: median(r[key] for r in rs) for key in
                             ("tokens_per_s", "steady_tokens_per_s", "all_to_all_bytes_per_step",
                              "grad_bytes_per_step", "wall_seconds")}
    one = summary.get("1proc", {})
    from bench.common import spread

    for name, s in summary.items():
        s["ratio_vs_1proc"] = ratio(s["tokens_per_s"], one.get("tokens_per_s"))
        s["steady_ratio_vs_1proc"] = ratio(s["steady_tokens_per_s"], one.get("steady_tokens_per_s"))
        s["steady_tokens_per_s_spread"] = spread((r["steady_tokens_per_s"] for r in runs[name]), 1)
        s["steady_ratio_vs_1proc_spread"] = paired_spread(runs[name], runs["1proc"], "steady_tokens_per_s")
    rows = [[n, s["tokens_per_s"], s["ratio_vs_1proc"], s["steady_tokens_per_s"], s["steady_ratio_vs_1proc"],
             s["all_to_all_bytes_per_step"], s["grad_bytes_per_step"]] for n, s in summary.items()]
    print(table(["layout", "tok/s", "vs 1proc", "steady tok/s", "vs 1proc", "a2a B/step", "grad B/step"], rows))
    for name, why in skipped.items():
        print(f"{name}: skipped ({why})")
    return {"pretrain": base, "layouts": LAYOUTS, "runs": runs, "skipped": skipped, "median": summary,
            "note": "tokens_per_s: the stage's (whole run incl. first step and final checkpoint); steady: median "
                    "per-step tokens/s after the first step. All processes share the machine's cores."}


# ---------------------------------------------------------------- same loss


def same_loss(a: argparse.Namespace, tmp: Path) -> dict:
    """Every layout trains the same model as 1 process (what tests/test_distributed.py asserts at
    rel 1e-4): the largest relative difference of any step's train loss and of the trained model's
    val loss against the 1-process run, per layout."""
    seq = {"seq_len": 64, "batch_size": 8} if a.flavor == "debug" and not a.seq_len else {}
    base = pretrain_params(a, steps=a.steps, log_every=1, checkpoint_every=a.steps, **seq)
    runs: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    reference: tuple[list[float], float] | None = None
    for name, layout in LAYOUTS.items():  # 1proc first: the reference
        project = make_project(tmp, a.prepared, {**base, **layout})
        proc, wall = run_stage(project)
        if proc.returncode:
            if reference is None:
                check(proc)
            skipped[name] = ("refused, " if proc.returncode == 2 else "failed, ") + failure(proc)
            print(f"{name}: skipped ({skipped[name]})", flush=True)
            continue
        losses = [v for _, v in read_tsv(project, "train/loss")]
        val = val_loss(project, a.prepared)
        shutil.rmtree(project)
        if reference is None:
            reference = (losses, val)
        ref_losses, ref_val = reference
        rel = [abs(x - y) / abs(y) for x, y in zip(losses, ref_losses)]
        runs[name] = {"layout": layout, "steps_logged": len(losses), "train_losses": losses,
                      "max_rel_diff_train_loss": max(rel) if rel else None,
                      "rel_diff_val_loss": abs(val - ref_val) / abs(ref_val), "val_loss": round(val, 6),
                      "wall_seconds": round(wall, 1)}
        print(f"{name}: max rel diff train {runs[name]['max_rel_diff_train_loss']:.2e}, "
              f"val {runs[name]['rel_diff_val_loss']:.2e}", flush=True)
    others = {n: r for n, r in runs.items() if n != "1proc"}
    worst = max((max(r["max_rel_diff_train_loss"] or 0.0, r["rel_diff_val_loss"]) for r in others.values()),
                default=None)
    complete = not skipped and all(r["steps_logged"] == a.steps for r in runs.values())
    met = complete and worst is not None and worst <= a.tolerance
    print(table(["layout", "steps", "max rel diff (train loss)", "rel diff (val loss)"],
                [[n, r["steps_logged"], r["max_rel_diff_train_loss"], r["rel_diff_val_loss"]]
                 for n, r in runs.items()]))
    return {"pretrain": base, "runs": runs, "skipped": skipped, "max_rel_diff": worst, "tolerance": a.tolerance,
            "verdict": "met" if met else "not met",
            "note": "relative differences against the 1-process run: every logged step's train loss, and the val "
                    "loss of models/teacher on 8 fixed val batches; deterministic (fp32 reduction order), so one "
                    "run per layout"}


# ---------------------------------------------------------------- compression


def compression(a: argparse.Namespace, tmp: Path) -> dict:
    base = pretrain_params(a, steps=a.steps, log_every=1, checkpoint_every=a.steps, world_size=2)
    runs = {}
    for c in COMPRESSIONS:
        project = make_project(tmp, a.prepared, {**base, "grad_compression": c})
        proc, wall = run_stage(project)
        check(proc)
        m = stage_metrics(project)
        runs[c] = {"final_train_loss": round(final_loss(project), 5),
                   "val_loss": round(val_loss(project, a.prepared), 5), "grad_bytes_per_step": m["grad_bytes_per_step"],
                   "tokens_per_s": m["tokens_per_s"], "wall_seconds": round(wall, 1)}
        print(f"{c}: {runs[c]}", flush=True)
        shutil.rmtree(project)
    none = runs["none"]
    for r in runs.values():
        r["bytes_ratio_vs_none"] = ratio(r["grad_bytes_per_step"], none["grad_bytes_per_step"])
        r["train_loss_ratio_vs_none"] = ratio(r["final_train_loss"], none["final_train_loss"])
        r["val_loss_ratio_vs_none"] = ratio(r["val_loss"], none["val_loss"])
    print(table(["grads", "grad B/step", "bytes vs none", "train loss", "vs none", "val loss", "vs none"],
                [[c, r["grad_bytes_per_step"], r["bytes_ratio_vs_none"], r["final_train_loss"],
                  r["train_loss_ratio_vs_none"], r["val_loss"], r["val_loss_ratio_vs_none"]] for c, r in runs.items()]))
    return {"pretrain": base, "runs": runs,
            "note": "one run each, same seed; train loss = mean of the last 10 logged steps; val loss = models/teacher "
                    "on 8 fixed val batches of 8 x seq_len (seed 1234)"}


# ---------------------------------------------------------------- recovery


def _workers(stage: subprocess.Popen) -> list[psutil.Process]:
    """The training processes (torchrun's children), highest RANK last."""
    found = []
    for c in psutil.Process(stage.pid).children(recursive=True):
        try:
            cmd = c.cmdline()
            if "--worker" in cmd and "torch.distributed.run" not in cmd:
                found.append((int(c.environ().get("RANK", 0)), c))
        except (psutil.Error, ValueError):
            pass
    return [c for _, c in sorted(found, key=lambda rc: rc[0])]


def last_step(project: Path) -> int:
    rows = read_tsv(project, "train/loss")
    return rows[-1][0] if rows else 0


def _wait(cond, stage: subprocess.Popen, what: str, timeout: float = 1800.0, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if stage.poll() is not None:
            raise RuntimeError(f"the stage exited ({stage.returncode}) while waiting for {what}")
        time.sleep(poll)
    raise RuntimeError(f"timed out waiting for {what}")


def recover_once(a: argparse.Namespace, tmp: Path, flavor: str) -> dict:
    k = a.checkpoint_every
    steps = a.steps or (10 * k if flavor == "debug" else 2 * k + 5)  # a debug step takes ~50 ms: leave room
    seq = {"seq_len": 64, "batch_size": 8} if flavor == "debug" and not a.seq_len else {}
    p = pretrain_params(a, flavor, steps=steps, log_every=1, checkpoint_every=k, world_size=2, max_restarts=1, **seq)
    project = make_project(tmp, a.prepared, p)
    lines: list[tuple[float, str]] = []  # (monotonic time, stdout line)
    with open(project / "stderr.log", "w") as err:
        stage = subprocess.Popen(stage_cmd(), cwd=project, env=stage_env(), stdout=subprocess.PIPE, stderr=err,
                                 text=True, bufsize=1)

    def read():
        for line in stage.stdout:
            lines.append((time.monotonic(), line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        t0 = time.monotonic()
        _wait(lambda: (project / f"checkpoints/pretrain/step_{k:08d}").is_dir(), stage, f"checkpoint {k}")
        victims = _wait(lambda: _workers(stage), stage, "the worker processes")
        _wait(lambda: last_step(project) >= k + a.lost, stage, f"step {k + a.lost}", poll=0.01)
        victims[-1].send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        rows_at_kill = read_tsv(project, "train/loss")
        step_at_kill = rows_at_kill[-1][0]
        resumed = _wait(lambda: next(((t, s) for t, s in lines if t >= t_kill and "resumed from" in s), None),
                        stage, "the 'resumed from' line")
        _wait(lambda: len(read_tsv(project, "train/loss")) > len(rows_at_kill), stage, "a step after the resume")
        t_step = time.monotonic()
        rc = stage.wait(timeout=3600)
    finally:
        if stage.poll() is None:
            stage.terminate()  # the stage forwards it to the job's process group
            stage.wait(timeout=120)
    reader.join(timeout=10)
    match = re.search(r"\(step (\d+)\)", resumed[1])
    result = {"flavor": flavor, "steps": steps, "checkpoint_every": k, "killed_rank": len(victims) - 1,
              "seconds_to_kill": round(t_kill - t0, 1), "step_at_kill": step_at_kill,
              "resumed_step": int(match[1]) if match else None,
              "steps_lost": step_at_kill - (int(match[1]) if match else k),
              "crash_to_resumed_s": round(resumed[0] - t_kill, 2), "crash_to_next_step_s": round(t_step - t_kill, 2),
              "exit_code": rc, "completed": rc == 0 and (project / "models/teacher/model.safetensors").is_file(),
              "resumed_line": resumed[1]}
    if rc == 0:
        result["resumed_from_step_metric"] = stage_metrics(project)["resumed_from_step"]
    else:
        result["stderr_tail"] = (project / "stderr.log").read_text()[-2000:]
    shutil.rmtree(project)
    return result


def recovery(a: argparse.Namespace, tmp: Path) -> dict:
    runs = {flavor: [] for flavor in a.flavors}
    for repeat in range(a.repeats):
        for flavor in a.flavors:
            runs[flavor].append(recover_once(a, tmp, flavor))
            print(f"{flavor} #{repeat}: {runs[flavor][-1]}", flush=True)
    from bench.common import spread

    summary = {f: {"crash_to_resumed_s": median(r["crash_to_resumed_s"] for r in rs),
                   "crash_to_next_step_s": median(r["crash_to_next_step_s"] for r in rs),
                   "crash_to_next_step_s_spread": spread((r["crash_to_next_step_s"] for r in rs), 2),
                   "steps_lost": median(r["steps_lost"] for r in rs),
                   "all_completed": all(r["completed"] for r in rs)} for f, rs in runs.items()}
    print(table(["flavor", "kill->resumed s", "kill->next step s", "steps lost", "completed"],
                [[f, s["crash_to_resumed_s"], s["crash_to_next_step_s"], s["steps_lost"], s["all_completed"]]
                 for f, s in summary.items()]))
    return {"runs": runs, "median": summary,
            "note": "world_size 2, max_restarts 1, log_every 1; the highest rank is killed with SIGKILL once the "
                    "tsv shows checkpoint_every + lost steps; crash_to_resumed: kill -> the stage's 'resumed from' "
                    "line; crash_to_next_step: kill -> the first new train/loss row after it"}


# ---------------------------------------------------------------- memory


def memory(a: argparse.Namespace, tmp: Path) -> dict:
    base = pretrain_params(a, steps=a.steps, log_every=1, checkpoint_every=a.steps)
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for repeat in range(a.repeats):
        for mode, rs in runs.items():  # interleaved
            project = make_project(tmp, a.prepared, {**base, "activation_checkpointing": mode})
            proc, wall = run_stage(project)
            check(proc)
            m = stage_metrics(project)
            rs.append({"repeat": repeat, "peak_rss_gb": m["peak_rss_gb"], "tokens_per_s": m["tokens_per_s"],
                       "steady_tokens_per_s": round(steady_tokens_per_s(project), 1),
                       "activation_checkpointing": m["activation_checkpointing"], "wall_seconds": round(wall, 1)})
            print(f"{mode} #{repeat}: {rs[-1]}", flush=True)
            shutil.rmtree(project)
    summary = {mode: {k: median(r[k] for r in rs) for k in ("peak_rss_gb", "tokens_per_s", "steady_tokens_per_s")}
               for mode, rs in runs.items()}
    summary["on_vs_off"] = {k: ratio(summary["on"][k], summary["off"][k]) for k in summary["off"]}
    summary["on_vs_off_spread"] = {k: paired_spread(runs["on"], runs["off"], k) for k in summary["off"]}
    print(table(["checkpointing", "peak RSS GB", "tok/s", "steady tok/s"],
                [[mode, s["peak_rss_gb"], s["tokens_per_s"], s["steady_tokens_per_s"]] for mode, s in summary.items()
                 if mode != "on_vs_off_spread"]))
    return {"pretrain": base, "runs": runs, "median": summary,
            "note": "1 process; peak_rss_gb = the stage process's max RSS over the whole run (model, data, save)"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    for name, steps, repeats in [("layouts", 12, 3), ("compression", 150, None), ("memory", 6, 2),
                                 ("same_loss", 20, None)]:
        sp = sub.add_parser(name)
        add_common_args(sp)
        sp.add_argument("--steps", type=int, default=steps)
        if repeats:
            sp.add_argument("--repeats", type=int, default=repeats)
    sub.choices["same_loss"].add_argument("--tolerance", type=float, default=1e-4)
    sp = sub.add_parser("recovery")
    add_common_args(sp, flavor=False)
    sp.add_argument("--flavors", nargs="+", default=["debug", "small"],
                    help="debug runs at seq_len 64, batch 8 unless --seq-len is given")
    sp.add_argument("--checkpoint-every", type=int, default=10)
    sp.add_argument("--steps", type=int, default=None,
                    help="default: 2 x checkpoint_every + 5 (debug: 10 x checkpoint_every)")
    sp.add_argument("--lost", type=int, default=3, help="steps past the checkpoint before the kill")
    sp.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="moeops-bench-") as tmp:
        result = {"layouts": layouts, "compression": compression, "recovery": recovery, "memory": memory,
                  "same_loss": same_loss}[a.what](a, Path(tmp))
    print(f"written {save(a.what, 'bench.distributed', result, argv)}")


if __name__ == "__main__":
    main()
