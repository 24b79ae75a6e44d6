"""Corpus and prepare stages: manifest, filtering, hash split (stable as the corpus grows), oversized
documents split into chunks, empty files counted apart, extensionless corpora, BPE round-trip,
determinism, the GX suite, and bad inputs that must end in one `error:` line, a non-zero exit and an
untouched data/prepared.

Corpora are generated per test under tmp_path (a few dozen small files, vocab_size 300); the error
paths run the real stage as a subprocess with cwd=tmp_path, exactly as DVC would.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from moeops.cli import DataValidationError, UserError
from moeops.config import EvaluateParams, PrepareParams, load_section
from moeops.data import corpus as corpus_mod
from moeops.data import prepare as prep
from moeops.io import sha256_file

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the model routes each token to a few experts while shared experts see every token and the "
         "router learns which expert fits best given load balance bias updates data pipeline stage cache "
         "tokenizer merges bytes into pieces train validation split hash document corpus").split()
CAP = EvaluateParams().max_tokens_per_doc  # the evaluation's default cap per val document
PREPARE = {"vocab_size": 300, "val_fraction": 0.25, "val_fraction_tolerance": 0.2, "max_skipped_fraction": 0.02,
           "min_bytes_per_token": 1.0, "max_bytes_per_token": 8.0}


# ---------------------------------------------------------------- helpers


def text(rng: random.Random, n_words: int = 150) -> str:
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(n_words // 12)]
    return "\n".join(lines) + "\n"


def named_for_split(folder: Path, stem: str, split: str, val_fraction: float) -> Path:
    """The first `{stem}_{i}.txt` in `folder` whose path identity hashes into `split`."""
    for i in range(10_000):
        path = folder / f"{stem}_{i:04d}.txt"
        if not path.exists() and prep.split_of(path.name, val_fraction) == split:
            return path
    raise AssertionError("no name found")


def make_corpus(folder: Path, n_train: int = 30, n_val: int = 10, seed: int = 0, val_fraction: float = 0.25) -> Path:
    """Files chosen by name to land exactly n_train/n_val in each split, so the val-fraction check
    never flakes on the random absolute path of tmp_path."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        for _ in range(n):
            named_for_split(folder, "doc", split, val_fraction).write_text(text(rng))
    return folder


