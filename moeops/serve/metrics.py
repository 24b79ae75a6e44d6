"""The server's Prometheus metrics (prometheus-client), labelled by model version so that a canary's
versions can be compared in PromQL. Base units, `moeops_` prefix, `_total` on counters; label values
are bounded (model version, HTTP status code, variant), never a prompt or a request id.

The engine observes what happens per sequence and per batch step; the app counts requests by status.
When an engine is unloaded (hot reload) `forget(version)` drops its series from the gauges.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

VERSION = ("model_version",)
# latency buckets from 1 ms to 60 s; step-level figures on this CPU are ~1-50 ms
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5.0, 10.0, 20.0, 60.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)

REQUESTS = Counter("moeops_requests", "HTTP requests answered, by status code and tenant",
                   ("model_version", "status", "tenant"))  # tenant: "" without tenants (or without a valid key)
PROMPT_TOKENS = Counter("moeops_prompt_tokens", "Prompt tokens prefilled", VERSION)
GENERATION_TOKENS = Counter("moeops_generation_tokens", "Tokens generated", VERSION)
TIME_TO_FIRST_TOKEN = Histogram("moeops_time_to_first_token_seconds", "Arrival to first generated token",
                                VERSION, buckets=_LATENCY)
INTER_TOKEN_LATENCY = Histogram("moeops_inter_token_latency_seconds", "Time between two generated tokens",
                                VERSION, buckets=_LATENCY)
REQUEST_DURATION = Histogram("moeops_request_duration_seconds", "Arrival to the last token (end to end)",
                             VERSION, buckets=_LATENCY)
QUEUE_TIME = Histogram("moeops_request_queue_seconds", "Arrival to the start of prefill", VERSION, buckets=_LATENCY)
BATCH_SIZE = Histogram("moeops_batch_size", "Sequences in one decode step", VERSION, buckets=_BATCH)
RUNNING = Gauge("moeops_requests_running", "Sequences in the running batch", VERSION)
WAITING = Gauge("moeops_requests_waiting", "Requests queued, not yet prefilled", VERSION)
KV_CACHE_BYTES = Gauge("moeops_kv_cache_bytes", "Bytes held by the running batch's KV cache", VERSION)
LOAD_SECONDS = Gauge("moeops_model_load_seconds", "Verified files to ONNX Runtime session", VERSION)
WARMUP_SECONDS = Gauge("moeops_model_warmup_seconds", "Warm-up runs before ready", VERSION)
MODEL_INFO = Gauge("moeops_model_info", "1 for each loaded model version", ("model_version", "variant", "sha256"))

# Tenants (serve.tenants): the label is a name from tenants.yaml (a fixed set), "" without tenants
TENANT = ("tenant",)
TENANT_PROMPT_TOKENS = Counter("moeops_tenant_prompt_tokens", "Prompt tokens prefilled, by tenant", TENANT)
TENANT_GENERATION_TOKENS = Counter("moeops_tenant_generation_tokens", "Tokens generated, by tenant", TENANT)
TENANT_TIME_TO_FIRST_TOKEN = Histogram("moeops_tenant_time_to_first_token_seconds", "Arrival to first token, by tenant",
                                       TENANT, buckets=_LATENCY)
TENANT_WAITING = Gauge("moeops_tenant_requests_waiting", "Requests queued, by tenant", ("model_version", "tenant"))
TENANT_RUNNING = Gauge("moeops_tenant_requests_running", "Sequences in the running batch, by tenant",
                       ("model_version", "tenant"))
RATE_LIMITED = Counter("moeops_rate_limited", "Requests refused with 429 by a tenant limit",
                       ("tenant", "limit"))  # limit: requests_per_minute | tokens_per_minute | max_concurrent

_PER_VERSION_GAUGES = (RUNNING, WAITING, KV_CACHE_BYTES, LOAD_SECONDS, WARMUP_SECONDS)


def forget(version: str) -> None:
    """Drop an unloaded version's gauge series (counters and histograms stay: rates need their history)."""
    for gauge in _PER_VERSION_GAUGES:
        try:
            gauge.remove(version)
        except KeyError:
            pass
    for labels in [s.labels for m in MODEL_INFO.collect() for s in m.samples if s.labels["model_version"] == version]:
        try:
            MODEL_INFO.remove(labels["model_version"], labels["variant"], labels["sha256"])
        except KeyError:
            pass
