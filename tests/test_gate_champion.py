"""The gate against a real, different champion: the debug student's int8 export is registered and
promoted as champion, then the int4 export of the same student is gated against it, so the paired
bootstrap runs on real per-document scores of two real ONNX models. Also the bootstrap's
calibration on synthetic data with a known standard error.

The student is a seeded, untrained debug model (nothing is trained here); every artifact after it
comes from the real stages (quantize, export, evaluate, gate) and the real registry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import yaml
from conftest import run_stage

from moeops.config import load_model_args, load_section
from moeops.evaluate.gate import paired_bootstrap
from moeops.evaluate.scoring import Document, document_bytes, score_documents, val_documents
from moeops.registry import champion, resolve
from moeops.registry.promotion import promote_from_gate

# Budgets a random debug model meets with room to spare: only max_regression decides below.
LOOSE = {"max_bits_per_byte": 50.0, "max_p95_latency_ms": 1e5, "max_file_mb": 1e3,
         "max_parity_error": {v: 1e3 for v in ("onnx_fp32", "onnx_int8", "onnx_int4")},
         "bootstrap_samples": 500, "threads": 1}


def set_params(project: Path, **sections) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for name, values in sections.items():
        params[name] = {**params.get(name, {}), **values}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def gate_json(project: Path) -> dict:
    return json.loads((project / "metrics/gate.json").read_text())


@pytest.fixture(scope="module")
def judged(exported_project, tmp_path_factory):
    """A project whose registry's champion v1 is the int8 export, and a gate.json of the int4
    export judged against it."""
    project = tmp_path_factory.mktemp("champion") / "project"
    shutil.copytree(exported_project, project)  # a student through quantize, export and evaluate
    set_params(project, registry={"root": "reg", "name": "lm", "gto_tags": "off"}, gate=LOOSE,
               rollout={"canary": False})  # a passing gate promotes at once (the canary: test_rollout)
    (project / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # registered with the version
    run_stage("gate", project)
    first = gate_json(project)
    assert first["decision"] == "promote" and first["champion"] is None
    promoted = promote_from_gate(Path("metrics/gate.json"), project)
    assert promoted["registered"] and champion(project / "reg", "lm") == "v1"
    # evaluate and gate agree on the same model: one evaluation, the same figure to the last digit
    evaluated = json.loads((project / "metrics/eval.json").read_text())["variants"]
    assert first["candidate"]["bits_per_byte"] == pytest.approx(evaluated["onnx_int8"]["bits_per_byte"], rel=1e-9)
    assert first["candidate"]["bits_per_byte_macro"] == pytest.approx(
        evaluated["onnx_int8"]["bits_per_byte_macro"], rel=1e-9)

    set_params(project, gate={"candidate": "onnx_int4"})
    run_stage("gate", project)
    return project, gate_json(project)


def per_document_bits(model_dir: Path, docs: list[Document], stride: int) -> np.ndarray:
    from moeops.export.onnx import OnnxLM

    lm = OnnxLM(model_dir / "model.onnx", threads=1)
    seq_len = load_model_args(model_dir / "config.json").max_seq_len
    return score_documents(lambda x_BS: lm.step(x_BS, np.ones_like(x_BS), None)[0], model_dir / "tokenizer.json",
                           docs, seq_len, stride, 8)["bits"]


def test_int4_candidate_against_the_int8_champion(judged):
    project, gate = judged
    champ = gate["champion"]
    assert gate["candidate"]["variant"] == "onnx_int4"
    assert champ["version"] == "v1" and champ["variant"] == "onnx_int8"
    # The figures again, independently: the same val documents through each model's own files
    # (the champion's from the registry, not from exports/).
    ev = load_section("evaluate", project / "params.yaml")  # the gate scores the evaluation evaluate scores
    docs = val_documents(project / "data/prepared", ev.max_tokens_per_doc)
    bytes_D = document_bytes(docs)
    n_bytes = int(bytes_D.sum())
    assert gate["candidate"]["documents"] == len(docs) and gate["candidate"]["bytes"] == n_bytes
    assert not all(doc.complete for doc in docs)  # the cap (256 tokens) cuts some documents
    cand_D = per_document_bits(project / "exports/onnx/int4", docs, ev.stride)
    champ_D = per_document_bits(resolve(project / "reg", "lm", "v1") / "onnx/int8", docs, ev.stride)
    assert not np.array_equal(cand_D, champ_D)  # two different models: a real bootstrap, not "identical"
    assert gate["candidate"]["bits_per_byte"] == pytest.approx(cand_D.sum() / n_bytes, rel=1e-6)
    assert champ["bits_per_byte"] == pytest.approx(champ_D.sum() / n_bytes, rel=1e-6)
    assert gate["candidate"]["bits_per_byte_macro"] == pytest.approx(np.mean(cand_D / bytes_D), rel=1e-6)
    assert champ["bits_per_byte_macro"] == pytest.approx(np.mean(champ_D / bytes_D), rel=1e-6)
    # the same figures evaluate recorded for these two models (the champion's files are the int8 export's)
    evaluated = json.loads((project / "metrics/eval.json").read_text())["variants"]
    assert gate["candidate"]["bits_per_byte"] == pytest.approx(evaluated["onnx_int4"]["bits_per_byte"], rel=1e-9)
    assert champ["bits_per_byte"] == pytest.approx(evaluated["onnx_int8"]["bits_per_byte"], rel=1e-9)
    boot = champ["bootstrap"]
    assert boot["documents"] == len(docs) and boot["method"] in ("BCa", "percentile")
    expected = (cand_D.sum() - champ_D.sum()) / champ_D.sum()
    assert boot["relative_change"] == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert boot["relative_change"] == pytest.approx(
        (gate["candidate"]["bits_per_byte"] - champ["bits_per_byte"]) / champ["bits_per_byte"], rel=1e-5, abs=1e-9)
    assert boot["upper_bound"] > boot["relative_change"]  # a real interval over real per-document noise
    rules = {r["rule"]: r for r in gate["rules"]}
    assert rules["max_regression"]["value"] == boot["upper_bound"]


def test_decision_follows_max_regression_both_ways(judged):
    """max_regression (which must be >= 0) just above and just below the recorded upper bound. Of
    two real models one is the worse: when the int4 export is not provably worse than the int8
    champion (the sign of a random model's quantization error is chance), it is promoted (v2) and
    the int8 export is judged against it instead, whose bound is then above zero."""
    project, gate = judged
    if gate["champion"]["bootstrap"]["upper_bound"] <= 0:
        assert gate["decision"] == "promote"
        assert promote_from_gate(Path("metrics/gate.json"), project)["champion"] == "v2"
        set_params(project, gate={"candidate": "onnx_int8"})
        run_stage("gate", project)
        gate = gate_json(project)
        assert gate["champion"]["version"] == "v2" and gate["champion"]["variant"] == "onnx_int4"
        assert gate["champion"]["bootstrap"]["relative_change"] > 0
    upper = gate["champion"]["bootstrap"]["upper_bound"]
    assert upper > gate["champion"]["bootstrap"]["relative_change"] > 0
    for margin, verdict, decision in ((upper * 1.001, "pass", "promote"), (upper * 0.999, "fail", "reject")):
        set_params(project, gate={"max_regression": margin})
        run_stage("gate", project)
        again = gate_json(project)
        assert again["champion"]["bootstrap"] == gate["champion"]["bootstrap"]  # seeded: the same interval
        [r] = [r for r in again["rules"] if r["rule"] == "max_regression"]
        assert r["verdict"] == verdict and again["decision"] == decision, (margin, r)
        assert all(r["verdict"] == "pass" for r in again["rules"] if r["rule"] != "max_regression")


# ---------------------------------------------------------------- bootstrap calibration


def test_upper_bound_is_close_to_point_plus_z_times_standard_error():
    """Many documents with independent per-document noise of known size: the bootstrap's one-sided
    95% bound should sit near the normal-approximation bound point + z·SE, with SE from the delta
    method for a ratio of sums. Tolerance: the bootstrap's own SE estimate from 2000 resamples has a
    relative error of about 1/sqrt(2·2000) ≈ 1.6% and BCa corrects for skew the normal bound ignores,
    so the two bounds' distances from the point may differ by a few percent; 10% catches an interval
    that is one-sided at the wrong level (z of 1.28 or 1.96 instead of 1.645 is off by 22%)."""
    rng = np.random.default_rng(7)
    n = 2000
    champion_D = rng.uniform(500, 5000, n)
    candidate_D = champion_D * (1 + 0.002 + rng.normal(0, 0.05, n))
    boot = paired_bootstrap(candidate_D, champion_D, 0.95, 2000, 0)
    # delta method: r = sum(c)/sum(h) - 1; Var(r) ≈ Var over documents of (c_i - (1+r) h_i) * n / sum(h)^2
    ratio = candidate_D.sum() / champion_D.sum()
    resid = candidate_D - ratio * champion_D
    se = np.sqrt(n * resid.var(ddof=1)) / champion_D.sum()
    z = scipy.stats.norm.ppf(0.95)
    assert boot["relative_change"] == pytest.approx(ratio - 1, rel=1e-9)
    assert boot["standard_error"] == pytest.approx(se, rel=0.1)
    assert boot["upper_bound"] - boot["relative_change"] == pytest.approx(z * se, rel=0.1)


@pytest.mark.parametrize(("regression", "decision"), [(0.005, "pass"), (0.03, "fail")])
def test_uniform_regression_against_a_1_percent_margin(regression, decision):
    """Every document worse by the same small factor, plus per-document noise: +0.5% is within a 1%
    margin, +3% is not."""
    rng = np.random.default_rng(11)
    champion_D = rng.uniform(500, 5000, 300)
    candidate_D = champion_D * (1 + regression) * (1 + rng.normal(0, 0.01, 300))
    boot = paired_bootstrap(candidate_D, champion_D, 0.95, 2000, 0)
    assert boot["relative_change"] == pytest.approx(regression, abs=0.003)
    assert ("pass" if boot["upper_bound"] <= 0.01 else "fail") == decision, boot
