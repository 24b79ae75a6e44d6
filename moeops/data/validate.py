"""Great Expectations 1.x suite over the prepared data.

Two tables are validated:
  docs    one row per source document or chunk (kept and skipped), docs.parquet's (whose `document` is the
          identity a chunk's split follows), plus derived columns
          (`in_both_splits`, `document_in_both_splits`, `is_val`, `skipped_bytes_share`) that turn
          cross-row properties into per-row checks;
  splits  one row per split, computed by reading the written train/val .bin and .idx.npy files back,
          so the suite checks what is on disk, not what the encoder meant to write; and, on the val row,
          the largest document's share of the val tokens the evaluation scores (after its cap).

GX takes several seconds to import, so it is imported inside `run_suite` only, after the tokenizer
work. Each failed expectation becomes one line naming it and its observed value (`failure_lines`).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from moeops.data.prepare import COUNTED_SKIPS, scored_tokens

SPLITS = ("train", "val")


# ---------------------------------------------------------------- tables


def read_split(prepared: Path, split: str, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.fromfile(prepared / f"{split}.bin", dtype=dtype)
    offsets = np.load(prepared / f"{split}.idx.npy")
    return tokens, offsets


def offsets_consistent(tokens: np.ndarray, offsets: np.ndarray, eos_id: int) -> bool:
    """The index starts at 0, ends at the file length, every document is >= 1 token plus its EOS,
    and EOS appears exactly at the document ends (none inside a document)."""
    if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(tokens):
        return False
    if len(offsets) > 1 and (np.diff(offsets) < 2).any():
        return False
    ends = offsets[1:] - 1
    return bool((tokens[ends] == eos_id).all()) and int((tokens == eos_id).sum()) == len(ends)


def split_table(prepared: Path, docs: pd.DataFrame, dtype: str, eos_id: int, max_tokens_per_doc: int) -> pd.DataFrame:
    """One row per split from the token files on disk, next to what the docs table says it should hold.
    `largest_doc_scored_share` is null on the train row (GX skips nulls), so its check is val's alone."""
    scored = scored_tokens(docs, max_tokens_per_doc)
    rows = []
    for split in SPLITS:
        tokens, offsets = read_split(prepared, split, dtype)
        kept = docs[(docs.status == "kept") & (docs.split == split)]
        n_docs = len(offsets) - 1
        content_tokens = len(tokens) - n_docs  # bytes/token is about the text, so EOS tokens don't count
        n_bytes = int(kept.n_bytes.sum())
        rows.append({
            "split": split,
            "n_docs": n_docs,
            "n_docs_kept": len(kept),
            "n_tokens": len(tokens),
            "n_bytes": n_bytes,
            "max_token_id": int(tokens.max()) if len(tokens) else -1,
            "min_token_id": int(tokens.min()) if len(tokens) else -1,
            # None (not 0) for an empty split: the n_docs check already reports it, once.
            "bytes_per_token": n_bytes / content_tokens if content_tokens > 0 else None,
            "idx_consistent": offsets_consistent(tokens, offsets, eos_id),
            "largest_doc_scored_share": scored.max() / scored.sum() if split == "val" and scored.sum() else None,
        })
    return pd.DataFrame(rows)


def with_derived_columns(docs: pd.DataFrame) -> pd.DataFrame:
    """`in_both_splits`: a kept document whose content also sits, kept, in the other split (a leak that
    dedup prevents); `document_in_both_splits`: a kept chunk whose document has kept chunks in the other
    split; `is_val`: 1.0/0.0 for kept documents, NaN for skipped ones so the mean is the val fraction of
    kept documents (GX aggregates skip nulls); `skipped_bytes_share`: a skipped (not empty) row's share
    of all the corpus's bytes, 0 otherwise, so the column's sum is the skipped byte fraction."""
    docs = docs.copy()
    kept = docs.status == "kept"
    n_splits = docs[kept].groupby("sha256").split.nunique()
    docs["in_both_splits"] = kept & docs.sha256.map(n_splits).fillna(0).gt(1)
    n_doc_splits = docs[kept].groupby("document").split.nunique()
    docs["document_in_both_splits"] = kept & docs.document.map(n_doc_splits).fillna(0).gt(1)
    docs["is_val"] = np.where(kept, (docs.split == "val").astype(float), np.nan)
    total = max(int(docs.n_bytes.sum()), 1)
    docs["skipped_bytes_share"] = np.where(docs.status.isin(COUNTED_SKIPS), docs.n_bytes / total, 0.0)
    return docs