def write_params(root: Path, source, evaluate: dict | None = None, **prepare) -> None:
    params = {"corpus": {"source": source, "extensions": [".txt"]}, "prepare": {**PREPARE, **prepare},
              "evaluate": evaluate or {}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def run_stage(root: Path, stage: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)


def run_in(root: Path, stage_main):
    with contextlib.chdir(root):
        return stage_main()


def assert_failed(proc: subprocess.CompletedProcess, rc: int, expected: str | re.Pattern) -> None:
    assert proc.returncode == rc, proc.stderr
    assert "Traceback" not in proc.stderr
    if isinstance(expected, re.Pattern):
        assert expected.fullmatch(proc.stderr), proc.stderr
    else:
        assert proc.stderr == expected, proc.stderr


def assert_untouched(root: Path, before: dict[str, bytes] | None = None) -> None:
    """data/prepared is exactly as before (absent, or the same files) and no temp dir is left behind."""
    prepared = root / "data" / "prepared"
    if before is None:
        assert not prepared.exists()
    else:
        assert {p.name: p.read_bytes() for p in prepared.iterdir()} == before
    assert not [p for p in (root / "data").iterdir() if p.name.startswith(".prepared")]


def seed_prepared(root: Path) -> dict[str, bytes]:
    """A stand-in for a previous good output, to show a failed run does not touch it."""
    prepared = root / "data" / "prepared"
    prepared.mkdir(parents=True)
    (prepared / "meta.json").write_text('{"previous": "run"}\n')
    return {"meta.json": (prepared / "meta.json").read_bytes()}


# ---------------------------------------------------------------- a good run (shared)


BIG_LINE = "an oversized document is split into chunks of whole lines, each one below max_doc_bytes\n"


def big_text(n_lines: int) -> str:
    """Numbered lines, so no two chunks are duplicates of each other."""
    return "".join(f"{i:04d} {BIG_LINE}" for i in range(n_lines))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A corpus with one duplicate, one empty file and one document over max_doc_bytes (split into 3
    chunks, in train), prepared in-process twice (for determinism); the second run's stdout is kept."""
    from stages import corpus as corpus_stage
    from stages import prepare as prepare_stage

    root = tmp_path_factory.mktemp("good")
    src = make_corpus(root / "src")
    (src / "dup.txt").write_text((src / sorted(os.listdir(src))[0]).read_text())
    (src / "empty.txt").write_text("  \n")
    (src / "notes.md").write_text("not taken: wrong extension")
    named_for_split(src, "big", "train", 0.25).write_text(big_text(62))  # 5766 bytes: 26 + 26 + 10 lines
    write_params(root, "src", max_skipped_fraction=0.1, max_doc_bytes=2500)
    run_in(root, corpus_stage.main)
    metrics = run_in(root, prepare_stage.main)
    first = {p.name: p.read_bytes() for p in (root / "data" / "prepared").iterdir()}
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        metrics2 = run_in(root, prepare_stage.main)
    return root, first, metrics, metrics2, stdout.getvalue()


def test_prepare_outputs(good):
    root, _, metrics, *_ = good
    out = root / "data" / "prepared"
    assert sorted(p.name for p in out.iterdir()) == ["docs.parquet", "meta.json", "tokenizer.json", "train.bin",
                                                     "train.idx.npy", "val.bin", "val.idx.npy"]
    meta = json.loads((out / "meta.json").read_text())
    manifest = root / "data" / "corpus" / "manifest.jsonl"
    assert meta["vocab_size"] == 300 and meta["dtype"] == "uint16" and meta["eos_id"] == 0
    assert meta["source_manifest_sha256"] == sha256_file(manifest)
    docs = pd.read_parquet(out / "docs.parquet")
    assert list(docs.columns) == ["path", "document", "sha256", "n_bytes", "n_tokens", "split", "status",
                                  "max_token_id"]
    assert len(docs) == 45 and docs.status.value_counts().to_dict() == {"kept": 43, "duplicate": 1, "empty": 1}
    for split in ("train", "val"):
        tokens = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
        idx = np.load(out / f"{split}.idx.npy")
        kept = docs[(docs.status == "kept") & (docs.split == split)]
        assert idx.dtype == np.int64 and len(idx) == len(kept) + 1 == meta["splits"][split]["n_docs"] + 1
        assert idx[-1] == len(tokens) == meta["splits"][split]["n_tokens"] == (kept.n_tokens + 1).sum()
        assert (tokens[idx[1:] - 1] == 0).all() and tokens.max() < 300
        assert metrics[split]["n_docs"] == len(kept)
    skipped = docs[docs.status != "kept"]
    assert (skipped.split == "").all() and (skipped.n_tokens == 0).all() and (skipped.max_token_id == -1).all()
    assert metrics["skipped"] == {"invalid_utf8": 0, "empty": 1, "binary": 0, "too_small": 0, "oversized": 0,
                                  "duplicate": 1}
    dup_bytes = int(docs.n_bytes[docs.status == "duplicate"].iloc[0])
    assert metrics["skipped_bytes"] == {"invalid_utf8": 0, "empty": 3, "binary": 0, "too_small": 0, "oversized": 0,
                                        "duplicate": dup_bytes}
    assert metrics["skipped_bytes_fraction"] == round(dup_bytes / docs.n_bytes.sum(), 6)  # the empty file aside
    assert {"tokenizer_seconds", "encode_seconds"} <= set(metrics)
    assert json.loads((root / "metrics" / "data.json").read_text())["train"]["n_docs"] == metrics["train"]["n_docs"]
    summary = json.loads((root / "reports" / "data" / "summary.json").read_text())
    assert summary["success"] and len(summary["expectations"]) >= 11
    assert summary["skipped"]["empty"] == {"docs": 1, "bytes": 3}
    assert summary["skipped"]["duplicate"] == {"docs": 1, "bytes": dup_bytes}
    # The three chunks of the big document are three token-file documents but one source document.
    assert metrics["train"]["n_docs"] == 33 and metrics["train"]["n_source_docs"] == 31
    big = docs[docs.path.str.startswith("big_")]
    assert big.path.str.fullmatch(r"big_\d{4}\.txt#[012]").all() and (big.split == "train").all()
    assert metrics["train"]["largest_doc"] == big.path.iloc[0].split("#")[0]
    assert metrics["train"]["largest_doc_bytes_share"] == round(5766 / metrics["train"]["n_bytes"], 4)
    val = docs[(docs.status == "kept") & (docs.split == "val")]
    assert metrics["val"]["n_bytes"] == val.n_bytes.sum() and metrics["val"]["n_source_docs"] == 10
    assert metrics["val"]["largest_doc_bytes_share"] == round(val.n_bytes.max() / val.n_bytes.sum(), 4)
    largest = val.loc[val.n_bytes.idxmax()]  # the tokens share is the same (largest by bytes) document's
    assert metrics["val"]["largest_doc"] == largest.path
    assert metrics["val"]["largest_doc_tokens_share"] == round(largest.n_tokens / val.n_tokens.sum(), 4)
    # Every val document is under the default cap, so the evaluation scores all val tokens (EOS aside).
    assert metrics["val"]["scored"] == {"max_tokens_per_doc": CAP, "n_tokens": val.n_tokens.sum(),
                                        "largest_doc": val.path[val.n_tokens.idxmax()],
                                        "largest_doc_tokens_share": round(val.n_tokens.max() / val.n_tokens.sum(), 4)}
    assert all({"name", "column", "success", "observed"} <= set(e) for e in summary["expectations"])
    assert (root / "reports" / "data" / "docs" / "index.html").is_file()


def test_round_trip(good):
    """Every kept document decodes from its slice of the token file back to its exact text."""
    from tokenizers import Tokenizer

    root = good[0]
    out = root / "data" / "prepared"
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.token_to_id(prep.EOS) == 0
    docs = pd.read_parquet(out / "docs.parquet")
    for split in ("train", "val"):
        tokens = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
        idx = np.load(out / f"{split}.idx.npy")
        kept = docs[(docs.status == "kept") & (docs.split == split)]
        decoded: dict[str, str] = {}  # a file's chunks ("name#k", in order) decode back to the file
        for (start, end), path in zip(zip(idx[:-1], idx[1:]), kept.path, strict=True):
            chunk = prep.decode_document(tok, tokens[start:end - 1])
            assert len(chunk.encode()) <= 2500
            decoded[path.split("#")[0]] = decoded.get(path.split("#")[0], "") + chunk
        assert decoded == {name: (root / "src" / name).read_text() for name in decoded}
    # Text the corpus never showed, including the EOS string itself, which must stay plain text.
    tricky = ["naïve café ☕ 日本語 🦀\r\n\ttabs", "a<|endoftext|>b", " leading and trailing  ", "\x0c\x0b"]
    _, _, per_doc = prep.encode_documents(tok, tricky, "uint16", "test")
    assert [prep.decode_document(tok, ids) for ids in per_doc] == tricky
    assert all(0 not in ids for ids in per_doc)


def test_determinism(good):
    """Two runs over the same corpus give byte-identical outputs (tokenizer.json and token files included)."""
    root, first, *_ = good
    second = {p.name: p.read_bytes() for p in (root / "data" / "prepared").iterdir()}
    assert first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], name


