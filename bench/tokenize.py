"""Tokenizing the default corpus (the stdlib): tokenizer training + encoding, and the whole
prepare stage, median of several runs in fresh directories.

    python -m bench.tokenize [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def run(repeats: int) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    env = dict(os.environ, PYTHONPATH=str(REPO))
    rows = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "params.yaml").write_text(yaml.safe_dump({k: params[k] for k in ("corpus", "prepare")}))
            t = time.perf_counter()
            for stage in ("corpus", "prepare"):
                subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=d, env=env, check=True,
                               capture_output=True)
            wall = time.perf_counter() - t
            m = json.loads((Path(d) / "metrics/data.json").read_text())
            rows.append({"wall": wall, "tok": m["tokenizer_seconds"], "enc": m["encode_seconds"],
                         "tokens": m["train"]["n_tokens"] + m["val"]["n_tokens"]})
    med = {k: statistics.median(r[k] for r in rows) for k in ("wall", "tok", "enc")}
    return {"repeats": repeats, "tokens": rows[0]["tokens"],
            "train_tokenizer_s": round(med["tok"], 2), "encode_s": round(med["enc"], 2),
            "tokenize_s": round(med["tok"] + med["enc"], 2), "corpus_plus_prepare_wall_s": round(med["wall"], 2),
            "target_s": 60}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    print(json.dumps(run(ap.parse_args().repeats), indent=2))


if __name__ == "__main__":
    main()
