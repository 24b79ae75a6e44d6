"""What every bench script shares: the machine a result was measured on, the spread of repeated
runs, a target verdict read off the spread's lower end, and saving bench/results/<name>.json.

$MOEOPS_BENCH_OUT redirects the results to another directory (a scratch run must not overwrite
the figures BENCHMARKS.md quotes)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def out_dir() -> Path:
    return Path(os.environ.get("MOEOPS_BENCH_OUT") or RESULTS)


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def machine() -> dict:
    """CPU model, cores, memory, library versions, date: enough to tell two machines apart."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor())
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        mem_gib = None
    return {"cpu": cpu, "cores": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "memory_gib": mem_gib, "host": platform.node(), "python": platform.python_version(),
            "torch": _version("torch"), "onnxruntime": _version("onnxruntime"),
            "date": datetime.date.today().isoformat()}


def spread(values, ndigits: int = 4) -> dict | None:
    """Per-repeat values and their min / median / max (None when there are none)."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    r = lambda v: round(v, ndigits)  # noqa: E731
    return {"n": len(values), "values": [r(v) for v in values], "min": r(min(values)),
            "median": r(statistics.median(values)), "max": r(max(values))}


def verdict(s: dict | None, target: float, higher_is_better: bool = True) -> str:
    """"met" only when the worst end of a spread of at least 2 repeats meets the target; "not met"
    when even the best end misses it; else "not confirmed" (the spread straddles the target, or a
    single value has no spread)."""
    if not s:
        return "not confirmed"
    worst, best = (s["min"], s["max"]) if higher_is_better else (s["max"], s["min"])
    ok = (lambda v: v >= target) if higher_is_better else (lambda v: v <= target)
    if not ok(best):
        return "not met"
    return "met" if ok(worst) and s["n"] >= 2 else "not confirmed"


def print_spread(result: dict, title: str = "figure", width: int = 45) -> None:
    """result's ratio_spread as a table: median, min, max, the target (result["targets"]) and its verdict."""
    print(f"\n{title:{width}}{'median':>10}{'min':>10}{'max':>10}{'target':>10}  verdict")
    for k, s in result["ratio_spread"].items():
        if s is None:
            continue
        t = result["targets"].get(k)
        target = f"{'>=' if t['higher_is_better'] else '<='}{t['target']:g}" if t else ""
        print(f"{k:{width}}{s['median']:>10}{s['min']:>10}{s['max']:>10}{target:>10}  {result['verdicts'].get(k, '')}")


def save(name: str, module: str, argv: list[str] | None, result: dict) -> Path:
    """bench/results/<name>.json (or $MOEOPS_BENCH_OUT/<name>.json): machine, command, time, result."""
    out = out_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    args = sys.argv[1:] if argv is None else argv
    record = {"machine": machine(), "command": shlex.join(["python", "-m", module, *args]),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), **result}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    return path
