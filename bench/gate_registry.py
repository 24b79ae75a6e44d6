"""What the evaluation gate and the model registry cost, and what the gate's bootstrap resolves,
on a pipeline's real exports (issue 5 sets no speed target; these are measurements).

    python -m bench.gate_registry [--project .] [--repeats 3] [--champion onnx_int8]
                                  [--candidates onnx_fp32 onnx_int4] [--strict 0.001]

Everything runs the way the pipeline runs it, in a scratch copy of the project (its params.yaml,
dvc.lock, data/prepared, exports, metrics), with the scratch copy a git repository (so GTO tags
are written too) and $MOEOPS_REGISTRY pointing at scratch registries; the project itself is not
touched. Per repeat, interleaved:

  1. `python -m stages.gate` with no champion, for the champion variant and every candidate;
  2. `moeops promote --from-gate` of the champion variant into a fresh registry (CLI wall time), and
     `promote_from_gate` in this process into another fresh registry (register + promote + tags,
     without interpreter start-up and imports: one untimed warm-up call first);
  3. `moeops registry verify` of that version; the gate with the champion for every candidate
     (both models scored, then the paired bootstrap); the gate of the champion's own variant and
     `moeops promote --from-gate` on it (already the champion: nothing registered);
  4. the paired bootstrap alone (`paired_bootstrap`, the gate's samples and confidence) on
     per-document bits of the same document count, synthetic: its cost, not its verdict.

The bootstrap's resolution (relative change, upper bound, standard error, decision) is read from
each candidate's metrics/gate.json (deterministic: seed from params); with --strict the last
candidate is also gated at that max_regression. Every time is reported as median (min-max).
Writes bench/results/gate_registry.json.
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

from bench.common import save, spread

REPO = Path(__file__).resolve().parents[1]
COPY = ["params.yaml", "dvc.lock", "data/prepared", "exports", "metrics"]


def scratch_project(project: Path, tmp: Path) -> Path:
    """A copy of what the gate and the promotion read, as a git repository with one commit."""
    dst = tmp / "project"
    dst.mkdir()
    for rel in COPY:
        src = project / rel
        if not src.exists():
            raise SystemExit(f"error: {src}: missing; run `make pipeline` (or pass --project) first")
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst / rel)
    (dst / ".gitignore").write_text("/data\n/exports\n/metrics\n/reports\n/registries\n")
    ident = ["-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for cmd in (["init", "-q"], ["add", ".gitignore", "params.yaml", "dvc.lock"],
                [*ident, "commit", "-q", "-m", "bench"]):
        subprocess.run(["git", "-C", str(dst), *cmd], check=True, capture_output=True)
    return dst


def env(registry: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), PYTHONHASHSEED="0", MOEOPS_REGISTRY=str(registry),
                DVC_NO_ANALYTICS="1", DO_NOT_TRACK="1")


def timed(cmd: list[str], cwd: Path, registry: Path, ok: tuple[int, ...] = (0,)) -> tuple[float, str]:
    """Wall seconds of a command; a return code outside `ok` stops the bench with its output."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env(registry), capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode not in ok:
        output = proc.stdout[-2000:] + proc.stderr[-3000:]
        raise SystemExit(f"error: {' '.join(cmd)} exited {proc.returncode}:\n{output}")
    return wall, proc.stdout + proc.stderr


def set_gate(project: Path, **values) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["gate"] = {**params.get("gate", {}), **values}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_gate(project: Path, registry: Path, candidate: str, **values) -> tuple[float, dict]:
    set_gate(project, candidate=candidate, **values)
    wall, _ = timed([sys.executable, "-m", "stages.gate"], project, registry)
    return wall, json.loads((project / "metrics/gate.json").read_text())


def drop_tags(project: Path) -> None:
    """Every promotion is timed as a first one: no GTO tags from an earlier scratch registry."""
    tags = subprocess.run(["git", "-C", str(project), "tag", "-l"], capture_output=True, text=True).stdout.split()
    if tags:
        subprocess.run(["git", "-C", str(project), "tag", "-d", *tags], check=True, capture_output=True)


def promote_cli(project: Path, registry: Path) -> tuple[float, str]:
    drop_tags(project)
    return timed([sys.executable, "-m", "moeops", "promote", "--from-gate", "metrics/gate.json"], project, registry)


def promote_in_process(project: Path, registry: Path) -> float:
    from moeops.registry.promotion import promote_from_gate

    old = os.environ.get("MOEOPS_REGISTRY")
    os.environ["MOEOPS_REGISTRY"] = str(registry)
    drop_tags(project)
    try:
        t = time.perf_counter()
        out = promote_from_gate(Path("metrics/gate.json"), project)
        wall = time.perf_counter() - t
    finally:
        os.environ.pop("MOEOPS_REGISTRY") if old is None else os.environ.__setitem__("MOEOPS_REGISTRY", old)
    if not out["registered"]:
        raise SystemExit(f"error: promote_from_gate registered nothing: {out}")
    return wall


def resolution(gate: dict) -> dict:
    champ = gate.get("champion") or {}
    boot = champ.get("bootstrap") or {}
    rule = next((r for r in gate["rules"] if r["rule"] == "max_regression"), {})
    return {"decision": gate["decision"], "candidate_bits_per_byte": gate["candidate"]["bits_per_byte"],
            "champion_bits_per_byte": champ.get("bits_per_byte"), "documents": gate["candidate"]["documents"],
            "bytes": gate["candidate"]["bytes"], "max_regression": rule.get("threshold"),
            **{k: boot.get(k) for k in ("relative_change", "upper_bound", "standard_error", "method")}}


