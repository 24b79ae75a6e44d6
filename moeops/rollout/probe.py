"""The canary's quality probe: val documents scored by both served versions, judged as the gate judges, pushed.

Held-out documents are scored through the server by the canary and the stable version, paired, bounded as the gate
bounds a regression, and the bound is pushed to the Prometheus pushgateway for the analysis to query.

  python -m moeops.rollout.probe --canary v4 --stable v3 --server URL --pushgateway URL [--stable-server URL]
                                 [--params params.yaml] [--documents FILE] [--model NAME] [--prepared DIR]

One server serving both versions (the rollout flow's case), or, in a cluster where each version runs on its own
pods, --server for the canary's and --stable-server for the stable version's.

Each of the first rollout.probe_documents val documents of data/prepared (or one per line of --documents, a JSON
list of strings when the file is .json), cut to its first rollout.probe_max_tokens tokens, is sent to
`/v1/completions` as `echo: true, logprobs: 0, max_tokens: 0` with model "<name>@<version>" (pinned: never routed
to the other version) for the canary and the stable version. A document's bits are the sum of -log2 p of its
echoed tokens (the first token has no logprob, for either version). The paired bootstrap of the gate
(moeops.evaluate.gate.paired_bootstrap, gate.confidence / bootstrap_samples / seed) gives the one-sided upper
bound of the canary's relative bits-per-byte change; it is pushed as
moeops_canary_quality_regression_upper{canary, stable} (and _mean, the point estimate) under job
"moeops_quality_probe", grouped by canary and stable, and the analysis judges it against gate.max_regression.

A 5xx or a dropped connection is retried (an injected or transient fault is the error-rate metric's business, not
the quality's); a 4xx, or a document failing every retry, ends the probe with one line and pushes nothing, so the
metric stays empty and the analysis inconclusive. The previous push for the same pair is deleted first: a stale
value never stands in for a probe that failed.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from moeops.cli import UserError, run_main

JOB = "moeops_quality_probe"
RETRIES = 5


def probe_texts(prepared_dir: Path, documents: int, max_tokens: int) -> list[str]:
    """The first `documents` val documents, each cut to its first `max_tokens` tokens."""
    from moeops.data.prepare import decode_document
    from moeops.model.io import load_tokenizer
    from moeops.train.data import load_tokens

    tok = load_tokenizer(prepared_dir / "tokenizer.json")
    flat = load_tokens(prepared_dir, "val")
    try:
        offsets = np.load(prepared_dir / "val.idx.npy", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{prepared_dir / 'val.idx.npy'}: cannot read ({type(e).__name__}); re-run prepare") from None
    texts = []
    for start, end in zip(offsets[:-1], offsets[1:]):
        text = decode_document(tok, flat[start:min(end - 1, start + max_tokens)])  # end - 1: the document's EOS
        if text.strip():
            texts.append(text)
        if len(texts) == documents:
            break
    if len(texts) < 2:
        raise UserError(f"{prepared_dir / 'val.bin'}: fewer than 2 val documents to probe with")
    return texts


def read_documents(path: Path) -> list[str]:
    """--documents: a JSON list of strings (.json) or one document per line."""
    try:
        raw = path.read_text()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if path.suffix == ".json":
        try:
            texts = json.loads(raw)
        except ValueError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise UserError(f"{path}: expected a JSON list of strings")
    else:
        texts = raw.splitlines()
    texts = [t for t in texts if t.strip()]
    if len(texts) < 2:
        raise UserError(f"{path}: fewer than 2 documents to probe with")
    return texts


def _post(url: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """POST JSON; retries a 5xx or a connection failure RETRIES times; a 4xx is a UserError."""
    data = json.dumps(body).encode()
    last = ""
    for attempt in range(RETRIES + 1):
        if attempt:
            time.sleep(0.05 * attempt)
        req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:200]
            if e.code < 500:
                raise UserError(f"{url}: HTTP {e.code} for model {body.get('model')}: {detail}") from None
            last = f"HTTP {e.code}"
        except (OSError, ValueError) as e:
            last = str(getattr(e, "reason", None) or e)
    raise UserError(f"{url}: {last} for model {body.get('model')} ({RETRIES + 1} attempts)")


def document_bits(server_url: str, model: str, texts: list[str], timeout_s: float = 60.0) -> np.ndarray:
    """Bits each document costs `model` (one version, pinned) as the server scores it."""
    url = server_url.rstrip("/") + "/v1/completions"
    bits_D = np.zeros(len(texts))
    for d, text in enumerate(texts):
        out = _post(url, {"model": model, "prompt": text, "echo": True, "logprobs": 0, "max_tokens": 0}, timeout_s)
        try:
            lps = out["choices"][0]["logprobs"]["token_logprobs"]
        except (KeyError, IndexError, TypeError):
            raise UserError(f"{url}: model {model}: no logprobs in the answer") from None
        bits_D[d] = -sum(lp for lp in lps if lp is not None) / math.log(2)
    return bits_D


def probe(server_url: str, model_name: str, canary: str, stable: str, texts: list[str], confidence: float,
          samples: int, seed: int, stable_server_url: str | None = None) -> dict[str, Any]:
    """Score `texts` through both versions and bound the canary's relative bits-per-byte change."""
    from moeops.evaluate.bootstrap import paired_bootstrap

    canary_bits_D = document_bits(server_url, f"{model_name}@{canary}", texts)
    stable_bits_D = document_bits(stable_server_url or server_url, f"{model_name}@{stable}", texts)
    n_bytes = sum(len(t.encode()) for t in texts)
    boot = paired_bootstrap(canary_bits_D, stable_bits_D, confidence, samples, seed)
    return {"canary": canary, "stable": stable, "documents": len(texts), "bytes": n_bytes,
            "canary_bits_per_byte": float(canary_bits_D.sum() / n_bytes),
            "stable_bits_per_byte": float(stable_bits_D.sum() / n_bytes), "confidence": confidence, **boot}


