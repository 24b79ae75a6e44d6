"""bench.arch_search end to end on the debug flavor: a scratch clone of HEAD, 2 grid points x 3 steps
queued with `dvc exp run --queue`, run by `dvc queue start -j 2`, compared through `dvc exp show` and
`dvc plots diff`. About a minute: two queued experiments, each a DVC temp workspace and a pretrain stage."""

from __future__ import annotations

import json
import math

import yaml

from bench import arch_search
from tests.conftest import make_corpus

GRID = [{"n_routed_experts": 8, "top_k": 2, "moe_inter_dim": 32, "n_shared_experts": 1},
        {"n_routed_experts": 4, "top_k": 2, "moe_inter_dim": 32, "n_shared_experts": 1}]


def test_arch_search_queues_every_point_and_collects_finite_metrics(tmp_path, monkeypatch):
    overrides = {
        "corpus": {"source": str(make_corpus(tmp_path / "corpus"))},
        "prepare": {"vocab_size": 384, "val_fraction": 0.2, "val_fraction_tolerance": 0.2, "max_val_doc_share": 0.5},
        "pretrain": {"batch_size": 8, "seq_len": 64, "log_every": 1, "threads": 1},
        "evaluate": {"max_tokens_per_doc": 512},
        "search": {"flavor": "debug", "steps": 3, "workers": 2, "grid": GRID},
    }
    (tmp_path / "over.yaml").write_text(yaml.safe_dump(overrides, sort_keys=False))
    monkeypatch.setenv("MOEOPS_BENCH_OUT", str(tmp_path / "out"))
    arch_search.main(["--params", str(tmp_path / "over.yaml"), "--keep", str(tmp_path / "clone")])

    result = json.loads((tmp_path / "out" / "arch_search.json").read_text())
    assert list(result["points"]) == ["e8-k2-w32-s1", "e4-k2-w32-s1"]
    for point, p in zip(GRID, result["points"].values()):
        assert p["model"] == point  # the -S ++pretrain.model.* overrides reached the experiment's params
        for key in ("val_bits_per_byte", "val_bits_per_byte_macro", "tokens_per_s", "train_seconds"):
            assert math.isfinite(p[key]) and p[key] > 0, key
        assert p["curve"]["step"] == [1, 2, 3] and all(math.isfinite(v) for v in p["curve"]["loss"])
    assert result["points"]["e8-k2-w32-s1"]["params_total"] > result["points"]["e4-k2-w32-s1"]["params_total"]
    assert (tmp_path / "out" / "arch_search.png").stat().st_size > 0
    assert (tmp_path / "out" / "arch_search" / "index.html").is_file()
