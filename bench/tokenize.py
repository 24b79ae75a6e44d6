"""Tokenizing the default corpus (the stdlib): tokenizer training + encoding, and the whole
corpus + prepare stages, in fresh directories, repeated; every figure as median (min-max).

    python -m bench.tokenize [--repeats 3]

Writes bench/results/tokenize.json. The target (tokenizing <= 60 s) counts as met only when the
slowest repeat meets it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import save, spread, verdict

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 60


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
    s = {k: spread((r[k] for r in rows), 2) for k in ("wall", "tok", "enc")}
    total = spread((r["tok"] + r["enc"] for r in rows), 2)
    return {"repeats": repeats, "tokens": rows[0]["tokens"],
            "train_tokenizer_s": s["tok"]["median"], "encode_s": s["enc"]["median"],
            "tokenize_s": total["median"], "corpus_plus_prepare_wall_s": s["wall"]["median"],
            "spread": {"train_tokenizer_s": s["tok"], "encode_s": s["enc"], "tokenize_s": total,
                       "corpus_plus_prepare_wall_s": s["wall"]},
            "target_s": TARGET_S, "verdict": verdict(total, TARGET_S, higher_is_better=False)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.tokenize")
    ap.add_argument("--repeats", type=int, default=3)
    result = run(ap.parse_args(argv).repeats)
    print(json.dumps(result, indent=2))
    print(f"written {save('tokenize', 'bench.tokenize', argv, result)}")


if __name__ == "__main__":
    main()