# ---------------------------------------------------------------- the suite


class Check(NamedTuple):
    table: str  # "docs" or "splits"
    expectation: Any  # a gx.expectations.* instance
    explain: Callable[[dict[str, pd.DataFrame]], str]  # the human half of a failure line


def pct(x: float) -> str:
    return f"{100 * x:.3g}%"


def examples(paths: pd.Series, n: int = 3) -> str:
    head = [Path(p).name for p in paths.head(n)]
    return ", ".join(head) + (", ..." if len(paths) > n else "")


def explain_splits(t: dict[str, pd.DataFrame]) -> str:
    s = t["splits"]
    empty = s[s.n_docs < 1].split.tolist()
    counts = ", ".join(f"{r.split}: {r.n_docs}" for r in s.itertuples())
    return f"split {', '.join(empty) or '?'} has no documents ({counts})"


def explain_token_ids(vocab_size: int) -> Callable[[dict[str, pd.DataFrame]], str]:
    def explain(t):
        s = t["splits"]
        return f"max token id {int(s.max_token_id.max())} >= vocab_size={vocab_size}"
    return explain


def explain_idx(t: dict[str, pd.DataFrame]) -> str:
    bad = t["splits"][~t["splits"].idx_consistent.astype(bool)].split.tolist()
    return f"{', '.join(f'{b}.idx.npy' for b in bad)} does not match the EOS-separated documents in the .bin"


def explain_doc_counts(t: dict[str, pd.DataFrame]) -> str:
    s = t["splits"]
    bad = s[s.n_docs != s.n_docs_kept]
    return "; ".join(f"{r.split}.bin holds {r.n_docs} documents, docs.parquet keeps {r.n_docs_kept}"
                     for r in bad.itertuples())


def explain_bytes_per_token(lo: float, hi: float) -> Callable[[dict[str, pd.DataFrame]], str]:
    def explain(t):
        s = t["splits"].dropna(subset=["bytes_per_token"])
        bad = s[(s.bytes_per_token < lo) | (s.bytes_per_token > hi)]
        shown = ", ".join(f"{r.split} {r.bytes_per_token:.2f}" for r in bad.itertuples())
        return f"bytes per token {shown} outside [{lo}, {hi}] (min_bytes_per_token, max_bytes_per_token)"
    return explain


def explain_doc_bytes(lo: int, hi: int) -> Callable[[dict[str, pd.DataFrame]], str]:
    def explain(t):
        d = t["docs"]
        bad = d[(d.status == "kept") & ((d.n_bytes < lo) | (d.n_bytes > hi))]
        return f"{len(bad)} kept documents outside [{lo}, {hi}] bytes ({examples(bad.path)})"
    return explain


def explain_leak(t: dict[str, pd.DataFrame]) -> str:
    leaked = t["docs"][t["docs"].in_both_splits.astype(bool)]
    return (f"{len(leaked)} kept documents have identical content in both train and val "
            f"({examples(leaked.path)}); set prepare.dedup: true")


def explain_val_fraction(val_fraction: float, tol: float) -> Callable[[dict[str, pd.DataFrame]], str]:
    def explain(t):
        kept = t["docs"][t["docs"].status == "kept"]
        n_val = int((kept.split == "val").sum())
        frac = n_val / len(kept) if len(kept) else float("nan")
        return (f"val fraction {frac:.3f} ({n_val} of {len(kept)} kept documents) outside "
                f"val_fraction={val_fraction} ± val_fraction_tolerance={tol}")
    return explain


def skip_reasons(skipped: pd.DataFrame, unit: str = "docs") -> str:
    by = skipped.groupby("status").n_bytes
    counts = by.size() if unit == "docs" else by.sum()
    return ", ".join(f"{k}: {v}" if unit == "docs" else f"{k}: {v} bytes" for k, v in sorted(counts.items()))


