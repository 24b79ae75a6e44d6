"""The shared val evaluation (moeops/evaluate/scoring.py) against hand computations: a seeded debug
model scored one target at a time (micro, macro, per document, capped, strided), the windows, the val
documents of a real prepared directory (capped, chunks capped as one source), and the compressor
figures on known inputs. That evaluate and gate agree on the same model: tests/test_gate_champion.py."""

from __future__ import annotations

import gzip
import lzma
import math
import random
import re

import numpy as np
import pandas as pd
import pyppmd
import pytest
import torch
import torch.nn.functional as F
from conftest import make_corpus, run_stage, write_params
from tokenizers import Tokenizer

from moeops.cli import UserError
from moeops.config import make_model_args
from moeops.data.prepare import EOS, decode_document, train_tokenizer
from moeops.evaluate.scoring import (
    PPMD_MEM,
    PPMD_ORDER,
    Document,
    compressor_bits,
    document_bytes,
    score_documents,
    summarize,
    val_documents,
    windows,
)
from moeops.model.transformer import Transformer, init_weights
from moeops.train.data import load_tokens

TEXTS = ["def alpha(x):\n    return x + 1\n", "import os\n", "class Beta:\n    value = 3\n" * 4, "é 日本 🙂 naïve\n"]
DOCS = [Document("a.py", TEXTS[0], True), Document("b.py", TEXTS[1], True),
        Document("c.py", TEXTS[2], False),  # capped: no closing EOS is scored
        Document("d.py", TEXTS[3], True), Document("empty.py", "", True)]  # empty: its closing EOS only


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


def by_hand(logits, tok: Tokenizer, doc: Document, seq_len: int, stride: int) -> tuple[float, int, int, int]:
    """(bits, targets, top-1 hits, summed context) of one document without padding or batching: target j
    (predicted from inputs up to j) belongs to the first window [b, b + seq_len), b a multiple of the
    stride, that reaches it, and is predicted from that window's inputs up to j alone (causal: one
    forward over the window's inputs up to its last such target gives each of them)."""
    eos = tok.token_to_id(EOS)
    seq = [eos, *tok.encode(doc.text, add_special_tokens=False).ids, *([eos] if doc.complete else [])]
    stride = min(stride, seq_len)
    begin_J = [0 if j < seq_len else ((j - seq_len) // stride + 1) * stride for j in range(len(seq) - 1)]
    bits, hits, context = 0.0, 0, 0
    for begin in sorted(set(begin_J)):
        targets = [j for j, b in enumerate(begin_J) if b == begin]
        out_SV = torch.as_tensor(logits(np.array([seq[begin:targets[-1] + 1]])))[0]
        for j in targets:
            bits += float(F.cross_entropy(out_SV[j - begin], torch.tensor(seq[j + 1]))) / math.log(2)
            hits += int(out_SV[j - begin].argmax()) == seq[j + 1]
            context += j + 1 - begin
    return bits, len(seq) - 1, hits, context


@pytest.mark.parametrize(("seq_len", "stride"), [(8, 3), (5, 4), (4, 1)])  # stride = seq_len: the next test
def test_score_documents_is_the_hand_computation(lm, seq_len, stride):
    path, logits = lm
    tok = Tokenizer.from_file(str(path))
    expected = np.array([by_hand(logits, tok, doc, seq_len, stride) for doc in DOCS])
    n_ids = [len(tok.encode(doc.text, add_special_tokens=False).ids) for doc in DOCS]
    assert max(n_ids) > 3 * seq_len  # long documents: several windows
    for batch_size in (1, 16):  # batching and right padding change nothing
        got = score_documents(logits, path, DOCS, seq_len, stride, batch_size)
        np.testing.assert_allclose(got["bits"], expected[:, 0], rtol=1e-5)
        np.testing.assert_array_equal(got["tokens"], expected[:, 1])
        np.testing.assert_array_equal(got["correct"], expected[:, 2])
        np.testing.assert_array_equal(got["context"], expected[:, 3])
    # Every target exactly once: the document's tokens, plus its closing EOS unless capped.
    assert got["tokens"].tolist() == [n + doc.complete for n, doc in zip(n_ids, DOCS)]
    assert got["tokens"][4] == 1 and got["bits"][4] > 0  # an empty document still pays for its EOS


def test_stride_at_the_context_is_independent_windows_and_above_it_is_clamped(lm):
    path, logits = lm
    independent = score_documents(logits, path, DOCS, 8, 8, 4)
    tok = Tokenizer.from_file(str(path))
    eos = tok.token_to_id(EOS)
    for d, doc in enumerate(DOCS):  # contiguous windows of 8 inputs, each scored alone
        seq = [eos, *tok.encode(doc.text, add_special_tokens=False).ids, *([eos] if doc.complete else [])]
        x, y = seq[:-1], seq[1:]
        bits = sum(float(F.cross_entropy(torch.as_tensor(logits(np.array([x[k:k + 8]])))[0],
                                         torch.tensor(y[k:k + 8]), reduction="sum"))
                   for k in range(0, len(x), 8)) / math.log(2)
        assert independent["bits"][d] == pytest.approx(bits, rel=1e-5)
    above = score_documents(logits, path, DOCS, 8, 50, 4)
    for key in independent:
        np.testing.assert_array_equal(above[key], independent[key])
    with pytest.raises(UserError, match="evaluate.stride: must be >= 1"):
        score_documents(logits, path, DOCS, 8, 0, 4)


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 30])
@pytest.mark.parametrize(("seq_len", "stride"), [(1, 1), (4, 4), (4, 1), (7, 3)])
def test_windows_score_each_position_once(n, seq_len, stride):
    spans = windows(n, seq_len, stride)
    assert [i for _, first, end in spans for i in range(first, end)] == list(range(n))
    for k, (begin, first, end) in enumerate(spans):
        assert begin == k * stride and begin <= first < end <= begin + seq_len
        assert k == 0 or first - begin == seq_len - stride  # the context every later window carries over


