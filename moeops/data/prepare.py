"""Prepare: manifest -> filtered documents -> train/val split -> byte-level BPE -> flat token files,
validated by a Great Expectations suite before anything replaces data/prepared.

Outputs (all written into a temp dir, then moved into place with one rename; meta.json's n_tokens
counts the EOS after each document, docs.parquet's n_tokens does not):
  data/prepared/{tokenizer.json, train.bin, val.bin, train.idx.npy, val.idx.npy, meta.json, docs.parquet}
  reports/data/{docs/ (GX Data Docs), summary.json}   also written when the suite fails
  metrics/data.json                                    on success only; val's "scored": what the evaluation scores

A document's identity decides its split and belongs to the document alone: a file's name relative to
its configured source root (the manifest's `name`), a .jsonl line's "id" or content hash. An oversized
document may be split into chunks "<identity>#<k>", which all follow the document's split. Documents are
read in the order of their names (not of the manifest's absolute paths), so which of two identical files
dedup keeps, and so the val set, is the same on every machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from tqdm import tqdm

from moeops.cli import DataValidationError, UserError
from moeops.data.corpus import read_manifest
from moeops.io import atomic_write_json, replace_dir, sha256_file

EOS = "<|endoftext|>"
EOS_ID = 0
SKIP_REASONS = ("invalid_utf8", "empty", "binary", "too_small", "oversized", "duplicate")
# Empty files (every package's empty __init__.py) are counted and reported, but are no loss of text, so
# the suite's skipped-document and skipped-byte limits count only these reasons.
COUNTED_SKIPS = tuple(r for r in SKIP_REASONS if r != "empty")
DOC_COLUMNS = ["path", "document", "sha256", "n_bytes", "n_tokens", "split", "status", "max_token_id"]  # docs.parquet
# The gate scores the val split per document (a paired bootstrap over documents) in bits per byte.
# Rules of thumb, not measurements: below ~30 documents a bootstrap over documents is a poor stand-in
# for the sampling distribution (one document swings it), and below ~100 KB of text a 1% difference
# between two models rests on a few tens of thousands of tokens. Under either, prepare warns.
VAL_MIN_DOCS = 30
VAL_MIN_BYTES = 100_000
# More control characters (Unicode category Cc, except tab, newlines, vertical tab and form feed) than
# this fraction of the text reads as binary, not text. A regex keeps the scan in C on the 12 MB corpus.
MAX_CONTROL_FRACTION = 0.10
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f]")
ENCODE_CHUNK = 256  # documents per encode_batch call: big enough for parallelism, small enough for progress


class RawDoc(NamedTuple):
    identity: str  # the name relative to its source root, or "<name>:id=…" / "<name>:sha256=…" for a .jsonl line
    data: bytes


# ---------------------------------------------------------------- reading


def read_verified(entry: dict, manifest: Path) -> bytes:
    """A manifest file's bytes, refusing one that changed since the manifest was written
    (training on other bytes than DVC hashed would break reproducibility silently)."""
    path = entry["path"]
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: listed in {manifest} but missing; rerun `python -m stages.corpus`") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise UserError(f"{path}: changed since {manifest} was written; rerun `python -m stages.corpus`")
    return data


def content_identity(path: str, data: bytes) -> str:
    return f"{path}:sha256={hashlib.sha256(data).hexdigest()[:16]}"


def jsonl_documents(path: str, data: bytes) -> Iterator[RawDoc]:
    """Each non-blank line's "text" is a document. Its identity never involves its line number, so
    inserting or deleting lines moves no other line between splits: "<path>:id=<id>" when the line has
    an "id" (a string or an integer, unique in the file), else "<path>:sha256=<16 hex digits of the
    text's UTF-8>" (identical texts share a split). A line that is not UTF-8 yields its raw bytes (named
    by their hash), so it is skipped as invalid_utf8 like any file; malformed JSON, a missing field or a
    bad or repeated id is the user's error."""
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            yield RawDoc(content_identity(path, line), line)
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise UserError(f"{where}: not valid JSON ({e.args[0].split(':')[0]})") from None
        if not isinstance(obj, dict) or "text" not in obj:
            raise UserError(f'{where}: no "text" field')
        if not isinstance(obj["text"], str):
            raise UserError(f'{where}: "text" must be a string, got {type(obj["text"]).__name__}')
        # surrogatepass keeps a lone surrogate ("\ud800" in JSON) as bytes that fail UTF-8 decoding later.
        text = obj["text"].encode("utf-8", "surrogatepass")
        if "id" not in obj:
            yield RawDoc(content_identity(path, text), text)
            continue
        doc_id = obj["id"]
        if isinstance(doc_id, bool) or not isinstance(doc_id, str | int):
            raise UserError(f'{where}: "id" must be a string or an integer, got {type(doc_id).__name__}')
        if str(doc_id) in first_line:
            raise UserError(f'{where}: duplicate "id" {doc_id!r} (first on line {first_line[str(doc_id)]})')
        first_line[str(doc_id)] = lineno
        yield RawDoc(f"{path}:id={doc_id}", text)


