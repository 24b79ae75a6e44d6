"""The one val evaluation that `pretrain`, `evaluate` and `gate` share.

Every val document takes part, each cut to its first `max_tokens_per_doc` tokens (of the prepared
tokenizer; a document that `prepare` split into chunks is capped as a whole), so no document weighs
more than the cap. Each model scores the same texts with its own tokenizer, so bits-per-byte stays
comparable across tokenizers: a document's sequence is EOS, its tokens, and a closing EOS when the
document is complete (a capped one does not end there). Sequences longer than the model's context
are scored in sliding windows: a window of `seq_len` tokens every `stride` tokens, each scoring only
the targets the previous window did not, so after the first window every token sees at least
`seq_len - stride` tokens before it (stride = seq_len: independent windows, the cheapest; a stride
above a model's context is that model's context).

Reported: micro bits-per-byte (all scored bits over all scored bytes), macro (the mean of the
documents' bits-per-byte), and gzip -9, xz -9e and PPMd order 16 (7-Zip's PPMd var. H) on exactly
the scored bytes, concatenated and each document alone.
"""

from __future__ import annotations

import gzip
import lzma
import math
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyppmd
import torch
import torch.nn.functional as F

from moeops.cli import UserError
from moeops.data.prepare import EOS, decode_document
from moeops.model.io import load_tokenizer
from moeops.train.data import load_tokens

LogitsFn = Callable[[np.ndarray], Any]  # x_BS int64 -> logits_BSV (numpy or torch): PyTorch or ONNX Runtime
PPMD_ORDER = 16
PPMD_MEM = 256 << 20  # model memory; far above what these texts fill, so the model never restarts


@dataclass(frozen=True)
class Document:
    name: str  # docs.parquet's path: the source's relative path (with "#k" for a chunk of a split document)
    text: str  # the scored text: the document, cut at the cap
    complete: bool  # False when the cap cut it (its closing EOS is not scored)