def test_summarize_micro_macro_on_a_uniform_model(lm):
    """Uniform logits: every target costs log2(V) bits and top-1 is token 0 (EOS), so each figure is
    a count: micro = all bits / all UTF-8 bytes, macro = the mean of the documents' ratios."""
    path, _ = lm
    vocab = 280
    scores = score_documents(lambda x_BS: np.zeros((*x_BS.shape, vocab), np.float32), path, DOCS, 8, 3, 4)
    bytes_D = document_bytes(DOCS)
    assert bytes_D.tolist() == [len(doc.text.encode()) for doc in DOCS] and bytes_D[3] > len(DOCS[3].text)
    np.testing.assert_allclose(scores["bits"], scores["tokens"] * math.log2(vocab), rtol=1e-6)
    s = summarize(scores, bytes_D)
    n_tokens = int(scores["tokens"].sum())
    assert s["bits_per_byte"] == pytest.approx(n_tokens * math.log2(vocab) / bytes_D.sum(), rel=1e-6)
    nonempty = bytes_D > 0  # the empty document has no bytes to divide by: left out of the macro mean
    assert s["bits_per_byte_macro"] == pytest.approx(
        np.mean(scores["tokens"][nonempty] * math.log2(vocab) / bytes_D[nonempty]), rel=1e-6)
    assert s["bits_per_byte_macro"] != pytest.approx(s["bits_per_byte"], rel=1e-3)
    assert s["loss"] == pytest.approx(math.log(vocab), rel=1e-6) and s["perplexity"] == pytest.approx(vocab, rel=1e-5)
    assert s["top1_accuracy"] == sum(doc.complete for doc in DOCS) / n_tokens  # the closing EOS targets
    assert s["context_mean"] == pytest.approx(scores["context"].sum() / n_tokens)
    assert (s["tokens"], s["bytes"], s["documents"]) == (n_tokens, int(bytes_D.sum()), len(DOCS))


# ---------------------------------------------------------------- val documents of a prepared directory


def test_val_documents_are_every_val_document_capped(prepared_project):
    prepared = prepared_project / "data/prepared"
    table = pd.read_parquet(prepared / "docs.parquet")
    val = table[(table.split == "val") & (table.status == "kept")]
    tok = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    flat, offsets = load_tokens(prepared, "val"), np.load(prepared / "val.idx.npy")
    whole = val_documents(prepared, 10**9)
    assert [d.name for d in whole] == val.path.tolist() and all(d.complete for d in whole)
    assert [d.text for d in whole] == [decode_document(tok, flat[a:b - 1]) for a, b in zip(offsets, offsets[1:])]
    assert document_bytes(whole).tolist() == val.n_bytes.tolist()
    cap = int(val.n_tokens.median())
    capped = val_documents(prepared, cap)
    assert [d.name for d in capped] == val.path.tolist()
    assert [d.complete for d in capped] == (val.n_tokens <= cap).tolist()
    for doc, full, (a, b) in zip(capped, whole, zip(offsets, offsets[1:])):
        assert full.text.startswith(doc.text)
        assert doc.text == decode_document(tok, flat[a:min(b - 1, a + cap)])
    assert 0 < sum(not d.complete for d in capped) < len(capped)