def load_documents(entries: list[dict], manifest: Path) -> list[RawDoc]:
    """Documents named by the manifest's `name`: the path relative to the configured source root, so a
    split depends neither on where Python is installed nor on which other files the corpus holds."""
    docs: list[RawDoc] = []
    with tqdm(total=sum(e["size"] for e in entries), unit="B", unit_scale=True, desc="read", disable=None) as bar:
        # By name, not by the manifest's absolute paths: with several sources those sort by where each
        # source lives, and of two identical files dedup keeps the first.
        for entry in sorted(entries, key=lambda e: e["name"]):
            data = read_verified(entry, manifest)
            name = entry["name"]
            if entry["path"].endswith(".jsonl"):
                docs += jsonl_documents(name, data)
            else:
                docs.append(RawDoc(name, data))
            bar.update(entry["size"])
    return docs


# ---------------------------------------------------------------- filtering and splitting


def looks_binary(text: str) -> bool:
    return len(CONTROL_CHARS.findall(text)) > MAX_CONTROL_FRACTION * len(text)


def classify(data: bytes, min_doc_bytes: int, max_doc_bytes: int) -> tuple[str, str | None]:
    """("kept", text) or (skip reason, None). A NUL byte means binary even when the bytes are not
    UTF-8: "binary" is the more useful name for an image or an archive than "invalid_utf8"."""
    if b"\x00" in data:
        return "binary", None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8", None
    if not text.strip():
        return "empty", None
    if looks_binary(text):
        return "binary", None
    if len(data) < min_doc_bytes:
        return "too_small", None
    if len(data) > max_doc_bytes:
        return "oversized", None
    return "kept", text


def split_of(identity: str, val_fraction: float) -> str:
    """Deterministic split from the document's identity: stable across runs and machines and
    independent of the other documents, so adding a file never moves an existing one."""
    u = int(hashlib.sha256(identity.encode()).hexdigest()[:16], 16) / 2**64
    return "val" if u < val_fraction else "train"


def chunk_lines(data: bytes, max_bytes: int) -> list[bytes]:
    """`data` in consecutive chunks of at most `max_bytes` that concatenate back to it: whole lines packed
    greedily; a single line longer than `max_bytes` is cut inside, at a UTF-8 character boundary."""
    chunks: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for line in data.splitlines(keepends=True):
        if current and size + len(line) > max_bytes:
            chunks.append(b"".join(current))
            current, size = [], 0
        while len(line) > max_bytes:
            cut = max_bytes
            while cut > 0 and 0x80 <= line[cut] < 0xC0:  # never start a piece with a continuation byte
                cut -= 1
            cut = cut or max_bytes  # max_bytes below one character's width: the piece stays oversized
            chunks.append(line[:cut])
            line = line[cut:]
        current.append(line)
        size += len(line)
    if current:
        chunks.append(b"".join(current))
    return chunks


