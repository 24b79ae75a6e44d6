"""Bits per byte on multi-byte UTF-8 text: every place that counts bytes counts len(text.encode()),
never characters (the shared evaluation's val documents and prepare's docs.parquet / meta.json, on a
corpus with é, 日本 and emoji); and the evaluate stage's own pieces: the unpadded PyTorch logits (the
expert load counts real tokens only), the per-document table and the targets."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_corpus, run_stage, write_params

from moeops.config import make_model_args
from moeops.evaluate.metrics import documents_table, targets, unpadded_logits
from moeops.evaluate.scoring import Document, document_bytes, score_documents, val_documents
from moeops.model.transformer import Transformer, expert_loads, init_weights, reset_expert_stats

MULTI = ["café résumé naïve é", "日本語のテキスト 日本", "emoji 🙂🚀 and 👩‍💻 (a ZWJ sequence)", "ascii only"]


def multibyte_text(i: int) -> str:
    return f"# {MULTI[i % len(MULTI)]} {i}\ns = '{MULTI[(i + 1) % len(MULTI)]}'\n"


def test_unpadded_logits_are_the_padded_logits_and_count_only_real_tokens():
    """Rows right-padded with 0 (EOS) as score_documents pads them: the logits at every real position
    are those of the row alone, and the MoE layers count each real token top_k times, no padding."""
    args = make_model_args("debug", {"vocab_size": 64, "max_seq_len": 16})
    model = Transformer(args).eval()
    init_weights(model, seed=0)
    lengths = [9, 9, 4, 1]  # two rows of equal length run together; a row that is its EOS alone
    rng = np.random.default_rng(0)
    x_BS = np.zeros((len(lengths), 9), np.int64)
    for r, n in enumerate(lengths):
        x_BS[r, :n] = rng.integers(1, 64, n)
        x_BS[r, 0] = 0 if r % 2 else x_BS[r, 0]  # a document's first window starts with EOS
    logits = unpadded_logits(model)
    reset_expert_stats(model)
    got_BSV = logits(x_BS)
    routed = sum(float(load.sum()) for load in expert_loads(model))
    assert routed == sum(lengths) * args.top_k * len(model.moe_layers())
    with torch.no_grad():
        for r, n in enumerate(lengths):
            alone_SV = model(torch.from_numpy(x_BS[r:r + 1, :n]))[0]
            torch.testing.assert_close(got_BSV[r, :n], alone_SV, rtol=1e-5, atol=1e-5)
            assert not got_BSV[r, n:].any()  # padding: no logits (its targets are ignored)


def test_documents_table_and_targets():
    docs = [Document("a.py", "abcd", True), Document("b.py#1", "日本", False)]
    table = documents_table(docs, np.array([3, 2]), {"teacher": np.array([8.0, 12.0]), "student": np.array([4, 6])},
                            {"xz_9e": np.array([16.0, 30.0])})
    assert table.columns.tolist() == ["document", "bytes", "tokens", "complete", "teacher", "student", "xz_9e"]
    assert table.bytes.tolist() == [4, 6] and table.complete.tolist() == [True, False]
    assert table.teacher.tolist() == [2.0, 2.0] and table.student.tolist() == [1.0, 1.0]
    assert table.xz_9e.tolist() == [4.0, 5.0]
    micro = {"teacher": 1.2, "ppmd_o16": 1.5, "student": 1.3, "onnx_fp32": 1.3, "onnx_int8": 1.32}
    got = targets(micro)
    assert got["teacher_vs_ppmd"] == {"value": 0.8, "target": 0.85, "met": True}
    assert got["student_vs_teacher"] == {"value": round(1.3 / 1.2, 6), "target": 1.10, "met": True}
    assert got["int8_vs_fp32"]["value"] == round(1.32 / 1.3, 6) and not got["int8_vs_fp32"]["met"]
    del micro["onnx_int8"]
    assert set(targets(micro)) == {"teacher_vs_ppmd", "student_vs_teacher"}  # only what was evaluated


def test_prepare_and_evaluation_count_utf8_bytes(tmp_path):
    """One real corpus + prepare run: docs.parquet's n_bytes is each file's UTF-8 size, meta.json's
    val bytes are their sum, and the shared evaluation's val documents decode back to exactly those
    bytes, which are what evaluate and gate divide by."""
    corpus = make_corpus(tmp_path / "corpus", n_files=40)
    for i, path in enumerate(sorted(corpus.iterdir())):
        path.write_text(multibyte_text(i) + path.read_text(), encoding="utf-8")
    write_params(tmp_path, corpus={"source": str(corpus)})
    run_stage("corpus", tmp_path)
    run_stage("prepare", tmp_path)
    prepared = tmp_path / "data/prepared"
    docs = pd.read_parquet(prepared / "docs.parquet")
    kept = docs[docs.status == "kept"]
    files = sorted(corpus.iterdir())
    assert len(kept) == len(files)
    assert sorted(kept.n_bytes) == sorted(len(f.read_text(encoding="utf-8").encode()) for f in files)
    val = kept[kept.split == "val"]
    assert len(val) > 0
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["splits"]["val"]["n_bytes"] == int(val.n_bytes.sum())
    val_docs = val_documents(prepared, 10**9)
    assert len(val_docs) == len(val) and all(doc.complete for doc in val_docs)
    bytes_D = document_bytes(val_docs)
    assert bytes_D.tolist() == val.n_bytes.tolist()
    texts = [doc.text for doc in val_docs]
    assert int(bytes_D.sum()) == meta["splits"]["val"]["n_bytes"] > sum(len(t) for t in texts)  # multi-byte text
    # The evaluation divides by those bytes: a uniform model costs log2(V) a token, every token of val.bin
    # (each document's own and its closing EOS) scored once.
    flat = np.fromfile(prepared / "val.bin", dtype=meta["dtype"])
    scores = score_documents(lambda x_BS: np.zeros((*x_BS.shape, meta["vocab_size"]), np.float32),
                             prepared / "tokenizer.json", val_docs, 64, 64, 8)
    assert int(scores["tokens"].sum()) == len(flat)
    assert scores["bits"].sum() == pytest.approx(len(flat) * math.log2(meta["vocab_size"]), rel=1e-6)
