"""`make bench`: run every benchmark, save bench/results/<name>.json with the machine and
date, and print them. BENCHMARKS.md quotes these files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch

from bench import inference, tokenize, train_step

OUT = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat()}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    which = sys.argv[1:] or ["train_step", "tokenize"]
    runs = {
        "train_step": lambda: train_step.run("small", 16, 256, 5, torch.get_num_threads()),
        "tokenize": lambda: tokenize.run(3),
        "inference": lambda: inference.run(),
    }
    for name in which:
        result = {"machine": machine(), "command": f"python -m bench.run {name}", **runs[name]()}
        (OUT / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