def test_split_by_path_hash(good):
    root = good[0]
    docs = pd.read_parquet(root / "data" / "prepared" / "docs.parquet")
    kept = docs[docs.status == "kept"]
    assert (kept.split == [prep.split_of(p.split("#")[0], 0.25) for p in kept.path]).all()  # chunks: their file's
    assert (kept.split == "val").sum() == 10  # make_corpus chose names for exactly 10 val documents
    # The rule itself: a fixed identity keeps its split, and the fraction converges on val_fraction.
    assert prep.split_of("/a/b.py", 0.5) == prep.split_of("/a/b.py", 0.5)
    share = np.mean([prep.split_of(f"/corpus/{i}.py", 0.1) == "val" for i in range(20_000)])
    assert abs(share - 0.1) < 0.01


# ---------------------------------------------------------------- corpus stage


def test_manifest_sorted_stable_and_sources(tmp_path):
    from stages import corpus as corpus_stage

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for name in ("b.txt", "a.txt", "sub/c.txt", "skip.md"):
        (src / name).write_text(f"content of {name}\n")
    write_params(tmp_path, "src")
    run_in(tmp_path, corpus_stage.main)
    manifest = tmp_path / "data" / "corpus" / "manifest.jsonl"
    first = manifest.read_bytes()
    entries = [json.loads(line) for line in first.splitlines()]
    paths = [e["path"] for e in entries]
    assert paths == sorted(paths) and [Path(p).name for p in paths] == ["a.txt", "b.txt", "c.txt"]
    assert entries[0] == {"name": "a.txt", "path": str(src / "a.txt"), "size": 17,
                          "sha256": sha256_file(src / "a.txt")}
    assert [e["name"] for e in entries] == ["a.txt", "b.txt", "sub/c.txt"]
    run_in(tmp_path, corpus_stage.main)
    assert manifest.read_bytes() == first
    # A glob, a list (overlaps counted once, named by the first source listing them) and a .jsonl file
    # are sources too; a file is named relative to its source's root (a glob's leading directory).
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    files = corpus_mod.list_corpus([str(src / "*.txt"), str(src), str(tmp_path / "d.jsonl")], [".txt"])
    assert [f.name for f in files] == ["d.jsonl", "a.txt", "b.txt", "c.txt"]
    named = corpus_mod.named_corpus([str(tmp_path / "s*" / "**" / "*.txt"), str(tmp_path / "d.jsonl")], [".txt"])
    assert list(named.values()) == ["d.jsonl", "src/a.txt", "src/b.txt", "src/sub/c.txt"]