def filter_documents(docs: list[RawDoc], p: Any) -> tuple[pd.DataFrame, list[str]]:
    """The docs table (one row per document or chunk, kept and skipped, in the order of `docs`) and the
    kept texts aligned with its kept rows. With `p.oversized == "split"` an oversized document becomes one
    row per chunk (`chunk_lines`), path "<identity>#<k>", each judged like a document; every row's
    `document` column is the identity its split is drawn from, so all chunks of a document land in one
    split (and the evaluation caps them together). With dedup the first document of a content wins."""
    rows, texts, seen = [], [], set()
    for doc in docs:
        status, text = classify(doc.data, p.min_doc_bytes, p.max_doc_bytes)
        parts = [(doc.identity, doc.data, status, text)]
        if status == "oversized" and p.oversized == "split":
            parts = [(f"{doc.identity}#{k}", chunk, *classify(chunk, p.min_doc_bytes, p.max_doc_bytes))
                     for k, chunk in enumerate(chunk_lines(doc.data, p.max_doc_bytes))]
        split = split_of(doc.identity, p.val_fraction)
        for path, data, status, text in parts:
            digest = hashlib.sha256(data).hexdigest()
            if status == "kept" and p.dedup:
                status = "duplicate" if digest in seen else status
                seen.add(digest)
            kept = status == "kept"
            rows.append({"path": path, "document": doc.identity, "sha256": digest, "n_bytes": len(data),
                         "n_tokens": 0, "split": split if kept else "", "status": status, "max_token_id": -1})
            if kept:
                texts.append(text)
    table = pd.DataFrame(rows, columns=DOC_COLUMNS)
    return table.astype({"n_bytes": "int64", "n_tokens": "int64", "max_token_id": "int64"}), texts


def skipped_counts(docs: pd.DataFrame) -> dict[str, int]:
    counts = Counter(docs.status)
    return {reason: counts.get(reason, 0) for reason in SKIP_REASONS}


def skipped_bytes(docs: pd.DataFrame) -> dict[str, int]:
    by_reason = docs.groupby("status").n_bytes.sum()
    return {reason: int(by_reason.get(reason, 0)) for reason in SKIP_REASONS}


def skipped_bytes_fraction(docs: pd.DataFrame) -> float:
    """The share of the corpus's bytes in skipped documents, empty ones aside (see COUNTED_SKIPS)."""
    total = int(docs.n_bytes.sum())
    return int(docs.n_bytes[docs.status.isin(COUNTED_SKIPS)].sum()) / total if total else 0.0


def split_composition(docs: pd.DataFrame, split: str) -> dict[str, Any]:
    """What a split is made of, per source document (a split document's chunks count once): how many,
    their bytes, and the largest one's share of the split's bytes and tokens (a val split dominated by
    one document scores that document more than the model)."""
    kept = docs[(docs.status == "kept") & (docs.split == split)]
    per_doc = kept.groupby("document")[["n_bytes", "n_tokens"]].sum()
    n_bytes, n_tokens = int(kept.n_bytes.sum()), int(kept.n_tokens.sum())
    largest = per_doc.n_bytes.idxmax() if len(per_doc) else None
    return {"n_bytes": n_bytes, "n_source_docs": len(per_doc), "largest_doc": largest,
            "largest_doc_bytes_share": round(per_doc.n_bytes[largest] / n_bytes, 4) if n_bytes else None,
            "largest_doc_tokens_share": round(per_doc.n_tokens[largest] / n_tokens, 4) if n_tokens else None}


def scored_tokens(docs: pd.DataFrame, max_tokens_per_doc: int) -> pd.Series:
    """Each val source document's tokens as the evaluation scores them (moeops.evaluate.scoring's
    `val_documents`): its chunks' own tokens (EOS aside) together, capped at `max_tokens_per_doc`;
    indexed by document, in docs order."""
    kept = docs[(docs.status == "kept") & (docs.split == "val")]
    return kept.groupby("document", sort=False).n_tokens.sum().clip(upper=max_tokens_per_doc)


def scored_composition(docs: pd.DataFrame, max_tokens_per_doc: int) -> dict[str, Any]:
    """The val tokens the evaluation scores and the largest document's share of them (of documents tied
    at the cap, the first in docs order)."""
    per_doc = scored_tokens(docs, max_tokens_per_doc)
    n_tokens = int(per_doc.sum())
    largest = per_doc.idxmax() if n_tokens else None
    return {"max_tokens_per_doc": max_tokens_per_doc, "n_tokens": n_tokens, "largest_doc": largest,
            "largest_doc_tokens_share": round(per_doc[largest] / n_tokens, 4) if n_tokens else None}


def val_warnings(val: dict[str, Any]) -> list[str]:
    if val["n_source_docs"] >= VAL_MIN_DOCS and val["n_bytes"] >= VAL_MIN_BYTES:
        return []
    return [f"val split is small ({val['n_source_docs']} documents, {val['n_bytes'] / 1000:.0f} KB; under "
            f"{VAL_MIN_DOCS} documents or {VAL_MIN_BYTES // 1000} KB): its bits per byte and the gate's "
            "comparison rest on little text; raise prepare.val_fraction or add documents"]