def explain_skipped(max_skipped: float) -> Callable[[dict[str, pd.DataFrame]], str]:
    def explain(t):
        d = t["docs"][t["docs"].status != "empty"]  # empty files are counted apart, never against the limit
        skipped = d[d.status != "kept"]
        return (f"{pct(len(skipped) / len(d))} of documents skipped ({skip_reasons(skipped)}) > "
                f"max_skipped_fraction={max_skipped}")
    return explain


def explain_skipped_bytes(max_fraction: float) -> Callable[[dict[str, pd.DataFrame]], str]:
    def explain(t):
        d = t["docs"]
        skipped = d[d.status.isin(COUNTED_SKIPS)]
        largest = examples(skipped.sort_values("n_bytes", ascending=False).path, 1)
        return (f"{pct(skipped.n_bytes.sum() / d.n_bytes.sum())} of the corpus's bytes skipped "
                f"({skip_reasons(skipped, 'bytes')}; largest {largest}) > max_skipped_bytes_fraction={max_fraction}")
    return explain


def explain_document_leak(t: dict[str, pd.DataFrame]) -> str:
    leaked = t["docs"][t["docs"].document_in_both_splits.astype(bool)]
    return f"chunks of {leaked.document.nunique()} documents sit in both train and val ({examples(leaked.document)})"


def explain_val_doc_share(max_share: float, max_tokens_per_doc: int) -> Callable[[dict[str, pd.DataFrame]], str]:
    def explain(t):
        scored = scored_tokens(t["docs"], max_tokens_per_doc)
        largest = scored.idxmax()
        return (f"val document {largest} is {pct(scored[largest] / scored.sum())} of the {int(scored.sum())} val "
                f"tokens scored (each document capped at evaluate.max_tokens_per_doc={max_tokens_per_doc}) > "
                f"max_val_doc_share={max_share}; lower the cap or add val documents")
    return explain


def build_checks(gx: Any, p: Any, max_tokens_per_doc: int) -> list[Check]:
    """The suite, with thresholds from PrepareParams `p` and the evaluation's cap per val document.
    `gx` is the imported great_expectations module."""
    E = gx.expectations
    from great_expectations.expectations.row_conditions import Column

    kept = Column("status") == "kept"
    lo_val = max(0.0, p.val_fraction - p.val_fraction_tolerance)
    hi_val = min(1.0, p.val_fraction + p.val_fraction_tolerance)
    return [
        Check("splits", E.ExpectColumnValuesToBeBetween(column="n_docs", min_value=1), explain_splits),
        Check("splits", E.ExpectColumnValuesToBeBetween(column="max_token_id", max_value=p.vocab_size - 1),
              explain_token_ids(p.vocab_size)),
        Check("splits", E.ExpectColumnValuesToBeInSet(column="idx_consistent", value_set=[True]), explain_idx),
        Check("splits", E.ExpectColumnPairValuesToBeEqual(column_A="n_docs", column_B="n_docs_kept"),
              explain_doc_counts),
        Check("splits", E.ExpectColumnValuesToBeBetween(column="bytes_per_token", min_value=p.min_bytes_per_token,
                                                        max_value=p.max_bytes_per_token),
              explain_bytes_per_token(p.min_bytes_per_token, p.max_bytes_per_token)),
        Check("splits", E.ExpectColumnValuesToBeBetween(column="largest_doc_scored_share",
                                                        max_value=p.max_val_doc_share),
              explain_val_doc_share(p.max_val_doc_share, max_tokens_per_doc)),
        Check("docs", E.ExpectColumnValuesToBeBetween(column="n_bytes", min_value=p.min_doc_bytes,
                                                      max_value=p.max_doc_bytes, row_condition=kept),
              explain_doc_bytes(p.min_doc_bytes, p.max_doc_bytes)),
        Check("docs", E.ExpectColumnValuesToBeInSet(column="in_both_splits", value_set=[False]), explain_leak),
        Check("docs", E.ExpectColumnValuesToBeInSet(column="document_in_both_splits", value_set=[False]),
              explain_document_leak),
        Check("docs", E.ExpectColumnMeanToBeBetween(column="is_val", min_value=lo_val, max_value=hi_val),
              explain_val_fraction(p.val_fraction, p.val_fraction_tolerance)),
        Check("docs", E.ExpectColumnValuesToBeInSet(column="status", value_set=["kept"],
                                                    mostly=1 - p.max_skipped_fraction,
                                                    row_condition=Column("status") != "empty"),
              explain_skipped(p.max_skipped_fraction)),
        Check("docs", E.ExpectColumnSumToBeBetween(column="skipped_bytes_share",
                                                   max_value=p.max_skipped_bytes_fraction),
              explain_skipped_bytes(p.max_skipped_bytes_fraction)),
    ]


