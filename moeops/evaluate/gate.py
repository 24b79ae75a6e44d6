"""The evaluation gate: the candidate against absolute budgets and against the registry's champion.

Quality is compared per document, not on one number: every val document is scored by both models
(each with its own tokenizer, so bits-per-byte stays comparable if the tokenizer changed), and a
paired bootstrap over documents gives a one-sided upper confidence bound on the candidate's
relative bits-per-byte change. The candidate is rejected when that bound exceeds `max_regression`:
it must show, at the configured confidence, that it is not worse than the champion by more than
the margin (a non-inferiority test; an identical model passes with a zero-width interval).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from moeops.cli import UserError
from moeops.data.prepare import EOS, decode_document
from moeops.evaluate.bootstrap import paired_bootstrap, relative_change  # noqa: F401 (the gate's API)
from moeops.model.io import load_tokenizer
from moeops.train.data import load_tokens

LogitsFn = Callable[[np.ndarray], Any]  # x_BS int64 -> logits_BSV (numpy or torch)


def val_documents(prepared_dir: Path, max_tokens: int) -> list[str]:
    """The val documents' texts, in order, until `max_tokens` tokens (EOS included) are taken."""
    tok = load_tokenizer(prepared_dir / "tokenizer.json")
    flat = load_tokens(prepared_dir, "val")
    try:
        offsets = np.load(prepared_dir / "val.idx.npy", allow_pickle=False)
    except (OSError, ValueError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{prepared_dir / 'val.idx.npy'}: cannot read ({why})") from None
    if offsets.ndim != 1 or offsets.dtype.kind not in "iu" or (len(offsets) and offsets[-1] > len(flat)):
        raise UserError(f"{prepared_dir / 'val.idx.npy'}: not the document offsets of val.bin; re-run prepare")
    texts, taken = [], 0
    for start, end in zip(offsets[:-1], offsets[1:]):
        texts.append(decode_document(tok, flat[start:end - 1]))  # end - 1: the document's EOS
        taken += int(end - start)
        if taken >= max_tokens:
            break
    if not texts:
        raise UserError(f"{prepared_dir / 'val.bin'}: no val documents to score")
    return texts


def document_bits(logits_fn: LogitsFn, tokenizer_path: Path, texts: list[str], seq_len: int,
                  batch_size: int) -> np.ndarray:
    """Bits each document costs the model: every token and the closing EOS, predicted from an EOS
    start. Documents longer than seq_len are cut into independent windows of seq_len tokens.
    Windows are batched longest first and right-padded (causal attention: padding after a
    position cannot change it; padded targets are ignored)."""
    tok = load_tokenizer(tokenizer_path)
    eos = tok.token_to_id(EOS)
    if eos is None:
        raise UserError(f"{tokenizer_path}: has no {EOS} token")
    tok.encode_special_tokens = True  # as in prepare: text that spells EOS is plain bytes
    windows = []  # (document, inputs, targets)
    for d, enc in enumerate(tok.encode_batch_fast(texts, add_special_tokens=False)):
        seq = np.array([eos, *enc.ids, eos], dtype=np.int64)
        x, y = seq[:-1], seq[1:]
        windows += [(d, x[k:k + seq_len], y[k:k + seq_len]) for k in range(0, len(x), seq_len)]
    windows.sort(key=lambda w: -len(w[1]))
    bits_D = np.zeros(len(texts))
    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        width = len(group[0][1])
        x_BS = np.zeros((len(group), width), np.int64)
        y_BS = np.full((len(group), width), -100, np.int64)
        for row, (_, inputs, targets) in enumerate(group):
            x_BS[row, :len(inputs)], y_BS[row, :len(targets)] = inputs, targets
        logits_BSV = torch.as_tensor(logits_fn(x_BS)).float()
        nats_BS = F.cross_entropy(logits_BSV.flatten(0, 1), torch.from_numpy(y_BS).flatten(), reduction="none")
        bits_B = nats_BS.view(len(group), width).sum(1).double().numpy() / math.log(2)
        np.add.at(bits_D, [d for d, _, _ in group], bits_B)
    return bits_D


def rule(name: str, value: float | None, threshold: float, detail: str) -> dict[str, Any]:
    """One gate rule: passes when value <= threshold; value None = not applicable (skipped)."""
    verdict = "skip" if value is None else "pass" if value <= threshold else "fail"
    return {"rule": name, "value": value, "threshold": threshold, "verdict": verdict, "detail": detail}


def decide(rules: list[dict[str, Any]]) -> tuple[str, list[str]]:
    failed = [f"{r['rule']}: {r['detail']}" for r in rules if r["verdict"] == "fail"]
    return ("reject" if failed else "promote"), failed


def markdown_report(gate: dict[str, Any]) -> str:
    """reports/gate.md: the decision, then one table row per rule."""
    mark = {"pass": "✅ pass", "fail": "❌ fail", "skip": "➖ skip"}
    champion = gate["champion"]
    against = f"champion **{champion['version']}**" if champion else "no champion yet (budgets only)"
    lines = [f"# Gate: **{gate['decision'].upper()}**", "",
             f"Candidate `{gate['candidate']['variant']}` ({gate['candidate']['path']}) vs {against}, "
             f"on {gate['candidate']['documents']} val documents ({gate['candidate']['bytes']:,} bytes).", "",
             "| rule | value | threshold | verdict | detail |", "| --- | --- | --- | --- | --- |"]
    for r in gate["rules"]:
        value = "—" if r["value"] is None else f"{r['value']:.6g}"
        detail = r["detail"].replace("|", "\\|")  # a pipe would end the table cell
        lines.append(f"| {r['rule']} | {value} | {r['threshold']:.6g} | {mark[r['verdict']]} | {detail} |")
    if gate["reasons"]:
        lines += ["", "## Why rejected", "", *[f"- {reason}" for reason in gate["reasons"]]]
    return "\n".join(lines) + "\n"
