"""DVC stage `prepare`: manifest -> filtered, split, tokenized and validated data in data/prepared.

Paths are relative to the working directory (DVC runs stages from the repo root), which is also
how the tests run it against a corpus of their own.
"""

from __future__ import annotations

from pathlib import Path

from moeops.cli import run_main
from moeops.config import load_section
from moeops.data.prepare import prepare

MANIFEST = Path("data/corpus/manifest.jsonl")
OUT = Path("data/prepared")
REPORTS = Path("reports/data")
METRICS = Path("metrics/data.json")


def main() -> dict:
    params = load_section("prepare")
    # The evaluation's cap per val document: the suite bounds the largest one's share after it.
    max_tokens_per_doc = load_section("evaluate").max_tokens_per_doc
    metrics = prepare(params, MANIFEST, OUT, REPORTS, METRICS, max_tokens_per_doc)
    splits = ", ".join(f"{s} {metrics[s]['n_docs']} docs / {metrics[s]['n_tokens']} tokens" for s in ("train", "val"))
    skipped = sum(metrics["skipped"].values())
    print(f"prepare: {splits}; {skipped} skipped ({metrics['skipped']['empty']} empty, "
          f"{100 * metrics['skipped_bytes_fraction']:.2f}% of bytes); tokenizer {metrics['tokenizer_seconds']:.1f}s, "
          f"encode {metrics['encode_seconds']:.1f}s, validate {metrics['validate_seconds']:.1f}s -> {OUT}")
    for warning in metrics["warnings"]:  # on stdout: stderr is for errors, and this is not one
        print(f"prepare: warning: {warning}")
    return metrics


if __name__ == "__main__":
    run_main(main)