# ---------------------------------------------------------------- tokenizer


def new_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE on `texts`; EOS is id 0. Training in tokenizers is deterministic for the same
    texts in the same order, so equal inputs give a byte-identical tokenizer.json."""
    from tokenizers import pre_tokenizers, trainers

    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    learned = tok.get_vocab_size()
    if learned < vocab_size:
        raise UserError(f"prepare.vocab_size: corpus too small for vocab_size={vocab_size} "
                        f"(tokenizer learned only {learned} tokens)")
    return tok


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65536 else "uint32"


def encode_documents(tok, texts: list[str], dtype: str, desc: str) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Flat tokens (each document then EOS), int64 document start offsets (n_docs + 1), and each
    document's ids. encode_batch runs in parallel in Rust; chunks only exist to drive the progress bar."""
    # Text that happens to contain "<|endoftext|>" is encoded as plain bytes, so EOS only ever marks a
    # document boundary and decode(encode(text)) == text for every document.
    tok.encode_special_tokens = True
    per_doc: list[np.ndarray] = []
    with tqdm(total=sum(len(t) for t in texts), unit="char", unit_scale=True, desc=f"encode {desc}",
              disable=None) as bar:
        for i in range(0, len(texts), ENCODE_CHUNK):
            chunk = texts[i:i + ENCODE_CHUNK]
            per_doc += [np.asarray(e.ids, dtype=dtype) for e in tok.encode_batch_fast(chunk, add_special_tokens=False)]
            bar.update(sum(len(t) for t in chunk))
    eos = np.array([EOS_ID], dtype=dtype)
    flat = np.concatenate([part for ids in per_doc for part in (ids, eos)]) if per_doc else np.zeros(0, dtype)
    offsets = np.zeros(len(per_doc) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(ids) + 1 for ids in per_doc])
    return flat, offsets, per_doc


def decode_document(tok, ids) -> str:
    return tok.decode(list(map(int, ids)), skip_special_tokens=False)


# ---------------------------------------------------------------- writing


def write_prepared(out: Path, tok, docs: pd.DataFrame, encoded: dict, meta: dict) -> None:
    tok.save(str(out / "tokenizer.json"))
    for split, (flat, offsets, _) in encoded.items():
        flat.tofile(out / f"{split}.bin")
        np.save(out / f"{split}.idx.npy", offsets)
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    docs[DOC_COLUMNS].to_parquet(out / "docs.parquet", index=False)


def fill_token_columns(docs: pd.DataFrame, encoded: dict) -> pd.DataFrame:
    """Per-document n_tokens (the document's own tokens, without its EOS) and max_token_id."""
    docs = docs.copy()
    for split, (_, _, per_doc) in encoded.items():
        rows = docs.index[(docs.status == "kept") & (docs.split == split)]
        docs.loc[rows, "n_tokens"] = [len(ids) for ids in per_doc]
        docs.loc[rows, "max_token_id"] = [int(ids.max()) if len(ids) else -1 for ids in per_doc]
    return docs


def make_meta(vocab_size: int, dtype: str, docs: pd.DataFrame, encoded: dict, manifest_sha256: str) -> dict:
    splits = {}
    for split, (flat, offsets, _) in encoded.items():
        kept = docs[(docs.status == "kept") & (docs.split == split)]
        splits[split] = {"n_docs": len(offsets) - 1, "n_tokens": len(flat), "n_bytes": int(kept.n_bytes.sum())}
    return {"vocab_size": vocab_size, "dtype": dtype, "eos_id": EOS_ID, "splits": splits,
            "source_manifest_sha256": manifest_sha256}


def make_metrics(meta: dict, docs: pd.DataFrame, splits: pd.DataFrame, seconds: dict, max_tokens_per_doc: int) -> dict:
    bpt = splits.set_index("split").bytes_per_token
    metrics: dict[str, Any] = {
        split: {"n_docs": s["n_docs"], "n_tokens": s["n_tokens"],
                "bytes_per_token": None if pd.isna(bpt[split]) else round(float(bpt[split]), 4),
                **split_composition(docs, split)}
        for split, s in meta["splits"].items()
    }
    metrics["val"]["scored"] = scored_composition(docs, max_tokens_per_doc)
    metrics["skipped"] = skipped_counts(docs)
    metrics["skipped_bytes"] = skipped_bytes(docs)
    metrics["skipped_bytes_fraction"] = round(skipped_bytes_fraction(docs), 6)
    metrics["warnings"] = val_warnings(metrics["val"])
    metrics.update({f"{k}_seconds": round(v, 3) for k, v in seconds.items()})
    return metrics


