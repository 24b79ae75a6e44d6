"""`python -m moeops.summary`: what `make pipeline` prints at the end."""

from __future__ import annotations

import sys

from moeops.cli import run_main
from moeops.io import read_json_object


def read(path: str) -> dict:
    """A metrics file as a dict; {} when absent; a one-line error when it is not a JSON object."""
    return read_json_object(path) or {}


def variants_table(variants: dict[str, dict]) -> str:
    """Markdown table of every evaluated variant (also pasted into BENCHMARKS.md)."""
    rows = ["| variant | runtime | params | file MB | val bits/byte (macro) | top-1 | prefill ms b1 / b8 | "
            "decode tok/s b1 / b8 | peak RSS MB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    order = ["teacher", "student", "baseline", "onnx_fp32", "onnx_int8", "onnx_int4"]
    for name, v in sorted(variants.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
        s1, s8 = v["speed"]["batch1"], v["speed"]["batch8"]
        rows.append(f"| {name} | {v['runtime']} | {v['params_total'] / 1e6:.2f} M | {v['file_bytes'] / 1e6:.2f} | "
                    f"{v['bits_per_byte']:.4f} ({v['bits_per_byte_macro']:.4f}) | {v['top1_accuracy']:.3f} | "
                    f"{s1['prefill_ms']:.1f} / {s8['prefill_ms']:.1f} | "
                    f"{s1['decode_tokens_per_s']:,.0f} / {s8['decode_tokens_per_s']:,.0f} | "
                    f"{v['peak_rss_mb']:,.0f} |")
    return "\n".join(rows)


def summary() -> str:
    ev, pre, data = read("metrics/eval.json"), read("metrics/pretrain.json"), read("metrics/data.json")
    if not ev:
        return "no metrics/eval.json yet: run `make pipeline` (dvc repro)"
    v, comp = ev["val"], ev["compressors"]
    rows = [("teacher (MoE)", v["bits_per_byte"], v["bits_per_byte_macro"])]
    rows += [(label, comp[key]["bits_per_byte"], comp[key]["bits_per_byte_macro"])
             for label, key in (("PPMd o16", "ppmd_o16"), ("xz -9e", "xz_9e"), ("gzip -9", "gzip_9"))]
    lines = [f"val bits-per-byte on the same {v['bytes']:,} bytes ({v['documents']:,} documents, each capped at "
             f"{v['max_tokens_per_doc']:,} tokens; {v['tokens']:,} tokens), micro / macro over documents:"]
    lines += [f"  {name:<14} {micro:.4f} / {macro:.4f}" for name, micro, macro in sorted(rows, key=lambda r: r[1])]
    best = min(comp, key=lambda k: comp[k]["bits_per_byte"])
    beat = "beats" if v["bits_per_byte"] < comp[best]["bits_per_byte"] else "does NOT beat"
    lines.append(f"  the teacher {beat} the best compressor ({best})")
    for name, t in ev.get("targets", {}).items():
        lines.append(f"  target {name}: {t['value']:.4f} (<= {t['target']}: {'met' if t['met'] else 'NOT met'})")
    lines.append(f"val loss {v['loss']:.4f}, perplexity {v['perplexity']:.2f}, top-1 {v['top1_accuracy']:.3f}")
    if ev.get("variants"):
        lines += ["", variants_table(ev["variants"]), ""]
    if pre:
        lines.append(f"training: {pre['tokens']:,} tokens, {pre['tokens_per_s']:,.0f} tokens/s, "
                     f"{pre['train_seconds']:.0f} s; {pre['params_total']:,} params ({pre['params_active']:,} active)")
    if data:
        splits = ", ".join(f"{s} {data[s]['n_docs']:,} docs / {data[s]['n_tokens']:,} tokens" for s in ("train", "val"))
        skipped = ", ".join(f"{k} {v}" for k, v in data["skipped"].items() if v) or "none"
        lines.append(f"data: {splits}; skipped: {skipped}; tokenizer {data['tokenizer_seconds']:.1f} s, "
                     f"encode {data['encode_seconds']:.1f} s")
    gate = read("metrics/gate.json")
    if gate:
        champion = gate["champion"]["version"] if gate.get("champion") else "no champion yet"
        lines.append(f"gate: {gate['decision'].upper()} {gate['candidate']['variant']} "
                     f"({gate['candidate']['bits_per_byte']:.4f} bits/byte; vs {champion}); reports/gate.md")
        lines += [f"  {reason}" for reason in gate.get("reasons", [])]
        if gate["decision"] == "promote":
            lines.append("  register it: `make flow` or `moeops promote --from-gate metrics/gate.json`")
    lines.append("reports: reports/data/docs/index.html (GX Data Docs), reports/data/summary.json, "
                 "dvclive/{pretrain,distill} (training curves), plots/expert_load.png, plots/eval_documents.csv "
                 "(bits/byte per document), metrics/*.json; "
                 "`dvc plots show`")
    lines.append("models: models/{teacher,student,baseline}, exports/onnx/{fp32,int8,int4} (ONNX Runtime, KV cache), "
                 "exports/hf (transformers), exports/triton; try `python -m moeops.generate --prompt 'def '`")
    return "\n".join(lines)


if __name__ == "__main__":
    run_main(lambda: print(summary()))
    sys.exit(0)
