"""DVC stage `corpus`: list the source files into data/corpus/manifest.jsonl (path, size, sha256).

The stage is always_changed; an unchanged manifest keeps every later stage cached.
"""

from __future__ import annotations

from moeops.cli import run_main
from moeops.config import load_section
from moeops.data.corpus import write_manifest

MANIFEST = "data/corpus/manifest.jsonl"


def main() -> None:
    params = load_section("corpus")
    entries = write_manifest(params.source, params.extensions, MANIFEST)
    total = sum(e["size"] for e in entries)
    print(f"corpus: {len(entries)} files, {total / 1e6:.1f} MB -> {MANIFEST}")


if __name__ == "__main__":
    run_main(main)