def test_the_cap_applies_to_a_source_across_its_chunks(tmp_path):
    """prepare splits every file over max_doc_bytes into chunks of whole lines; a source document's
    chunks together take at most max_tokens_per_doc tokens, in order."""
    corpus = make_corpus(tmp_path / "corpus", n_files=30, seed=3)
    write_params(tmp_path, corpus={"source": str(corpus)}, prepare={"max_doc_bytes": 400, "max_val_doc_share": 1.0})
    run_stage("corpus", tmp_path)
    run_stage("prepare", tmp_path)
    prepared = tmp_path / "data/prepared"
    table = pd.read_parquet(prepared / "docs.parquet")
    val = table[(table.split == "val") & (table.status == "kept")]
    source_R = val.path.str.replace(r"#\d+$", "", regex=True).tolist()
    assert len(set(source_R)) < len(source_R)  # some source really is in several chunks
    cap = int(val.n_tokens.max()) + 1  # above any one chunk, below a chunked source's total
    assert (val.groupby(source_R).n_tokens.sum() > cap).any()
    tok = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    flat, offsets = load_tokens(prepared, "val"), np.load(prepared / "val.idx.npy")
    expected: dict[str, str] = {}  # each source's first `cap` tokens, across its chunks in order
    left: dict[str, int] = {}
    for source, a, b in zip(source_R, offsets, offsets[1:]):
        take = min(int(b - 1 - a), left.setdefault(source, cap))
        left[source] -= take
        expected[source] = expected.get(source, "") + decode_document(tok, flat[a:a + take])
    got: dict[str, str] = {}
    for doc in val_documents(prepared, cap):
        source = re.sub(r"#\d+$", "", doc.name)
        got[source] = got.get(source, "") + doc.text
    assert got == expected


# ---------------------------------------------------------------- compressors


def test_compressor_figures_on_known_inputs():
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/"  # 6 bits a character
    noise = "".join(rng.choice(alphabet) for _ in range(20000))
    docs = [Document("zeros", "\0" * 30000, True), Document("noise", noise, True), Document("again", noise, True)]
    out = compressor_bits(docs)
    assert set(out) == {"gzip_9", "xz_9e", "ppmd_o16"}
    data_D = [d.text.encode() for d in docs]
    n = sum(map(len, data_D))
    for name, c in out.items():
        assert c["bits_D"][0] / len(data_D[0]) < 0.1, name  # zeros: next to nothing
        assert 5.9 < c["bits_D"][1] / len(data_D[1]) < 6.6, name  # 6 bits of entropy a character, in 8-bit bytes
        assert c["bits_per_byte_separate"] == pytest.approx(c["bits_D"].sum() / n)
        assert c["bits_per_byte_macro"] == pytest.approx(np.mean(c["bits_D"] / [len(d) for d in data_D]))
        assert c["bits_per_byte"] < c["bits_per_byte_separate"] * 0.8, name  # together, the repeat costs little
    ppmd = out["ppmd_o16"]
    for data, bits in zip(data_D, ppmd["bits_D"]):
        packed = pyppmd.compress(data, max_order=PPMD_ORDER, mem_size=PPMD_MEM, variant="H")
        assert bits == 8 * len(packed)
        assert pyppmd.Ppmd7Decoder(PPMD_ORDER, PPMD_MEM).decode(packed, len(data)) == data
    joined = b"".join(data_D)
    assert ppmd["bits_per_byte"] == 8 * len(pyppmd.compress(joined, max_order=16, mem_size=256 << 20,
                                                            variant="H")) / n
    # gzip and xz: the command-line tools when present, else the same presets in Python (within a few bytes)
    assert out["gzip_9"]["bits_D"][1] == pytest.approx(8 * len(gzip.compress(data_D[1], 9, mtime=0)), rel=0.01)
    assert out["xz_9e"]["bits_D"][1] == pytest.approx(
        8 * len(lzma.compress(data_D[1], preset=9 | lzma.PRESET_EXTREME)), rel=0.01)
