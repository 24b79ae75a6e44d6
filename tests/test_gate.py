"""The gate's pieces: per-document scoring, the paired bootstrap, rules; the stage's bad input.
The whole stage over real exported models runs in test_e2e."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import run_stage

from moeops.config import make_model_args
from moeops.data.prepare import EOS, train_tokenizer
from moeops.evaluate.gate import decide, document_bits, markdown_report, paired_bootstrap, rule
from moeops.model.transformer import Transformer, init_weights

TEXTS = ["def alpha(x):\n    return x + 1\n", "import os\n", "class Beta:\n    value = 3\n" * 4, ""]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(TEXTS * 4, 280).save(str(path))
    model = Transformer(make_model_args("debug", {"vocab_size": 280, "max_seq_len": 64})).eval()
    init_weights(model, seed=0)

    @torch.no_grad()
    def logits(x_BS):
        return model(torch.from_numpy(x_BS))

    return path, logits


def test_document_bits_is_the_cross_entropy_of_each_document_in_windows(lm):
    path, logits = lm
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    eos = tok.token_to_id(EOS)
    seq_len = 8  # shorter than most documents: they are cut into windows
    expected = []
    for text in TEXTS:
        seq = [eos, *tok.encode(text, add_special_tokens=False).ids, eos]
        nats = 0.0
        for k in range(0, len(seq) - 1, seq_len):  # one window at a time, no padding
            x, y = seq[k:k + seq_len][:len(seq) - 1 - k], seq[k + 1:k + seq_len + 1]
            nats += float(F.cross_entropy(logits(np.array([x]))[0], torch.tensor(y), reduction="sum"))
        expected.append(nats / math.log(2))
    for batch_size in (1, 3, 16):  # batching and right padding change nothing
        got = document_bits(logits, path, TEXTS, seq_len, batch_size)
        np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert got[3] > 0  # an empty document still pays for its EOS


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
