"""`python -m bench.run NAME [ARGS...]`: run one benchmark with the arguments BENCHMARKS.md quotes
(ARGS are appended, so a later option overrides a default), save bench/results/<name>.json with
the machine, command, date and the spread of repeated runs, and print it.

    python -m bench.run --list     the names, their commands and rough run times on the 2-core laptop
    python -m bench.run            (`make bench`) train_step and tokenize

$MOEOPS_BENCH_OUT=DIR writes the results there instead (scratch runs)."""

from __future__ import annotations

import importlib
import sys

from bench.common import machine  # noqa: F401  (bench scripts and older code import it from here)

# name -> (module, default arguments, rough wall time on the 2-core reference laptop, what it needs)
BENCHES: dict[str, tuple[str, list[str], str, str]] = {
    "train_step": ("bench.train_step", ["--repeats", "7"], "2 min", ""),
    "profile_step": ("bench.profile_step", [], "1 min", ""),
    "step_candidates": ("bench.step_candidates", ["--repeats", "5"], "3 min", ""),
    "tokenize": ("bench.tokenize", ["--repeats", "3"], "1 min", ""),
    "inference": ("bench.inference", ["--rounds", "7"], "2 min", "make pipeline's models and exports"),
    "layouts": ("bench.distributed", ["layouts", "--steps", "8", "--repeats", "3"], "15 min", "data/prepared"),
    "same_loss": ("bench.distributed", ["same_loss", "--flavor", "debug", "--steps", "20"], "4 min", "data/prepared"),
    "compression": ("bench.distributed", ["compression", "--steps", "100"], "15 min", "data/prepared"),
    "recovery": ("bench.distributed", ["recovery", "--repeats", "3"], "8 min", "data/prepared"),
    "memory": ("bench.distributed", ["memory", "--steps", "6", "--repeats", "3"], "3 min", "data/prepared"),
    "balance": ("bench.balance", ["--steps", "120", "--warmup", "40"], "30 min", "data/prepared"),
    "gate_registry": ("bench.gate_registry", ["--repeats", "3"], "13 min", "make pipeline's exports and metrics"),
    "pipeline": ("bench.pipeline", [], "32 min", "a committed checkout (runs `dvc repro` in a fresh clone)"),
    "dense_vs_moe": ("bench.dense_vs_moe", [], "60 min", "data/prepared"),
    "arch_search": ("bench.arch_search", [], "60 min",
                    "a committed checkout (`dvc exp run --queue` per search.grid point in a fresh clone)"),
    "serve": ("bench.serve", ["--repeats", "3"], "6 min", "make pipeline's exports and data/prepared"),
    "canary": ("bench.canary", ["--repeats", "3"], "5 min", "make pipeline's exports and data/prepared; prometheus"),
    "tenants": ("bench.tenants", ["--repeats", "3", "--duration", "20"], "4 min",
                "make pipeline's exports and data/prepared"),
    "moe_layer": ("bench.moe_layer", ["--repeats", "5"], "2 min", "a CUDA GPU for the targets (on CPU: ratios only)"),
    "grouped_gemm": ("bench.grouped_gemm", ["--repeats", "5"], "1 min", "a CUDA GPU and triton (else: skipped)"),
}
DEFAULT = ["train_step", "tokenize"]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--list"]:
        for name, (module, args, minutes, needs) in BENCHES.items():
            needs = f"   (needs {needs})" if needs else ""
            print(f"{name:14} ~{minutes:7} python -m {module} {' '.join(args)}{needs}")
        return
    if not argv:
        for name in DEFAULT:
            main([name])
        return
    name, extra = argv[0], argv[1:]
    if name not in BENCHES:
        raise SystemExit(f"error: unknown benchmark {name!r}; one of: {', '.join(BENCHES)}")
    module, args, _, _ = BENCHES[name]
    importlib.import_module(module).main([*args, *extra])


if __name__ == "__main__":
    main()