def val_documents(prepared_dir: Path, max_tokens_per_doc: int) -> list[Document]:
    """Every val document in order, each source document capped at `max_tokens_per_doc` tokens."""
    tok = load_tokenizer(prepared_dir / "tokenizer.json")
    flat = load_tokens(prepared_dir, "val")
    idx, table = prepared_dir / "val.idx.npy", prepared_dir / "docs.parquet"
    try:
        offsets = np.load(idx, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{idx}: cannot read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if offsets.ndim != 1 or offsets.dtype.kind not in "iu" or (len(offsets) and offsets[-1] > len(flat)):
        raise UserError(f"{idx}: not the document offsets of val.bin; re-run prepare")
    try:
        docs = pd.read_parquet(table)
    except Exception as e:  # noqa: BLE001 (pyarrow raises many kinds)
        raise UserError(f"{table}: cannot read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    val = docs[(docs.split == "val") & (docs.status == "kept")]
    if len(val) != len(offsets) - 1:
        raise UserError(f"{table}: {len(val)} kept val documents, but {idx} has {len(offsets) - 1}; re-run prepare")
    sources = val["document"] if "document" in val else val.path  # chunks of a split document share `document`
    left: dict[str, int] = {}  # tokens each source document may still contribute
    out = []
    for path, source, start, end in zip(val.path, sources, offsets[:-1], offsets[1:]):
        n = int(end - start) - 1  # the document's tokens, its EOS aside
        take = min(n, left.setdefault(source, max_tokens_per_doc))
        left[source] -= take
        if take > 0:
            out.append(Document(path, decode_document(tok, flat[start:start + take]), take == n))
    if not out:
        raise UserError(f"{prepared_dir / 'val.bin'}: no val documents to score")
    return out


def windows(n_inputs: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first scored position, end) of each window over n_inputs positions: inputs
    [begin, end), targets at positions [first, end) scored (each position exactly once)."""
    out, scored = [], 0
    for begin in range(0, n_inputs, stride):
        end = min(begin + seq_len, n_inputs)
        out.append((begin, scored, end))
        scored = end
        if end >= n_inputs:
            break
    return out


def score_documents(logits_fn: LogitsFn, tokenizer_path: Path, docs: list[Document], seq_len: int, stride: int,
                    batch_size: int) -> dict[str, np.ndarray]:
    """Per document: bits the model spends on it, scored tokens, top-1 hits and the summed context
    (tokens seen before each target, its own input included). Windows are batched longest first and
    right-padded (causal attention: padding after a position cannot change it; padded and already
    scored targets are ignored)."""
    if stride < 1:
        raise UserError(f"evaluate.stride: must be >= 1, got {stride}")
    stride = min(stride, seq_len)
    tok = load_tokenizer(tokenizer_path)
    eos = tok.token_to_id(EOS)
    if eos is None:
        raise UserError(f"{tokenizer_path}: has no {EOS} token")
    tok.encode_special_tokens = True  # as in prepare: text that spells EOS is plain bytes
    rows = []  # (document, inputs, targets with unscored positions = -100, context of each position)
    for d, (doc, enc) in enumerate(zip(docs, tok.encode_batch_fast([doc.text for doc in docs],
                                                                   add_special_tokens=False))):
        seq = np.array([eos, *enc.ids, *([eos] if doc.complete else [])], dtype=np.int64)
        x, y = seq[:-1], seq[1:]
        for begin, first, end in windows(len(x), seq_len, stride):
            targets = y[begin:end].copy()
            targets[:first - begin] = -100
            rows.append((d, x[begin:end], targets, np.arange(1, end - begin + 1)))
    rows.sort(key=lambda r: -len(r[1]))
    n = len(docs)
    bits_D, tokens_D, correct_D, context_D = np.zeros(n), np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n)
    for i in range(0, len(rows), batch_size):
        group = rows[i:i + batch_size]
        width = len(group[0][1])
        x_BS = np.zeros((len(group), width), np.int64)
        y_BS = np.full((len(group), width), -100, np.int64)
        ctx_BS = np.zeros((len(group), width))
        for r, (_, inputs, targets, ctx) in enumerate(group):
            x_BS[r, :len(inputs)], y_BS[r, :len(targets)], ctx_BS[r, :len(ctx)] = inputs, targets, ctx
        logits_BSV = torch.as_tensor(logits_fn(x_BS)).float()
        y = torch.from_numpy(y_BS)
        nats_BS = F.cross_entropy(logits_BSV.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
        scored_BS = (y != -100).numpy()
        hits_BS = (logits_BSV.argmax(-1) == y).numpy() & scored_BS
        d_B = [g[0] for g in group]
        np.add.at(bits_D, d_B, nats_BS.double().sum(1).numpy() / math.log(2))
        np.add.at(tokens_D, d_B, scored_BS.sum(1))
        np.add.at(correct_D, d_B, hits_BS.sum(1))
        np.add.at(context_D, d_B, (ctx_BS * scored_BS).sum(1))
    return {"bits": bits_D, "tokens": tokens_D, "correct": correct_D, "context": context_D}


def document_bytes(docs: list[Document]) -> np.ndarray:
    return np.array([len(doc.text.encode()) for doc in docs], dtype=np.int64)


def summarize(scores: dict[str, np.ndarray], bytes_D: np.ndarray) -> dict[str, float | int]:
    """Micro and macro bits-per-byte, loss (nats per token), perplexity, top-1, mean context."""
    bits, tokens = float(scores["bits"].sum()), int(scores["tokens"].sum())
    nonempty = bytes_D > 0
    loss = bits * math.log(2) / max(1, tokens)
    return {"bits_per_byte": bits / max(1, int(bytes_D.sum())),
            "bits_per_byte_macro": float(np.mean(scores["bits"][nonempty] / bytes_D[nonempty])),
            "loss": loss, "perplexity": math.exp(loss),
            "top1_accuracy": int(scores["correct"].sum()) / max(1, tokens),
            "context_mean": float(scores["context"].sum()) / max(1, tokens),
            "tokens": tokens, "bytes": int(bytes_D.sum()), "documents": len(bytes_D)}


def _tool_or(argv: list[str], fallback: Callable[[bytes], bytes]) -> Callable[[bytes], int]:
    """The command-line tool when present (what a user would run), else the same preset in Python."""
    if shutil.which(argv[0]):
        return lambda data: len(subprocess.run(argv, input=data, capture_output=True, check=True).stdout)
    return lambda data: len(fallback(data))


COMPRESSORS: dict[str, Callable[[bytes], int]] = {  # name -> compressed size in bytes
    "gzip_9": _tool_or(["gzip", "-9", "-c", "-n"], lambda d: gzip.compress(d, 9, mtime=0)),
    "xz_9e": _tool_or(["xz", "-9e", "-c"], lambda d: lzma.compress(d, preset=9 | lzma.PRESET_EXTREME)),
    "ppmd_o16": lambda d: len(pyppmd.compress(d, max_order=PPMD_ORDER, mem_size=PPMD_MEM, variant="H")),
}


def compressor_bits(docs: list[Document]) -> dict[str, dict[str, Any]]:
    """Each compressor on exactly the scored bytes: {name: {bits_per_byte (the concatenation),
    bits_per_byte_separate (each document compressed alone, summed), bits_per_byte_macro, bits_D}}."""
    data_D = [doc.text.encode() for doc in docs]
    bytes_D = np.array([len(d) for d in data_D])
    out = {}
    for name, size in COMPRESSORS.items():
        bits_D = np.array([8.0 * size(d) for d in data_D])
        out[name] = {"bits_per_byte": 8 * size(b"".join(data_D)) / max(1, int(bytes_D.sum())),
                     "bits_per_byte_separate": float(bits_D.sum()) / max(1, int(bytes_D.sum())),
                     "bits_per_byte_macro": float(np.mean(bits_D[bytes_D > 0] / bytes_D[bytes_D > 0])),
                     "bits_D": bits_D}
    return out
