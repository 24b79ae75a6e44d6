"""Architecture search the DVC way (`make search`): one `dvc exp run --queue` experiment per point of
params.yaml's `search.grid`, `dvc queue start -j search.workers`, then `dvc exp show` and `dvc plots
diff` to compare, in a fresh `git clone` of this repository's HEAD (as bench/pipeline.py makes one):

    python -m bench.arch_search [--steps N] [--grid-limit K] [--params overrides.yaml] [--cache DIR] [--keep DIR]

Each experiment is the pretrain stage (and what it pulls upstream: prepare is reproduced once in the
clone before queueing, so every experiment finds it up to date) with pretrain.flavor = search.flavor,
pretrain.steps = search.steps, pretrain.seq_len capped at the flavor's context, warmup capped at the
steps, and the point's keys set under pretrain.model with `-S ++pretrain.model.<key>=<value>` (`++`:
add the key, or override it; a plain `-S key=value` refuses a key params.yaml does not have). The
commands are printed as a user would type them (README "Architecture search").

Per point: val bits-per-byte micro and macro (metrics/pretrain.json "val", the shared evaluation),
tokens/s, active and total parameters, train seconds, and the train loss curve (`dvc plots diff
--json`). Writes bench/results/arch_search.json, arch_search.png (val bits/byte per point, loss
curves) and arch_search/ (`dvc plots diff`'s HTML). --params merges a YAML of params sections into
the clone's params.yaml (a smaller corpus, a debug search); --cache shares a DVC cache (e.g. this
checkout's .dvc/cache: prepare becomes a cache hit). Uncommitted changes are not measured: commit first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from bench import pipeline
from bench.common import out_dir, save

ABBREV = {"n_routed_experts": "e", "top_k": "k", "moe_inter_dim": "w", "n_shared_experts": "s"}
LOSS = "dvclive/pretrain/plots/metrics/train/loss.tsv"
METRICS = "metrics/pretrain.json"


def exp_name(point: dict) -> str:
    """e16-k4-w32-s2 for {n_routed_experts: 16, top_k: 4, moe_inter_dim: 32, n_shared_experts: 2}."""
    name = "-".join(f"{ABBREV.get(k, k)}{v}" for k, v in point.items())
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def exp_commands(search, pretrain: dict, steps: int, cores: int) -> list[list[str]]:
    """`dvc exp run --queue` per grid point, then `dvc queue start`."""
    from moeops.config import make_model_args

    seq_len = min(pretrain["seq_len"], make_model_args(search.flavor).max_seq_len)
    common = [f"pretrain.flavor={search.flavor}", f"pretrain.steps={steps}", f"pretrain.seq_len={seq_len}",
              f"pretrain.warmup_steps={min(pretrain['warmup_steps'], steps)}"]
    if search.workers > 1 and not pretrain["threads"]:  # the workers share the cores
        common.append(f"pretrain.threads={max(1, cores // search.workers)}")
    cmds = []
    for point in search.grid:
        sets = [*common, *(f"++pretrain.model.{k}={json.dumps(v)}" for k, v in point.items())]
        cmds.append(["dvc", "exp", "run", "pretrain", "--queue", "-n", exp_name(point),
                     *[a for s in sets for a in ("-S", s)]])
    return [*cmds, ["dvc", "queue", "start", "-j", str(search.workers)]]


def dvc(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["dvc", *args], cwd=project, env=pipeline.env(project), capture_output=True, text=True)
    if check and proc.returncode:
        raise SystemExit(f"error: dvc {shlex.join(args)} exited {proc.returncode} in {project}:\n"
                         f"{(proc.stderr or proc.stdout)[-3000:]}")
    return proc


def queue_states(project: Path) -> dict[str, str]:
    """{experiment name: Queued | Running | Success | Failed} from `dvc queue status`."""
    states = {}
    for line in dvc(project, "queue", "status").stdout.splitlines():
        cols = line.split()
        if len(cols) >= 3 and cols[-1] in ("Queued", "Running", "Success", "Failed"):
            states[cols[1]] = cols[-1]
    return states


def wait_for_queue(project: Path, names: list[str], poll: float = 2.0) -> dict[str, str]:
    while True:
        states = queue_states(project)
        if all(states.get(n) in ("Success", "Failed") for n in names):
            return states
        time.sleep(poll)


def collect(shown: list[dict], names: list[str]) -> dict[str, dict]:
    """From `dvc exp show --json`: per experiment name, its params.yaml and metrics/pretrain.json."""
    found = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("name") in names:
                    data = rev.get("data") or {}
                    params = data.get("params", {}).get("params.yaml", {}).get("data", {})
                    metrics = data.get("metrics", {}).get(METRICS, {}).get("data", {})
                    found[rev["name"]] = {"rev": rev.get("rev"), "params": params, "metrics": metrics}
    return found


def loss_curves(plots: dict, names: list[str], log_every: int, steps: int) -> dict[str, dict]:
    """From `dvc plots diff --json`: per experiment name, its train losses at their steps (DVC numbers
    the rows of a tsv without an x field 0, 1, ...: row i is step min((i + 1) * log_every, steps))."""
    curves: dict[str, dict] = {n: {"step": [], "loss": []} for n in names}
    for plot in plots["data"][LOSS]:
        for row in plot["content"]["data"]["values"]:
            if row["rev"] in curves:
                curves[row["rev"]]["step"].append(min((int(row["step"]) + 1) * log_every, steps))
                curves[row["rev"]]["loss"].append(float(row["loss"]))
    return curves


def plot(points: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(points)
    axes[0].bar(names, [p["val_bits_per_byte"] for p in points.values()], label="micro")
    axes[0].plot(names, [p["val_bits_per_byte_macro"] for p in points.values()], "kD", label="macro")
    low = min(min(p["val_bits_per_byte"], p["val_bits_per_byte_macro"]) for p in points.values())
    axes[0].set_ylim(bottom=0.95 * low)
    axes[0].set_ylabel("val bits per byte")
    axes[0].tick_params(axis="x", rotation=30)
    axes[0].legend()
    for name, p in points.items():
        axes[1].plot(p["curve"]["step"], p["curve"]["loss"], label=name, linewidth=1)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("train loss (nats/token)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.arch_search", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, help="default: params.yaml's search.steps")
    ap.add_argument("--grid-limit", type=int, help="only the first K grid points")
    ap.add_argument("--params", type=Path, help="YAML of params.yaml sections merged into the clone's")
    ap.add_argument("--cache", type=Path, help="the clone's DVC cache (e.g. this checkout's .dvc/cache)")
    ap.add_argument("--keep", type=Path, help="make the clone here and keep it (default: a temp dir, removed)")
    a = ap.parse_args(argv)
    from moeops.cli import UserError
    from moeops.config import load_section

    overrides = yaml.safe_load(a.params.read_text()) if a.params else {}
    with tempfile.TemporaryDirectory(prefix="moeops-bench-search-") as tmp:
        project = a.keep or Path(tmp) / "clone"
        if project.exists():
            shutil.rmtree(project)
        commit = pipeline.clone(project, overrides)
        try:
            search, pretrain = load_section("search", project / "params.yaml"), load_section("pretrain",
                                                                                            project / "params.yaml")
        except UserError as e:
            raise SystemExit(f"error: {e}") from None
        search.grid = search.grid[:a.grid_limit] if a.grid_limit else search.grid
        steps = a.steps or search.steps
        names = [exp_name(p) for p in search.grid]
        git = ["git", "-C", str(project), "-c", "user.name=moeops-bench", "-c", "user.email=bench@localhost"]
        if a.cache:
            dvc(project, "cache", "dir", "--local", str(a.cache.resolve()))
        t0 = time.perf_counter()
        dvc(project, "repro", "prepare")  # once: every experiment then finds it up to date
        for cmd in (["add", "params.yaml", "dvc.lock", "metrics"],
                    ["commit", "-q", "--allow-empty", "-m", "bench.arch_search: params, prepare and metrics in git"]):
            subprocess.run([*git, *cmd], check=True, capture_output=True)
        prepare_s = time.perf_counter() - t0
        cmds = exp_commands(search, pretrain.model_dump(), steps, os.cpu_count() or 1)
        print("the commands:\n" + "\n".join(f"  {shlex.join(c)}" for c in cmds), flush=True)
        t0 = time.perf_counter()
        for cmd in cmds[:-1]:
            dvc(project, *cmd[1:])
        with open(project / "queue-start.log", "w") as log:  # not a pipe: the workers it starts would hold it open
            if subprocess.run(cmds[-1], cwd=project, env=pipeline.env(project), stdout=log, stderr=log).returncode:
                raise SystemExit(f"error: {shlex.join(cmds[-1])} failed:\n{(project / 'queue-start.log').read_text()}")
        states = wait_for_queue(project, names)
        queue_s = time.perf_counter() - t0
        failed = [n for n in names if states[n] != "Success"]
        for name in failed:
            logs = dvc(project, "queue", "logs", name, check=False).stdout
            print(f"--- dvc queue logs {name} (tail)\n{logs[-3000:]}")
        dvc(project, "queue", "stop", check=False)
        if failed:
            raise SystemExit(f"error: experiments failed: {', '.join(failed)} (in {project})")
        shown = collect(json.loads(dvc(project, "exp", "show", "--json").stdout), names)
        html = out_dir() / "arch_search"
        html.mkdir(parents=True, exist_ok=True)
        dvc(project, "plots", "diff", *names, "--targets", LOSS, "-o", str(html))
        curves = loss_curves(json.loads(dvc(project, "plots", "diff", *names, "--targets", LOSS, "--json").stdout),
                             names, pretrain.log_every, steps)
    points = {}
    for name, point in zip(names, search.grid):
        m = shown[name]["metrics"]
        if "val" not in m:
            raise SystemExit(f"error: {name}: {METRICS} has no val block (stages/pretrain.py at {commit[:8]} "
                             "does not score the teacher)")
        points[name] = {"point": point, "rev": shown[name]["rev"], "model": shown[name]["params"]["pretrain"]["model"],
                        "val_bits_per_byte": m["val"]["bits_per_byte"],
                        "val_bits_per_byte_macro": m["val"]["bits_per_byte_macro"],
                        "tokens_per_s": m["tokens_per_s"], "params_active": m["params_active"],
                        "params_total": m["params_total"], "train_seconds": m["train_seconds"],
                        "final_train_loss": m["final_train_loss"], "curve": curves[name]}
    bad = [n for n, p in points.items() if not all(math.isfinite(p[k]) for k in ("val_bits_per_byte",
                                                                                   "val_bits_per_byte_macro"))]
    if bad:
        raise SystemExit(f"error: non-finite val bits-per-byte: {', '.join(bad)}")
    best = min(points, key=lambda n: points[n]["val_bits_per_byte"])
    out_dir().mkdir(parents=True, exist_ok=True)
    plot(points, out_dir() / "arch_search.png")
    result = {"commit": commit, "params_overrides": overrides, "flavor": search.flavor, "steps": steps,
              "workers": search.workers, "commands": [shlex.join(c) for c in cmds], "prepare_s": round(prepare_s, 1),
              "queue_s": round(queue_s, 1), "points": points,
              "best": best,
              "plot": "bench/results/arch_search.png", "plots_html": "bench/results/arch_search/",
              "note": "one experiment per point (deterministic per params); val = metrics/pretrain.json's val block "
                      "(the shared evaluation); tokens/s and seconds measured with search.workers experiments at once"}
    path = save("arch_search", "bench.arch_search", argv, result)
    from bench.distributed import table

    print(table(["experiment", "active", "total", "tok/s", "train s", "val bpb", "val bpb macro"],
                [[n, p["params_active"], p["params_total"], p["tokens_per_s"], p["train_seconds"],
                  p["val_bits_per_byte"], p["val_bits_per_byte_macro"]] for n, p in points.items()]))
    print(f"best: {best}\nwritten {path}, {out_dir() / 'arch_search.png'} and {html}/")


if __name__ == "__main__":
    main()
