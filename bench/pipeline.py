"""`make pipeline` from an empty workspace, timed stage by stage: `dvc repro` then `python -m moeops.summary`
(the Makefile's pipeline target minus the venv bootstrap) in a fresh `git clone` of this
repository's HEAD, with this venv and its JIT-built DeepSpeed ops. Every stage metric the run
writes (metrics/*.json: data, pretrain, distill, quantize, export, eval, gate) is kept, so the
quality, size, parity and evaluate-stage figures BENCHMARKS.md quotes come from this file too.

    python -m bench.pipeline [--repeats 1] [--params overrides.yaml] [--keep DIR] [--cache DIR]

--params merges a YAML of params sections into the clone's params.yaml (e.g. a debug flavor and
a small corpus for a quick check). Uncommitted changes are not measured: commit first.
Writes bench/results/make_pipeline.json (bench/results/pipeline.json holds the earlier,
hand-timed runs). Wall times as median (min-max) over the repeats; the target (<= 20 min)
counts as met only when the slowest repeat meets it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import save, spread, verdict

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 20 * 60


def clone(dst: Path, overrides: dict) -> str:
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(dst)], check=True, capture_output=True)
    if overrides:
        params = yaml.safe_load((dst / "params.yaml").read_text())
        for section, values in overrides.items():
            params[section] = {**params.get(section, {}), **values} if isinstance(values, dict) else values
        (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return subprocess.run(["git", "-C", str(dst), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def env(project: Path) -> dict:
    venv_bin = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=f"{venv_bin}:{os.environ.get('PATH', '')}", PYTHONPATH=str(project),
                PYTHONHASHSEED="0", TORCH_EXTENSIONS_DIR=str(REPO / ".torch_extensions"),
                PREFECT_HOME=str(project / ".prefect"), DVC_NO_ANALYTICS="1", DO_NOT_TRACK="1")


def stages(project: Path) -> list[str]:
    """dvc.yaml's stages in file order (which is their dependency order)."""
    return list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])


def run_once(project: Path, overrides: dict, cache: Path | None = None) -> dict:
    """`dvc repro` one stage at a time (`--single-item`, in dependency order: the same work as one
    `dvc repro`), each timed, then the summary."""
    commit = clone(project, overrides)
    if cache:  # outputs land in this DVC cache too: `dvc checkout` elsewhere after copying dvc.lock
        subprocess.run(["dvc", "cache", "dir", "--local", str(cache.resolve())], cwd=project, env=env(project),
                       check=True, capture_output=True)
    log = project / "bench-pipeline.log"
    stage_s = {}
    t0 = time.perf_counter()
    with open(log, "w") as out:
        # --no-run-cache: a stage run before with the same deps (in a shared --cache) runs again.
        cmds = [(name, ["dvc", "repro", "--single-item", "--no-run-cache", name]) for name in stages(project)]
        for name, cmd in [*cmds, ("summary", [sys.executable, "-m", "moeops.summary"])]:
            t = time.perf_counter()
            proc = subprocess.run(cmd, cwd=project, env=env(project), stdout=out, stderr=subprocess.STDOUT)
            stage_s[name] = round(time.perf_counter() - t, 1)
            if proc.returncode:
                tail = log.read_text()[-3000:]
                raise SystemExit(f"error: {' '.join(cmd)} exited {proc.returncode} in {project}:\n{tail}")
    wall = time.perf_counter() - t0
    metrics = {p.stem: json.loads(p.read_text()) for p in sorted((project / "metrics").glob("*.json"))}
    return {"commit": commit, "wall_s": round(wall, 1), "stage_s": stage_s,
            "stage_share": {k: round(v / wall, 3) for k, v in stage_s.items()}, "metrics": metrics,
            "summary": log.read_text().split("\n")[-60:]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--params", type=Path, help="YAML of params.yaml sections merged into the clone's")
    ap.add_argument("--keep", type=Path, help="keep the clones under this directory (default: a temp dir, removed)")
    ap.add_argument("--cache", type=Path, help="the clones' DVC cache (e.g. this checkout's .dvc/cache)")
    a = ap.parse_args(argv)
    overrides = yaml.safe_load(a.params.read_text()) if a.params else {}
    runs = []
    with tempfile.TemporaryDirectory(prefix="moeops-bench-pipeline-") as tmp:
        base = a.keep or Path(tmp)
        for r in range(a.repeats):
            project = base / f"clone-{r}"
            if project.exists():
                shutil.rmtree(project)
            runs.append(run_once(project, overrides, a.cache))
            print(f"#{r}: {runs[-1]['wall_s']} s", flush=True)
    wall = spread((r["wall_s"] for r in runs), 1)
    target = verdict(wall, TARGET_S, higher_is_better=False) if not overrides else "n/a (params overridden)"
    result = {"repeats": a.repeats, "params_overrides": overrides, "wall_s": wall, "target_s": TARGET_S,
              "verdict": target, "runs": runs}
    print(json.dumps({"wall_s": wall, "verdict": result["verdict"], "stage_s": [r["stage_s"] for r in runs]}, indent=2))
    print(f"written {save('make_pipeline', 'bench.pipeline', argv, result)}")


if __name__ == "__main__":
    main()
