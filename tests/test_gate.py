"""The gate's pieces: the paired bootstrap, rules; the stage's bad input. Per-document scoring (shared
with evaluate): test_scoring; the whole stage over real exported models: test_gate_champion, test_e2e."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from conftest import run_stage

from moeops.evaluate.gate import decide, markdown_report, paired_bootstrap, rule


def test_paired_bootstrap_decides_by_the_upper_bound():
    rng = np.random.default_rng(1)
    champion_D = rng.uniform(1e3, 1e5, 60)
    same = paired_bootstrap(champion_D, champion_D.copy(), 0.95, 500, 0)
    assert same["relative_change"] == 0 and same["upper_bound"] == 0
    worse = paired_bootstrap(champion_D * 1.05, champion_D, 0.95, 500, 0)
    assert worse["relative_change"] == pytest.approx(0.05)
    assert worse["upper_bound"] >= 0.05 - 1e-9  # every document is 5% worse: no doubt about it
    noisy_D = champion_D * rng.normal(1.0, 0.05, 60)  # no systematic change, noise per document
    noisy = paired_bootstrap(noisy_D, champion_D, 0.95, 500, 0)
    assert noisy["upper_bound"] > noisy["relative_change"]  # a real interval, not a point
    assert noisy["upper_bound"] < 0.05
    assert paired_bootstrap(noisy_D, champion_D, 0.95, 500, 0) == noisy  # seeded
    assert paired_bootstrap(noisy_D, champion_D, 0.99, 500, 0)["upper_bound"] > noisy["upper_bound"]
    # A regression hidden in a few documents is caught once it is large enough.
    bad_D = champion_D.copy()
    bad_D[:6] *= 1.5
    assert paired_bootstrap(bad_D, champion_D, 0.95, 500, 0)["upper_bound"] > 0.01


def test_rules_and_report():
    rules = [rule("max_bits_per_byte", 1.5, 2.0, "ok"), rule("max_file_mb", 20.0, 16.0, "too big"),
             rule("max_regression", None, 0.01, "no champion")]
    assert [r["verdict"] for r in rules] == ["pass", "fail", "skip"]
    assert decide(rules) == ("reject", ["max_file_mb: too big"])
    assert decide([rules[0], rules[2]]) == ("promote", [])
    gate = {"decision": "reject", "reasons": ["max_file_mb: too big"], "rules": rules, "champion": None,
            "candidate": {"variant": "onnx_int8", "path": "exports/onnx/int8", "documents": 3, "bytes": 1000}}
    md = markdown_report(gate)
    assert md.startswith("# Gate: **REJECT**") and "| max_file_mb | 20 | 16 | ❌ fail | too big |" in md
    assert "## Why rejected" in md and "no champion yet" in md


def test_stage_without_a_candidate_is_one_line_exit_2(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"gate": {"candidate": "onnx_int4"}}))
    proc = run_stage("gate", tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: exports/onnx/int4/model.onnx: missing candidate (gate.candidate: "
                                   "onnx_int4); run the export stage")
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "reports").exists()