def bootstrap_seconds(documents: int, samples: int, confidence: float, repeats: int) -> list[float]:
    import numpy as np

    from moeops.evaluate.bootstrap import paired_bootstrap

    rng = np.random.default_rng(0)
    champion_D = rng.lognormal(8, 1, documents)
    candidate_D = champion_D * (1.002 + rng.normal(0, 0.002, documents))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        paired_bootstrap(candidate_D, champion_D, confidence, samples, 0)
        times.append(time.perf_counter() - t)
    return times


def dir_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6, 2)


def run(project: Path, repeats: int, champion: str, candidates: list[str], strict: float | None) -> dict:
    variants = [champion, *candidates]
    t: dict[str, list[float]] = {k: [] for k in ("promote_cli", "promote_in_process", "verify_cli",
                                                   "promote_already_champion_cli")}
    no_champ: dict[str, list[float]] = {v: [] for v in variants}
    with_champ: dict[str, list[float]] = {v: [] for v in variants}
    res: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="moeops-bench-gate-") as tmp:
        p = scratch_project(project, Path(tmp))
        regs = p / "registries"
        gate_params = yaml.safe_load((p / "params.yaml").read_text()).get("gate", {})
        name = yaml.safe_load((p / "params.yaml").read_text()).get("registry", {}).get("name", "moeops")
        version_mb = None
        for r in range(repeats):
            empty = regs / f"empty-{r}"
            for v in [*candidates, champion]:  # 1. no champion: budgets only, one model scored
                wall, gate = run_gate(p, empty, v)
                no_champ[v].append(wall)
                print(f"#{r} gate {v}, no champion: {wall:.1f} s ({gate['decision']})", flush=True)
                if gate["decision"] != "promote" and v == champion:
                    raise SystemExit(f"error: the gate rejected {champion} against no champion: {gate['reasons']}")
            registry = regs / f"cli-{r}"  # 2. register + promote (+ tags) of the champion's gate.json, twice
            t["promote_cli"].append(promote_cli(p, registry)[0])
            if r == 0:  # untimed: the first call pays this process's imports, which the CLI time shows
                promote_in_process(p, regs / "warm-up")
            t["promote_in_process"].append(promote_in_process(p, regs / f"inproc-{r}"))
            version_mb = dir_mb(registry)  # the one registered version (plus aliases, audit log)
            t["verify_cli"].append(timed([sys.executable, "-m", "moeops", "registry", "verify", name], p,
                                         registry)[0])
            for v in candidates:  # 3. against the champion
                wall, gate = run_gate(p, registry, v)
                with_champ[v].append(wall)
                res[v] = resolution(gate)
                print(f"#{r} gate {v} vs champion {champion}: {wall:.1f} s, {res[v]}", flush=True)
            wall, gate = run_gate(p, registry, champion)
            with_champ[champion].append(wall)
            res[champion] = resolution(gate)
            t["promote_already_champion_cli"].append(promote_cli(p, registry)[0])
            print(f"#{r} register+promote CLI {t['promote_cli'][-1]:.2f} s, in process "
                  f"{t['promote_in_process'][-1]:.3f} s, verify {t['verify_cli'][-1]:.2f} s, "
                  f"promote (already champion) {t['promote_already_champion_cli'][-1]:.2f} s", flush=True)
        if strict is not None and candidates:
            _, gate = run_gate(p, regs / f"cli-{repeats - 1}", candidates[-1], max_regression=strict)
            res[f"{candidates[-1]}@max_regression={strict}"] = resolution(gate)
        documents = res[champion]["documents"]
    boot = bootstrap_seconds(documents, gate_params.get("bootstrap_samples", 2000), gate_params.get("confidence", 0.95),
                             max(repeats, 3))
    return {
        "project": str(project.resolve()), "repeats": repeats, "champion": champion, "candidates": candidates,
        "gate_params": gate_params,
        "gate_no_champion_s": {v: spread(ts, 2) for v, ts in no_champ.items()},
        "gate_with_champion_s": {v: spread(ts, 2) for v, ts in with_champ.items()},
        "register_promote_tags_cli_s": spread(t["promote_cli"], 3),
        "register_promote_tags_in_process_s": spread(t["promote_in_process"], 4),
        "registered_version_mb": version_mb,
        "verify_cli_s": spread(t["verify_cli"], 3),
        "promote_already_champion_cli_s": spread(t["promote_already_champion_cli"], 3),
        "bootstrap_s": spread(boot, 4),
        "resolution_vs_champion": res,
        "note": "times: wall seconds per repeat of the real CLI / stage (interpreter start-up and imports included) "
                "unless in_process; resolution: from metrics/gate.json of the last repeat (deterministic); "
                "bootstrap_s: paired_bootstrap alone on synthetic per-document bits of the same document count",
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.gate_registry", description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", type=Path, default=Path("."), help="a project after `make pipeline` (default: .)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--champion", default="onnx_int8", help="the variant registered as champion")
    ap.add_argument("--candidates", nargs="*", default=["onnx_fp32", "onnx_int4"])
    ap.add_argument("--strict", type=float, default=0.001,
                    help="also gate the last candidate at this max_regression (negative: skip)")
    a = ap.parse_args(argv)
    result = run(a.project, a.repeats, a.champion, a.candidates, a.strict if a.strict >= 0 else None)
    print(json.dumps({k: v for k, v in result.items() if k not in ("gate_params",)}, indent=2))
    print(f"written {save('gate_registry', 'bench.gate_registry', argv, result)}")


if __name__ == "__main__":
    main()
