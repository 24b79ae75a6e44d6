"""DVC stage `gate`: promote or reject the candidate → metrics/gate.json, reports/gate.md.

Rules (params `gate`): the candidate's val bits-per-byte, p95 decode-step latency (metrics/eval.json),
model file size and its own export parity (metrics/export.json parity.<candidate>, a budget per
variant) against absolute budgets; and, when the
registry (params `registry`) has a champion, a paired bootstrap on per-document bits-per-byte
against the champion scored on the same val documents. Both are scored with the evaluation evaluate
runs (moeops/evaluate/scoring.py, params `evaluate.max_tokens_per_doc` and `evaluate.stride`), so the
candidate's bits-per-byte is eval.json's figure for it. A reject is a result, not a failure: the
stage exits 0 and the flow / CI act on `decision`. The registry is state outside DVC, so the stage
always runs (dvc.yaml: always_changed).

Chain of custody: every file of the candidate is checked against the sha256 the quantize stage recorded
in its lineage.json (copied by export) before anything is scored, and the latency figure must have been
timed on that very model.onnx (eval.json records the sha256 it timed). gate.json carries those hashes
(`candidate.checksums`) for the registry to check what it registers. Any mismatch is one line, exit 2,
nothing written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from moeops.cli import UserError, run_main
from moeops.config import load_model_args, load_section
from moeops.evaluate.gate import decide, markdown_report, paired_bootstrap, rule
from moeops.evaluate.scoring import Document, document_bytes, score_documents, summarize, val_documents
from moeops.export.triton import read_io
from moeops.io import atomic_write_json, atomic_write_text, read_json_object
from moeops.lineage import lineage, recorded_checksums, verify_checksums
from moeops.registry.promotion import registry_location

PREPARED = Path("data/prepared")
EVAL = Path("metrics/eval.json")
EXPORT = Path("metrics/export.json")
GATE = Path("metrics/gate.json")
REPORT = Path("reports/gate.md")


def read_json(path: Path) -> dict[str, Any]:
    data = read_json_object(path)
    if data is None:
        raise UserError(f"{path}: missing; run the stages before the gate")
    return data


def lookup(metrics: dict[str, Any], path: Path, *keys: str) -> float:
    value: Any = metrics
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    if not isinstance(value, int | float):
        raise UserError(f"{path}: {'.'.join(keys)}: missing or not a number; re-run the stage that writes it")
    return float(value)


def variant_dir(root: Path, candidate: str) -> Path:
    """exports/onnx/int8 for candidate onnx_int8 (and <version>/onnx/int8 in the registry)."""
    return root / "onnx" / candidate.removeprefix("onnx_")


def custody(candidate: Path) -> dict[str, str]:
    """The candidate's {file: sha256} as its producing stage recorded them (lineage.json), after checking
    every file against them; every file the gate reads (model.onnx, its external data, tokenizer.json,
    config.json) must be among them."""
    verify_checksums(candidate)  # no lineage.json, or a file that differs: one line naming both hashes
    recorded = recorded_checksums(candidate)
    _, _, external = read_io(candidate / "model.onnx")  # an ONNX model; external data inside the directory
    for name in ("model.onnx", "tokenizer.json", "config.json", *external):
        if name not in recorded:
            raise UserError(f"{candidate / 'lineage.json'}: checksums: no sha256 recorded for {name}; "
                            "re-run the quantize and export stages")
    return recorded


def check_timed(ev: dict[str, Any], candidate: str, onnx_path: Path, sha256: str) -> None:
    """The latency figure was measured on the very file judged (a stale eval.json must not vouch for it)."""
    timed = (ev.get("variants") or {}).get(candidate, {}).get("model_sha256")
    if not isinstance(timed, str):
        raise UserError(f"{EVAL}: variants.{candidate}.model_sha256: missing; re-run evaluate")
    if timed != sha256:
        raise UserError(f"{EVAL}: variants.{candidate} was timed on a model.onnx with sha256 {timed}, but "
                        f"{onnx_path} has sha256 {sha256}: a stale figure, re-run evaluate")


def score(model_dir: Path, docs: list[Document], stride: int, batch_size: int, threads: int) -> dict[str, np.ndarray]:
    """score_documents of an ONNX model directory (the evaluation evaluate runs)."""
    from moeops.export.onnx import OnnxLM

    for name in ("model.onnx", "tokenizer.json", "config.json"):
        if not (model_dir / name).is_file():
            raise UserError(f"{model_dir / name}: missing")
    lm = OnnxLM(model_dir / "model.onnx", threads=threads)
    seq_len = load_model_args(model_dir / "config.json").max_seq_len
    return score_documents(lambda x_BS: lm.step(x_BS, np.ones_like(x_BS), None)[0], model_dir / "tokenizer.json",
                           docs, seq_len, stride, batch_size)


def champion_model(root: Path, name: str) -> tuple[str | None, str | None, Path | None]:
    """(version, variant, model dir) of the champion: the variant it was promoted as, which is the one
    in production (not necessarily today's gate.candidate); all None when there is no champion."""
    from moeops.registry import champion, show

    version = champion(root, name)
    if version is None:
        return None, None, None
    manifest = show(root, name, version)  # verifies every file's checksum
    variant = manifest.get("metrics", {}).get("candidate")
    if variant not in ("onnx_fp32", "onnx_int8", "onnx_int4"):
        raise UserError(f"{manifest['path']}/manifest.json: metrics.candidate: {variant!r} is not an ONNX variant")
    return version, variant, variant_dir(Path(manifest["path"]), variant)


def gate(p: Any, ev_p: Any, root: Path, name: str) -> dict[str, Any]:
    """The decision; `ev_p` is params `evaluate` (the cap and stride of the shared evaluation)."""
    candidate = variant_dir(Path("exports"), p.candidate)
    if not (candidate / "model.onnx").is_file():
        raise UserError(f"{candidate / 'model.onnx'}: missing candidate (gate.candidate: {p.candidate}); "
                        "run the export stage")
    checksums = custody(candidate)
    ev, ex = read_json(EVAL), read_json(EXPORT)  # bad metrics fail before the minute of scoring
    p95 = lookup(ev, EVAL, "variants", p.candidate, "speed", "batch1", "decode_step_p95_ms")
    check_timed(ev, p.candidate, candidate / "model.onnx", checksums["model.onnx"])
    parity = lookup(ex, EXPORT, "parity", p.candidate, "max_abs_diff")  # prefill and cached decode
    parity_budget = getattr(p.max_parity_error, p.candidate)
    size_mb = sum(f.stat().st_size for f in candidate.glob("model.onnx*")) / 1e6
    threads = p.threads or torch.get_num_threads()
    docs = val_documents(PREPARED, ev_p.max_tokens_per_doc)
    bytes_D = document_bytes(docs)
    cand = score(candidate, docs, ev_p.stride, p.batch_size, threads)
    cand_bits_D, cand_s = cand["bits"], summarize(cand, bytes_D)
    cand_bpb = cand_s["bits_per_byte"]
    rules = [
        rule("max_bits_per_byte", cand_bpb, p.max_bits_per_byte, f"val bits/byte {cand_bpb:.4f}"),
        rule("max_p95_latency_ms", p95, p.max_p95_latency_ms, f"one cached decode step at batch 1, p95 {p95:.3f} ms"),
        rule("max_file_mb", size_mb, p.max_file_mb, f"{candidate}/model.onnx: {size_mb:.2f} MB"),
        rule("max_parity_error", parity, parity_budget,
             f"{p.candidate}: max |ONNX Runtime − PyTorch fp32| logit {parity:.2e}"),
    ]
    version, champ_variant, champ = champion_model(root, name)
    champion = None
    if champ is None:
        rules.append(rule("max_regression", None, p.max_regression, f"no champion in {root} yet: budgets only"))
    else:
        champ_scores = score(champ, docs, ev_p.stride, p.batch_size, threads)
        champ_bits_D, champ_s = champ_scores["bits"], summarize(champ_scores, bytes_D)
        boot = paired_bootstrap(cand_bits_D, champ_bits_D, p.confidence, p.bootstrap_samples, p.seed)
        champ_bpb = champ_s["bits_per_byte"]
        champion = {"name": name, "version": version, "variant": champ_variant, "bits_per_byte": champ_bpb,
                    "bits_per_byte_macro": champ_s["bits_per_byte_macro"], "bootstrap": boot}
        rules.append(rule("max_regression", boot["upper_bound"], p.max_regression,
                          f"bits/byte {cand_bpb:.4f} vs champion {version} ({champ_variant}) {champ_bpb:.4f}: "
                          f"{boot['relative_change']:+.2%}, {p.confidence:.0%} upper bound {boot['upper_bound']:+.2%} "
                          f"({p.bootstrap_samples} paired resamples of {len(docs)} documents, {boot['method']})"))
    decision, reasons = decide(rules)
    inputs = [*(candidate / n for n in sorted(checksums)), EVAL, EXPORT,
              PREPARED / "val.bin", PREPARED / "val.idx.npy", PREPARED / "docs.parquet", PREPARED / "tokenizer.json"]
    return {
        "decision": decision,
        "reasons": reasons,
        "candidate": {"variant": p.candidate, "path": str(candidate), "bits_per_byte": cand_bpb,
                      "bits_per_byte_macro": cand_s["bits_per_byte_macro"], "documents": len(docs),
                      "bytes": int(bytes_D.sum()),
                      "checksums": checksums},  # as recorded by quantize (export's lineage.json), checked
        "champion": champion,
        "rules": rules,
        "lineage": lineage(inputs, {"gate": p.model_dump(), "evaluate": ev_p.model_dump(
            include={"max_tokens_per_doc", "stride"})}, "gate")
        | {"champion": version, "registry": {"root": str(root), "name": name}},
    }


def main() -> None:
    root, name, _ = registry_location(Path("."))
    result = gate(load_section("gate"), load_section("evaluate"), root, name)
    atomic_write_text(REPORT, markdown_report(result))
    atomic_write_json(GATE, result)
    print(f"gate: {result['decision'].upper()}" + "".join(f"\n  {r}" for r in result["reasons"]))


if __name__ == "__main__":
    run_main(main)