def temp_dir_beside(final: Path) -> Path:
    """A fresh temp dir next to `final`, so moving it into place is a rename on the same filesystem."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the final dir's mode
    return tmp


def validate_and_report(reports: Path, tables: dict[str, pd.DataFrame], params: Any,
                        max_tokens_per_doc: int) -> list[dict]:
    """Run the GX suite, writing Data Docs and summary.json into `reports` (replaced as a whole, and
    written whether or not the suite passes: the Data Docs are how a user reads a failure)."""
    from moeops.data.validate import run_suite

    tmp = temp_dir_beside(reports)
    try:
        records = run_suite(tables, params, tmp / "docs", max_tokens_per_doc)
        docs = tables["docs"]
        summary = {"success": all(r["success"] for r in records), "expectations": records,
                   "skipped": {reason: {"docs": n, "bytes": b} for (reason, n), b
                               in zip(skipped_counts(docs).items(), skipped_bytes(docs).values(), strict=True)},
                   "skipped_bytes_fraction": round(skipped_bytes_fraction(docs), 6)}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        replace_dir(tmp, reports)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return records


# ---------------------------------------------------------------- the stage


def prepare(p: Any, manifest: Path, out: Path, reports: Path, metrics_path: Path, max_tokens_per_doc: int) -> dict:
    """The whole stage. `max_tokens_per_doc` is the evaluation's cap per val document (evaluate's), which
    the suite's bound on the largest val document's share applies after. Raises UserError for bad input
    and DataValidationError when the suite fails; in both cases `out` is left exactly as it was."""
    from moeops.data.validate import split_table, with_derived_columns

    docs_in = load_documents(read_manifest(manifest), manifest)
    docs, kept_texts = filter_documents(docs_in, p)
    if not kept_texts:
        reasons = ", ".join(f"{k}: {v}" for k, v in skipped_counts(docs).items() if v)
        raise UserError(f"prepare: no documents left in {manifest} after filtering ({reasons or 'no documents'})")
    split_of_kept = docs.split[docs.status == "kept"].tolist()
    texts = {s: [t for t, ts in zip(kept_texts, split_of_kept) if ts == s] for s in ("train", "val")}
    if not texts["train"]:
        raise UserError(f"prepare: no training documents in {manifest} (all {len(kept_texts)} fall in val; "
                        f"lower prepare.val_fraction={p.val_fraction})")

    seconds = {}
    t0 = time.perf_counter()
    print(f"prepare: training BPE (vocab_size={p.vocab_size}) on {len(texts['train'])} documents", flush=True)
    tok = train_tokenizer(texts["train"], p.vocab_size)
    seconds["tokenizer"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    dtype = token_dtype(p.vocab_size)
    encoded = {s: encode_documents(tok, texts[s], dtype, s) for s in ("train", "val")}
    seconds["encode"] = time.perf_counter() - t0
    docs = fill_token_columns(docs, encoded)
    meta = make_meta(p.vocab_size, dtype, docs, encoded, sha256_file(manifest))

    tmp = temp_dir_beside(out)
    try:
        try:
            write_prepared(tmp, tok, docs, encoded, meta)
        except OSError as e:
            raise UserError(f"{out}: cannot write ({e.strerror})") from None
        t0 = time.perf_counter()
        splits = split_table(tmp, docs, dtype, EOS_ID, max_tokens_per_doc)
        tables = {"splits": splits, "docs": with_derived_columns(docs)}  # failures print in this order
        records = validate_and_report(reports, tables, p, max_tokens_per_doc)
        seconds["validate"] = time.perf_counter() - t0
        failed = [r for r in records if not r["success"]]
        if failed:
            from moeops.data.validate import failure_lines

            raise DataValidationError("\n".join(failure_lines(records)))
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    metrics = make_metrics(meta, docs, splits, seconds, max_tokens_per_doc)
    atomic_write_json(metrics_path, metrics)
    return metrics