def _grouping(canary: str, stable: str) -> dict[str, str]:
    return {"canary": canary, "stable": stable}


def clear(pushgateway_url: str, canary: str, stable: str) -> None:
    """Delete the previous push for this pair (a no-op when there is none)."""
    from prometheus_client import delete_from_gateway

    try:
        delete_from_gateway(pushgateway_url, job=JOB, grouping_key=_grouping(canary, stable), timeout=5)
    except OSError as e:
        raise UserError(f"{pushgateway_url}: pushgateway unreachable ({getattr(e, 'reason', None) or e})") from None


def push(pushgateway_url: str, result: dict[str, Any]) -> None:
    from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

    reg = CollectorRegistry()
    labels = ("canary", "stable")
    upper = Gauge("moeops_canary_quality_regression_upper", "Quality probe: one-sided upper bound of the canary's "
                  "relative bits-per-byte change over stable (paired bootstrap, as the gate)", labels, registry=reg)
    mean = Gauge("moeops_canary_quality_regression_mean", "Quality probe: the canary's relative bits-per-byte "
                 "change over stable", labels, registry=reg)
    upper.labels(result["canary"], result["stable"]).set(result["upper_bound"])
    mean.labels(result["canary"], result["stable"]).set(result["relative_change"])
    try:
        push_to_gateway(pushgateway_url, job=JOB, registry=reg,
                        grouping_key=_grouping(result["canary"], result["stable"]), timeout=5)
    except OSError as e:
        raise UserError(f"{pushgateway_url}: pushgateway unreachable ({getattr(e, 'reason', None) or e})") from None


def run(server_url: str, pushgateway_url: str, model_name: str, canary: str, stable: str, texts: list[str],
        confidence: float, samples: int, seed: int, stable_server_url: str | None = None) -> dict[str, Any]:
    """clear, probe, push: what the rollout runs once per analysis."""
    clear(pushgateway_url, canary, stable)
    result = probe(server_url, model_name, canary, stable, texts, confidence, samples, seed, stable_server_url)
    push(pushgateway_url, result)
    return result


def main(argv: list[str] | None = None) -> None:
    from moeops.config import GateParams, RolloutParams, load_section

    p = argparse.ArgumentParser(prog="python -m moeops.rollout.probe", description=__doc__.splitlines()[0])
    p.add_argument("--canary", required=True, help="the challenger's version, vN")
    p.add_argument("--stable", required=True, help="the champion's version, vN")
    p.add_argument("--server", required=True, help="the base URL of a server serving the canary (and the stable "
                                                    "version, unless --stable-server)")
    p.add_argument("--stable-server", default=None, help="the base URL serving the stable version (default: --server)")
    p.add_argument("--pushgateway", required=True, help="the Prometheus pushgateway's URL")
    p.add_argument("--params", default=None, help="for rollout.probe_*, gate.confidence/bootstrap_samples/seed and "
                                                  "registry.name (default: ./params.yaml if present, else defaults)")
    p.add_argument("--model", default=None, help="the registry name (default: registry.name)")
    p.add_argument("--documents", type=Path, default=None, help="documents to score instead of the val documents")
    p.add_argument("--prepared", type=Path, default=Path("data/prepared"), help="default: data/prepared")
    a = p.parse_args(argv)
    from moeops.registry.store import check_version

    check_version(a.canary)
    check_version(a.stable)
    if a.params is None and not Path("params.yaml").is_file():  # a serving image may carry no params.yaml
        ro, gate, model = RolloutParams(), GateParams(), a.model or "moeops"
    else:
        params = Path(a.params or "params.yaml")
        ro, gate = load_section("rollout", params), load_section("gate", params)
        model = a.model or load_section("registry", params).name
    texts = read_documents(a.documents) if a.documents else probe_texts(a.prepared, ro.probe_documents,
                                                                        ro.probe_max_tokens)
    r = run(a.server, a.pushgateway, model, a.canary, a.stable, texts, gate.confidence, gate.bootstrap_samples,
            gate.seed, a.stable_server)
    verdict = "pass" if r["upper_bound"] <= gate.max_regression else "FAIL"
    print(f"quality probe {a.canary} vs {a.stable}: bits/byte {r['canary_bits_per_byte']:.4f} vs "
          f"{r['stable_bits_per_byte']:.4f} over {r['documents']} documents, {r['relative_change']:+.2%}, "
          f"{gate.confidence:.0%} upper bound {r['upper_bound']:+.2%} ({verdict}: gate.max_regression "
          f"{gate.max_regression:+.2%}); pushed to {a.pushgateway}")


if __name__ == "__main__":
    run_main(main)
