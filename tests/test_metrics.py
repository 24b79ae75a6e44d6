"""Bits per byte on multi-byte UTF-8 text: every place that counts bytes counts len(text.encode()),
never characters: the token byte table of the evaluate stage (score_windows), the gate's val
documents, and prepare's docs.parquet / meta.json, on a corpus with é, 日本 and emoji."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from conftest import make_corpus, run_stage, write_params
from tokenizers import Tokenizer

from moeops.data.prepare import EOS, EOS_ID, train_tokenizer
from moeops.evaluate.gate import document_bits, val_documents
from moeops.evaluate.metrics import byte_lengths, score_windows, token_bytes

MULTI = ["café résumé naïve é", "日本語のテキスト 日本", "emoji 🙂🚀 and 👩‍💻 (a ZWJ sequence)", "ascii only"]


def multibyte_text(i: int) -> str:
    return f"# {MULTI[i % len(MULTI)]} {i}\ns = '{MULTI[(i + 1) % len(MULTI)]}'\n"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer([multibyte_text(i) for i in range(40)] * 3, 300).save(str(path))
    return path


def test_token_bytes_sum_to_the_utf8_length(tokenizer):
    tok = Tokenizer.from_file(str(tokenizer))
    table = token_bytes(tokenizer)
    byte_len = byte_lengths(table, tok.get_vocab_size())
    assert table[tok.token_to_id(EOS)] == b""  # EOS costs bits but stands for no bytes
    for text in [*MULTI, "é", "日", "🙂", "x🚀y"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert b"".join(table[i] for i in ids) == text.encode()
        assert int(byte_len[ids].sum()) == len(text.encode())
        assert len(text.encode()) > len(text) or text.isascii()


def test_score_windows_divides_by_utf8_bytes(tokenizer):
    """Uniform logits: every target costs log2(V) bits, so bits/byte = targets·log2(V) / bytes."""
    tok = Tokenizer.from_file(str(tokenizer))
    vocab = tok.get_vocab_size()
    texts = [multibyte_text(i) for i in range(5)]
    tokens = [EOS_ID]
    for text in texts:
        tokens += [*tok.encode(text, add_special_tokens=False).ids, EOS_ID]
    tokens = np.array(tokens)
    seq_len = 8
    n_targets = (len(tokens) - 1) // seq_len * seq_len  # whole windows only
    got = score_windows(lambda x_BS: np.zeros((*x_BS.shape, vocab), np.float32), tokens,
                        byte_lengths(token_bytes(tokenizer), vocab), seq_len, 4, 10**6)
    targets = tokens[1:n_targets + 1]
    expected_bytes = len(tok.decode(targets.tolist(), skip_special_tokens=True).encode())
    assert got["tokens"] == n_targets and got["bytes"] == expected_bytes
    assert got["bits_per_byte"] == pytest.approx(n_targets * math.log2(vocab) / expected_bytes, rel=1e-6)
    if n_targets == len(tokens) - 1:  # every document scored: the bytes are the texts' bytes
        assert expected_bytes == sum(len(t.encode()) for t in texts)


def test_prepare_and_gate_count_utf8_bytes(tmp_path):
    """One real corpus + prepare run: docs.parquet's n_bytes is each file's UTF-8 size, meta.json's
    val bytes are their sum, and the gate's val documents decode back to exactly those bytes, which
    is also what the evaluate stage's token byte table counts."""
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
    texts = val_documents(prepared, 10**9)
    assert len(texts) == len(val)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert n_bytes == meta["splits"]["val"]["n_bytes"] > sum(len(t) for t in texts)  # multi-byte text is in there
    # The evaluate stage's byte count of the val tokens (EOS: 0 bytes) is the same number.
    flat = np.fromfile(prepared / "val.bin", dtype=meta["dtype"])
    table = byte_lengths(token_bytes(prepared / "tokenizer.json"), meta["vocab_size"])
    assert int(table[flat.astype(np.int64)].sum()) == n_bytes
    # And the gate's per-document bits divide by the same bytes: a uniform model costs log2(V) a token.
    bits_D = document_bits(lambda x_BS: np.zeros((*x_BS.shape, meta["vocab_size"]), np.float32),
                           prepared / "tokenizer.json", texts, 64, 8)
    assert bits_D.sum() == pytest.approx(len(flat) * math.log2(meta["vocab_size"]), rel=1e-6)  # one token off: 1e-3