def test_stdlib_source_excludes_tests_and_packages():
    files = corpus_mod.stdlib_files()
    dirs = {part for f in files for part in f.parts[:-1]}
    assert len(files) > 300 and any(f.name == "__init__.py" and f.parent.name == "json" for f in files)
    assert not dirs & {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    assert not [d for d in dirs if d.startswith("test_") or d.endswith("_test")]


# ---------------------------------------------------------------- units


def test_classify_reasons():
    p = PrepareParams(min_doc_bytes=5, max_doc_bytes=100)
    assert prep.classify(b"hello world", 5, 100) == ("kept", "hello world")
    assert prep.classify(b"caf\xe9 au lait", 5, 100)[0] == "invalid_utf8"
    assert prep.classify(b" \n\t ", 5, 100)[0] == "empty"
    assert prep.classify(b"text\x00more", 5, 100)[0] == "binary"
    assert prep.classify(bytes(range(1, 32)) * 3 + b"abc", 5, 100)[0] == "binary"
    assert prep.classify(b"hi", 5, 100)[0] == "too_small"
    assert prep.classify(b"x" * 101, 5, 100)[0] == "oversized"
    docs = [prep.RawDoc("/a", b"same text"), prep.RawDoc("/b", b"same text"), prep.RawDoc("/c", b"other text")]
    table, texts = prep.filter_documents(docs, p)
    assert table.status.tolist() == ["kept", "duplicate", "kept"] and texts == ["same text", "other text"]
    table, texts = prep.filter_documents(docs, p.model_copy(update={"dedup": False}))
    assert table.status.tolist() == ["kept"] * 3


def test_jsonl_documents(tmp_path):
    good = b'{"text": "first"}\n\n{"text": "second", "id": 2}\n{"text": "\\ud800"}\n\xff\xfe\n'
    docs = list(prep.jsonl_documents("/c.jsonl", good))
    h = {k: prep.hashlib.sha256(v).hexdigest()[:16] for k, v in (("first", b"first"), ("raw", b"\xff\xfe"),
                                                                  ("lone", "\ud800".encode("utf-8", "surrogatepass")))}
    assert [d.identity for d in docs] == [f"/c.jsonl:sha256={h['first']}", "/c.jsonl:id=2",
                                          f"/c.jsonl:sha256={h['lone']}", f"/c.jsonl:sha256={h['raw']}"]
    assert [prep.classify(d.data, 1, 100)[0] for d in docs] == ["kept", "kept", "invalid_utf8", "invalid_utf8"]
    with pytest.raises(UserError, match=r"^/c.jsonl:3: duplicate \"id\" '7' \(first on line 1\)$"):
        list(prep.jsonl_documents("/c.jsonl", b'{"text": "a", "id": 7}\n{"text": "b"}\n{"text": "c", "id": "7"}\n'))
    with pytest.raises(UserError, match=r'^/c.jsonl:1: "id" must be a string or an integer, got list$'):
        list(prep.jsonl_documents("/c.jsonl", b'{"text": "a", "id": [1]}\n'))
    with pytest.raises(UserError, match=r"^/c.jsonl:2: not valid JSON \(Expecting value\)$"):
        list(prep.jsonl_documents("/c.jsonl", b'{"text": "ok"}\n{"text": nope}\n'))
    with pytest.raises(UserError, match=r'^/c.jsonl:1: no "text" field$'):
        list(prep.jsonl_documents("/c.jsonl", b'{"body": "x"}\n'))


def test_no_documents_left(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("")
    (tmp_path / "src" / "b.txt").write_bytes(b"\x00\x01")
    entries = corpus_mod.write_manifest(str(tmp_path / "src"), [".txt"], tmp_path / "m.jsonl")
    assert len(entries) == 2
    with pytest.raises(UserError, match=r"no documents left in .*m.jsonl after filtering \(empty: 1, binary: 1\)"):
        prep.prepare(PrepareParams(**PREPARE), tmp_path / "m.jsonl", tmp_path / "out", tmp_path / "rep",
                     tmp_path / "metrics.json", CAP)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- bad inputs, end to end


def corpus_then_prepare(root: Path) -> subprocess.CompletedProcess:
    proc = run_stage(root, "corpus")
    assert proc.returncode == 0, proc.stderr
    return run_stage(root, "prepare")


BAD_FILES = {"binary": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 8,
             "invalid_utf8": "café au lait, crème brûlée\n".encode("latin-1") * 8}


def bad_file_project(root: Path, kind: str) -> str:
    """One bad file in 41 is 2.44% skipped > max_skipped_fraction=0.02."""
    make_corpus(root / "src")
    (root / "src" / "bad.txt").write_bytes(BAD_FILES[kind])
    write_params(root, "src")
    return (f"error: expect_column_values_to_be_in_set(status): 2.44% of documents skipped "
            f"({kind}: 1) > max_skipped_fraction=0.02\n")


def leak_project(root: Path) -> str:
    """dedup: false and two identical files whose paths hash into different splits."""
    src = make_corpus(root / "src")
    names = []
    for split in ("train", "val"):
        path = named_for_split(src, "dup", split, 0.25)
        path.write_text("the same document twice\n" * 20)
        names.append(path.name)
    write_params(root, "src", dedup=False)
    first, second = sorted(names)
    return (f"error: expect_column_values_to_be_in_set(in_both_splits): 2 kept documents have identical content "
            f"in both train and val ({first}, {second}); set prepare.dedup: true\n")


@pytest.fixture(scope="module")
def suite_failures(tmp_path_factory):
    """The cases the GX suite must stop, run as concurrent subprocesses: each pays GX's multi-second
    import, and side by side that cost is paid once per core instead of once per case."""
    cases = {}
    for name in ("binary", "invalid_utf8", "leak"):
        root = tmp_path_factory.mktemp(name)
        expected = leak_project(root) if name == "leak" else bad_file_project(root, name)
        assert run_stage(root, "corpus").returncode == 0
        cases[name] = (root, expected, seed_prepared(root) if name != "leak" else None)
    # One tokenizers thread each: the corpora are tiny, and idle rayon workers spinning in three
    # processes at once would steal the cores the GX imports need.
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAYON_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen([sys.executable, "-m", "stages.prepare"], cwd=root, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (root, _, _) in cases.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return {name: (*cases[name], results[name]) for name in cases}


@pytest.mark.parametrize("kind", ["binary", "invalid_utf8"])
def test_skipped_fraction_fails_suite(suite_failures, kind):
    """The GX suite stops the stage; data/prepared keeps the previous run, the reports are still written."""
    root, expected, before, proc = suite_failures[kind]
    assert_failed(proc, 1, expected)
    assert_untouched(root, before)
    summary = json.loads((root / "reports" / "data" / "summary.json").read_text())
    assert not summary["success"] and (root / "reports" / "data" / "docs" / "index.html").is_file()
    failed = [e for e in summary["expectations"] if not e["success"]]
    assert [(e["column"], e["observed"]["unexpected_count"]) for e in failed] == [("status", 1)]
    assert not (root / "metrics" / "data.json").exists()


def test_duplicate_across_splits_fails_suite(suite_failures):
    root, expected, _, proc = suite_failures["leak"]
    assert_failed(proc, 1, expected)
    assert_untouched(root)


def test_corpus_too_small_for_vocab(tmp_path):
    make_corpus(tmp_path / "src", n_train=6, n_val=2)
    write_params(tmp_path, "src", vocab_size=5000)
    proc = corpus_then_prepare(tmp_path)
    assert_failed(proc, 2, re.compile(r"error: prepare\.vocab_size: corpus too small for vocab_size=5000 "
                                      r"\(tokenizer learned only \d+ tokens\)\n"))
    assert_untouched(tmp_path)
    assert not (tmp_path / "reports").exists()


def test_source_changed_after_manifest(tmp_path):
    src = make_corpus(tmp_path / "src", n_train=6, n_val=2)
    write_params(tmp_path, "src")
    assert run_stage(tmp_path, "corpus").returncode == 0
    changed = sorted(src.iterdir())[3]
    changed.write_text(changed.read_text() + "edited\n")
    before = seed_prepared(tmp_path)
    proc = run_stage(tmp_path, "prepare")
    assert_failed(proc, 2, f"error: {changed}: changed since data/corpus/manifest.jsonl was written; "
                           f"rerun `python -m stages.corpus`\n")
    assert_untouched(tmp_path, before)


def test_empty_corpus(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "readme.md").write_text("not a .txt")
    write_params(tmp_path, "src")
    proc = run_stage(tmp_path, "corpus")
    assert_failed(proc, 2, "error: corpus: no documents found in src (extensions: .txt)\n")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("source, message", [("missing_dir", "missing_dir: no such file or directory"),
                                             ("src/*.nothing", "src/*.nothing: pattern matches no files")])
def test_nonexistent_source(tmp_path, source, message):
    make_corpus(tmp_path / "src", n_train=2, n_val=1)
    write_params(tmp_path, ["src", source])
    proc = run_stage(tmp_path, "corpus")
    assert_failed(proc, 2, f"error: corpus.source: {message}\n")
    assert not (tmp_path / "data").exists()
    # prepare without a manifest says what to run instead of a traceback
    proc = run_stage(tmp_path, "prepare")
    assert_failed(proc, 2, "error: data/corpus/manifest.jsonl: not found (run `python -m stages.corpus` first)\n")
    assert not (tmp_path / "data" / "prepared").exists()


# ---------------------------------------------------------------- a growing corpus, chunks, empty files, suffixes


def kept_splits(manifest: Path, **params) -> dict[str, str]:
    """identity -> split of every kept document (decided before any tokenizer work)."""
    p = PrepareParams(**{**PREPARE, **params})
    table, _ = prep.filter_documents(prep.load_documents(corpus_mod.read_manifest(manifest), manifest), p)
    kept = table[table.status == "kept"]
    return dict(zip(kept.path, kept.split, strict=True))


def test_split_stable_as_corpus_grows(tmp_path):
    """Files added above, beside and in new directories, and lines inserted into a .jsonl, never rename
    or move an existing document (with identities relative to the common directory of all files, the
    file above renamed every document; with .jsonl line numbers, the inserted line moved every later one)."""
    rng = random.Random(1)
    src = tmp_path / "src"
    for sub in ("pkg", "pkg/sub", "pkg/gen"):
        (src / sub).mkdir(parents=True)
    for i in range(20):
        (src / "pkg" / f"m{i}.txt").write_text(text(rng, 24))
        (src / "pkg" / "sub" / f"s{i}.txt").write_text(text(rng, 24))
        (src / "pkg" / "gen" / f"g{i}.md").write_text(text(rng, 24))
    lines = [json.dumps({"text": text(rng, 24)}) for _ in range(20)]
    jsonl = src / "pkg" / "sub" / "lines.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    sources = [str(src), str(src / "pkg" / "g*" / "*.md"), str(jsonl)]
    corpus_mod.write_manifest(sources, [".txt"], tmp_path / "m.jsonl")
    before = kept_splits(tmp_path / "m.jsonl", val_fraction=0.3)
    assert len(before) == 80 and 10 < list(before.values()).count("val") < 40
    assert {"pkg/m0.txt", "pkg/sub/s0.txt", "gen/g0.md"} <= set(before)

    (src / "top.txt").write_text(text(rng, 24))  # above every other file
    (src / "pkg" / "beside.txt").write_text(text(rng, 24))
    (src / "pkg" / "new" / "deeper").mkdir(parents=True)
    (src / "pkg" / "new" / "deeper" / "n.txt").write_text(text(rng, 24))
    (src / "pkg" / "gen2").mkdir()
    (src / "pkg" / "gen2" / "g.md").write_text(text(rng, 24))
    lines[10:10] = [json.dumps({"text": text(rng, 24)})]
    jsonl.write_text(json.dumps({"text": "inserted first " + text(rng, 24)}) + "\n" + "\n".join(lines) + "\n")
    corpus_mod.write_manifest(sources, [".txt"], tmp_path / "m.jsonl")
    after = kept_splits(tmp_path / "m.jsonl", val_fraction=0.3)
    assert len(after) == 86
    assert {k: after.get(k) for k in before} == before


def test_dedup_keeps_the_same_copy_wherever_sources_live(tmp_path):
    """Two sources holding one text twice, as a.txt and b.txt: whichever source's directory sorts first
    on this machine, the copy kept (and so the split its text lands in) is a.txt, the first by name."""
    for layout, (dir_a, dir_b) in {"one": ("x", "y"), "other": ("y", "x")}.items():
        for folder, name in ((dir_a, "a.txt"), (dir_b, "b.txt")):
            (tmp_path / layout / folder).mkdir(parents=True)
            (tmp_path / layout / folder / name).write_text("the same text in two places\n")
        manifest = tmp_path / layout / "m.jsonl"
        corpus_mod.write_manifest([str(tmp_path / layout / "y"), str(tmp_path / layout / "x")], [".txt"], manifest)
        assert kept_splits(manifest) == {"a.txt": prep.split_of("a.txt", 0.25)}, layout


def test_chunk_lines():
    data = "".join(f"line {i} " + "é" * (i % 7) + "\n" for i in range(200)).encode()
    chunks = prep.chunk_lines(data, 100)
    assert b"".join(chunks) == data and len(chunks) > 10
    assert all(len(c) <= 100 and c.endswith(b"\n") for c in chunks)  # whole lines only
    # A line longer than the limit is cut inside, never through a UTF-8 character.
    data = ("日本語" * 100 + "\nend\r\nlast").encode()
    chunks = prep.chunk_lines(data, 100)
    assert b"".join(chunks) == data and all(len(c) <= 100 for c in chunks)
    assert [c.decode() for c in chunks][-1].endswith("語\nend\r\nlast")


def test_oversized_documents_split_or_dropped():
    """Split: one row per chunk, '<identity>#<k>', all in the split drawn from the document's identity.
    Drop: one 'oversized' row with the document's bytes."""
    docs = [prep.RawDoc(f"d{i}.txt", "".join(f"document {i} line {j}\n" for j in range(40)).encode())
            for i in range(20)]
    p = PrepareParams(**{**PREPARE, "val_fraction": 0.5, "max_doc_bytes": 200})
    table, texts = prep.filter_documents(docs, p)
    assert (table.status == "kept").all() and len(texts) == len(table) > 20
    for doc in docs:
        rows = table[table.document == doc.identity]
        assert rows.path.tolist() == [f"{doc.identity}#{k}" for k in range(len(rows))]
        assert set(rows.split) == {prep.split_of(doc.identity, 0.5)} and rows.n_bytes.sum() == len(doc.data)
    assert set(table.split) == {"train", "val"}
    # The evaluation caps a val document as a whole: 100 tokens a chunk, capped at 250 per document.
    chunks = table[table.split == "val"].groupby("document", sort=False).size()
    assert (chunks >= 2).all() and prep.scored_tokens(table.assign(n_tokens=100), 250).to_dict() == {
        doc: min(100 * n, 250) for doc, n in chunks.items()}
    table, texts = prep.filter_documents(docs, p.model_copy(update={"oversized": "drop"}))
    assert table.status.tolist() == ["oversized"] * 20 and not texts
    assert prep.skipped_bytes(table)["oversized"] == sum(len(d.data) for d in docs)

    from moeops.data.validate import with_derived_columns

    table, _ = prep.filter_documents(docs, p)
    assert not with_derived_columns(table).document_in_both_splits.any()
    moved = table.copy()
    moved.loc[0, "split"] = "val" if moved.loc[0, "split"] == "train" else "train"  # one chunk in the other split
    flagged = with_derived_columns(moved)
    assert set(flagged.document[flagged.document_in_both_splits]) == {"d0.txt"}


def prepare_in(root: Path, source, extensions, **params) -> dict:
    """corpus + prepare in-process (GX is imported once per test process) into root/{data,reports,metrics}."""
    corpus_mod.write_manifest(source, extensions, root / "m.jsonl")
    return prep.prepare(PrepareParams(**{**PREPARE, **params}), root / "m.jsonl", root / "data" / "prepared",
                        root / "reports" / "data", root / "metrics" / "data.json", CAP)


def test_oversized_bytes_bounded(tmp_path):
    """One document holding half the corpus's bytes: dropping it is 1 document in 41 (under
    max_skipped_fraction) but 50% of the bytes, which the suite stops; split into chunks, nothing is lost."""
    src = make_corpus(tmp_path / "src")
    corpus_bytes = sum(f.stat().st_size for f in src.iterdir())
    (src / "big.txt").write_text(big_text(corpus_bytes // (len(BIG_LINE) + 5)))
    with pytest.raises(DataValidationError) as e:
        prepare_in(tmp_path, str(src), [".txt"], max_doc_bytes=5000, max_skipped_fraction=0.05, oversized="drop")
    big = (src / "big.txt").stat().st_size
    share = 100 * big / (corpus_bytes + big)
    assert str(e.value) == (f"expect_column_sum_to_be_between(skipped_bytes_share): {share:.3g}% of the corpus's "
                            f"bytes skipped (oversized: {big} bytes; largest big.txt) > "
                            f"max_skipped_bytes_fraction=0.05")
    summary = json.loads((tmp_path / "reports" / "data" / "summary.json").read_text())
    assert summary["skipped"]["oversized"] == {"docs": 1, "bytes": big} and not summary["success"]
    assert not (tmp_path / "data" / "prepared").exists()

    metrics = prepare_in(tmp_path, str(src), [".txt"], max_doc_bytes=5000, max_skipped_fraction=0.05)
    assert metrics["skipped_bytes_fraction"] == 0 and metrics["skipped"]["oversized"] == 0
    docs = pd.read_parquet(tmp_path / "data" / "prepared" / "docs.parquet")
    chunks = docs[docs.path.str.startswith("big.txt#")]
    assert len(chunks) >= 2 and (chunks.n_bytes <= 5000).all()
    assert chunks.n_bytes.sum() == big and chunks.split.nunique() == 1 and (chunks.status == "kept").all()


def test_val_doc_share_bounded_after_cap(tmp_path):
    """One val file of ~3,000 tokens beside ten of ~500: ~38% of the val tokens, over max_val_doc_share=0.15,
    so the suite stops the stage (one line, nothing written). With evaluate.max_tokens_per_doc at 800 it
    weighs 800 tokens in the evaluation, 14% of them: it passes, and metrics/data.json's val "scored"
    holds what moeops.evaluate.scoring's val_documents then scores."""
    from moeops.evaluate.scoring import val_documents
    from moeops.model.io import load_tokenizer
    from stages import corpus as corpus_stage
    from stages import prepare as prepare_stage

    src = make_corpus(tmp_path / "src")
    big = named_for_split(src, "big", "val", 0.25)
    big.write_text(big_text(40))
    write_params(tmp_path, "src")
    run_in(tmp_path, corpus_stage.main)
    before = seed_prepared(tmp_path)
    with pytest.raises(DataValidationError) as e:
        run_in(tmp_path, prepare_stage.main)
    assert_untouched(tmp_path, before)
    assert not (tmp_path / "metrics" / "data.json").exists()
    summary = json.loads((tmp_path / "reports" / "data" / "summary.json").read_text())
    failed = [(r["column"], r["per_split"]["largest_doc_scored_share"]["train"]) for r in summary["expectations"]
              if not r["success"]]
    assert failed == [("largest_doc_scored_share", None)]  # the train row is null: GX checks val's alone

    write_params(tmp_path, "src", evaluate={"max_tokens_per_doc": 800})
    metrics = run_in(tmp_path, prepare_stage.main)
    prepared = tmp_path / "data" / "prepared"
    docs = pd.read_parquet(prepared / "docs.parquet")
    val = docs[(docs.status == "kept") & (docs.split == "val")].set_index("path").n_tokens
    assert val[big.name] > 800 > val.drop(big.name).max()  # the cap cuts the big file only
    # The failure above, from the same documents' token counts (the cap changes no tokenization).
    assert str(e.value) == (f"expect_column_values_to_be_between(largest_doc_scored_share): val document {big.name} "
                            f"is {100 * val[big.name] / val.sum():.3g}% of the {val.sum()} val tokens scored (each "
                            f"document capped at evaluate.max_tokens_per_doc={CAP}) > max_val_doc_share=0.15; "
                            "lower the cap or add val documents")
    n_scored = val.drop(big.name).sum() + 800
    assert metrics["val"]["scored"] == {"max_tokens_per_doc": 800, "n_tokens": n_scored, "largest_doc": big.name,
                                        "largest_doc_tokens_share": round(800 / n_scored, 4)}
    assert 800 / n_scored <= 0.15
    assert json.loads((tmp_path / "metrics" / "data.json").read_text())["val"]["scored"]["n_tokens"] == n_scored
    # The evaluation's own reading of data/prepared scores those documents and tokens.
    tok = load_tokenizer(prepared / "tokenizer.json")
    scored = {d.name: (d.complete, len(tok.encode(d.text, add_special_tokens=False).ids))
              for d in val_documents(prepared, 800)}
    assert scored == {name: (n <= 800, min(n, 800)) for name, n in val.items()}


def test_extensionless_corpus_and_empty_files(tmp_path):
    """A directory of license texts without suffixes ("GPL-2") or with odd ones ("Apache-2.0") is a corpus
    with extensions ["*"]; empty files are counted as "empty" but never count against the limits."""
    rng = random.Random(2)
    src = tmp_path / "licenses"
    for i in range(4):
        (src / f"pkg{i}").mkdir(parents=True)
        (src / f"pkg{i}" / "__init__").write_text("")
    for i in range(15):
        (src / f"GPL-{i}").write_text(text(rng))
        (src / f"Apache-{i}.0").write_text(text(rng))
    (src / ".hidden").write_text("hidden files are never taken")
    assert len(corpus_mod.list_corpus(str(src), [""])) == 19  # no suffix: GPL-* and the __init__ files
    assert len(corpus_mod.list_corpus(str(src), ["*"])) == 34
    # 7 val documents of equal length: each is ~1/7 of val, over the default max_val_doc_share.
    metrics = prepare_in(tmp_path, str(src), ["*"], max_skipped_fraction=0.0, max_skipped_bytes_fraction=0.0,
                         max_val_doc_share=0.25)
    assert metrics["skipped"]["empty"] == 4 and metrics["skipped_bytes_fraction"] == 0
    assert metrics["train"]["n_docs"] + metrics["val"]["n_docs"] == 30
    before = {p.name: p.read_bytes() for p in (tmp_path / "data" / "prepared").iterdir()}

    (src / "logo").write_bytes(BAD_FILES["binary"])  # 1 of 31 non-empty documents: 3.23% (of 35: 2.86%)
    with pytest.raises(DataValidationError) as e:
        prepare_in(tmp_path, str(src), ["*"], max_skipped_fraction=0.0, max_val_doc_share=0.25)
    assert str(e.value) == ("expect_column_values_to_be_in_set(status): 3.23% of documents skipped (binary: 1) > "
                            "max_skipped_fraction=0.0")
    assert {p.name: p.read_bytes() for p in (tmp_path / "data" / "prepared").iterdir()} == before


@pytest.mark.parametrize("extensions, message", [
    ([], 'empty list: name suffixes (".txt"), "" (files without one) or "*" (every file)'),
    (["*.txt"], "'*.txt' is not a file suffix"),
    (["src/"], "'src/' is not a file suffix"),
    ([".tar.gz"], "'.tar.gz' is not a file suffix"),
    ([" py"], "' py' is not a file suffix"),
])
def test_bad_extensions(tmp_path, extensions, message):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"corpus": {"source": "src", "extensions": extensions}}))
    with pytest.raises(UserError) as e:
        load_section("corpus", tmp_path / "params.yaml")
    assert str(e.value).startswith(f"{tmp_path / 'params.yaml'}: corpus.extensions: {message}")
    assert "\n" not in str(e.value)


def test_good_extensions(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"corpus": {"extensions": ["", "*", "py", ".md"]}}))
    assert load_section("corpus", tmp_path / "params.yaml").extensions == ["", "*", "py", ".md"]


def test_small_val_warns(good):
    """10 val documents: a printed warning and a field in metrics/data.json, not a failure."""
    root, _, metrics, _, stdout = good
    assert metrics["warnings"] == [w.removeprefix("prepare: warning: ") for w in stdout.splitlines()
                                   if w.startswith("prepare: warning: ")]
    assert len(metrics["warnings"]) == 1 and metrics["warnings"][0].startswith("val split is small (10 documents, ")
    assert json.loads((root / "metrics" / "data.json").read_text())["warnings"] == metrics["warnings"]
    assert prep.val_warnings({"n_source_docs": 30, "n_bytes": 100_000}) == []
    assert len(prep.val_warnings({"n_source_docs": 29, "n_bytes": 10**6})) == 1
    assert len(prep.val_warnings({"n_source_docs": 1000, "n_bytes": 99_999})) == 1