def data_docs_site(base_directory: Path) -> dict:
    """A local filesystem Data Docs site (GX 1.x: only `base_directory` is meant to be configured)."""
    return {
        "class_name": "SiteBuilder",
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        # Absolute: an ephemeral context has no root directory to resolve a relative one against.
        "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                          "base_directory": str(Path(base_directory).resolve())},
    }


def jsonable(x: Any) -> Any:
    """Plain JSON values: numpy scalars unwrapped, NaN/inf as null (summary.json stays strict JSON)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, str):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x if x is None or isinstance(x, bool | int | float | str) else str(x)


def observed(result: dict) -> Any:
    """The observed value GX reports: an aggregate's value, or the unexpected share of a per-row check."""
    if "observed_value" in result:
        return jsonable(result["observed_value"])
    keys = ("element_count", "unexpected_count", "unexpected_percent", "partial_unexpected_list")
    return jsonable({k: result[k] for k in keys if k in result})


def run_suite(tables: dict[str, pd.DataFrame], params: Any, docs_dir: Path, max_tokens_per_doc: int) -> list[dict]:
    """Validate every table, build the Data Docs under `docs_dir`, and return one summary record per
    expectation: name, table, column, success, observed, and (when failed) the explanation."""
    with warnings.catch_warnings():
        # GX and pandas deprecation chatter would land on stderr, where only errors belong.
        warnings.simplefilter("ignore")
        logging.getLogger("great_expectations").setLevel(logging.ERROR)
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        ctx = gx.get_context(mode="ephemeral")
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False)  # GX's own bars go to stderr
        # Replace the ephemeral context's default site (a fresh /tmp dir) rather than add a second one.
        ctx.update_data_docs_site("local_site", data_docs_site(docs_dir))
        source = ctx.data_sources.add_pandas("prepare")
        checks = build_checks(gx, params, max_tokens_per_doc)
        records = []
        for table, df in tables.items():
            mine = [c for c in checks if c.table == table]
            batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all")
            suite = ctx.suites.add(gx.ExpectationSuite(name=table))
            for c in mine:
                suite.add_expectation(c.expectation)
            vd = ctx.validation_definitions.add(gx.ValidationDefinition(data=batch, suite=suite, name=table))
            cp = ctx.checkpoints.add(gx.Checkpoint(name=table, validation_definitions=[vd],
                                                   actions=[gx.checkpoint.UpdateDataDocsAction(name="docs")]))
            result = cp.run(batch_parameters={"dataframe": df})
            (vr,) = result.run_results.values()
            by_id = {r.expectation_config.id: r for r in vr.results}  # match by id, not by result order
            records += [summary_record(c, by_id[c.expectation.id], tables) for c in mine]
    return records


def summary_record(check: Check, r: Any, tables: dict[str, pd.DataFrame]) -> dict:
    kwargs = r.expectation_config.kwargs
    column = kwargs.get("column") or f"{kwargs.get('column_A')},{kwargs.get('column_B')}"
    rec = {"name": r.expectation_config.type, "table": check.table, "column": column,
           "success": bool(r.success), "observed": observed(r.result or {})}
    if check.table == "splits":  # two rows: the values themselves say more than an unexpected count
        s = tables["splits"].set_index("split")
        rec["per_split"] = jsonable({c: s[c].to_dict() for c in column.split(",")})
    if not r.success:
        raised = exception_message(r.exception_info)
        rec["explanation"] = f"raised {raised}" if raised else check.explain(tables)
    return rec


def exception_message(info: Any) -> str | None:
    """GX reports an expectation that crashed (rather than failed) in exception_info, either flat or
    keyed by metric; either way the user gets the message instead of a misleading explanation."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message") or "an exception")
    nested = [exception_message(v) for v in info.values() if isinstance(v, dict)]
    return next((m for m in nested if m), None)


def failure_lines(records: list[dict]) -> list[str]:
    return [f"{r['name']}({r['column']}): {r['explanation']}" for r in records if not r["success"]]
