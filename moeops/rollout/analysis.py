"""One canary analysis with the semantics of an Argo Rollouts AnalysisRun, against a real Prometheus. Torch-free.

Every `interval_s` one measurement of each metric in QUERIES is taken over the last `interval_s` (the window) and
judged on its own:

  requests                  canary requests answered           >= min_requests, else Inconclusive
  error_rate                canary 5xx / canary requests       <= max_error_rate
  ttft_p95_ratio            canary p95 TTFT / stable's         <= max_latency_ratio
  itl_p95_ratio             canary p95 inter-token / stable's  <= max_latency_ratio
  quality_regression_upper  the quality probe's upper bound    <= gate.max_regression (pushed by probe.py)

A measurement is Successful, Failed, Inconclusive (an empty result or NaN: no data is never a pass; the rates
too while the canary has fewer than min_requests requests in the window) or Error (the query could not be made).
Per metric, as Argo counts them: Failed once failed > failure_limit, or errors in a row > consecutive_error_limit;
Inconclusive once one measurement is (Argo's inconclusiveLimit 0), or when `count` measurements ended without a
single successful one. The analysis ends at once when a metric Fails (then Failed wins over Inconclusive) or turns
Inconclusive; it is Successful when all `count` measurements are in and every metric is.

`judge` and `AnalysisRun.add` are pure (unit-tested without a Prometheus); `measure` is the only I/O.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# str.format templates: {canary}, {stable} versions ("v3"), {window} a PromQL duration ("30s"). The k8s
# AnalysisTemplate (deploy/k8s) carries the same text with Argo args.
QUERIES = {
    "requests": 'sum(increase(moeops_requests_total{{model_version="{canary}"}}[{window}]))',
    "error_rate": '(sum(increase(moeops_requests_total{{model_version="{canary}",status=~"5.."}}[{window}]))'
                  ' or vector(0))'
                  ' / sum(increase(moeops_requests_total{{model_version="{canary}"}}[{window}]))',
    "ttft_p95_ratio": 'histogram_quantile(0.95, sum by (le) (rate(moeops_time_to_first_token_seconds_bucket'
                      '{{model_version="{canary}"}}[{window}])))'
                      ' / histogram_quantile(0.95, sum by (le) (rate(moeops_time_to_first_token_seconds_bucket'
                      '{{model_version="{stable}"}}[{window}])))',
    "itl_p95_ratio": 'histogram_quantile(0.95, sum by (le) (rate(moeops_inter_token_latency_seconds_bucket'
                     '{{model_version="{canary}"}}[{window}])))'
                     ' / histogram_quantile(0.95, sum by (le) (rate(moeops_inter_token_latency_seconds_bucket'
                     '{{model_version="{stable}"}}[{window}])))',
    "quality_regression_upper": 'max(moeops_canary_quality_regression_upper{{canary="{canary}",stable="{stable}"}})',
}
PHASES = ("Successful", "Failed", "Inconclusive", "Error")


@dataclass(frozen=True)
class Thresholds:
    max_error_rate: float
    max_latency_ratio: float
    min_requests: int
    max_regression: float  # gate.max_regression: the quality probe is judged as the gate judges

    def condition(self, metric: str) -> str:
        """The success condition, as the audit line and the artifacts print it."""
        return {"requests": f">= {self.min_requests}", "error_rate": f"<= {self.max_error_rate:g}",
                "ttft_p95_ratio": f"<= {self.max_latency_ratio:g}", "itl_p95_ratio": f"<= {self.max_latency_ratio:g}",
                "quality_regression_upper": f"<= {self.max_regression:g}"}[metric]


class QueryError(Exception):
    """A measurement could not be taken (Prometheus unreachable, a bad answer): an Error measurement."""


def window(interval_s: float) -> str:
    """A PromQL duration for interval_s seconds: "30s", "1500ms"."""
    ms = max(1, round(interval_s * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def query(prometheus_url: str, promql: str, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """The result list of an instant query (/api/v1/query). QueryError when it cannot be had."""
    url = prometheus_url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:200]
        raise QueryError(f"{prometheus_url}: HTTP {e.code} ({detail})") from None
    except (OSError, ValueError) as e:
        raise QueryError(f"{prometheus_url}: {getattr(e, 'reason', None) or e}") from None
    if body.get("status") != "success" or not isinstance(body.get("data", {}).get("result"), list):
        raise QueryError(f"{prometheus_url}: {body.get('errorType', 'bad answer')}: {body.get('error', '')}"[:300])
    return body["data"]["result"]


def scalar(result: list[dict[str, Any]]) -> float | None:
    """The one value of an instant vector; None when the vector is empty (no data)."""
    if not result:
        return None
    return float(result[0]["value"][1])  # "NaN", "+Inf" parse as floats


def measure(prometheus_url: str, canary: str, stable: str, interval_s: float) -> dict[str, float | None | QueryError]:
    """Every metric over the last interval_s: a value, None (no data) or the QueryError that prevented it."""
    out: dict[str, float | None | QueryError] = {}
    for metric, template in QUERIES.items():
        try:
            out[metric] = scalar(query(prometheus_url, template.format(canary=canary, stable=stable,
                                                                        window=window(interval_s))))
        except QueryError as e:
            out[metric] = e
    return out


def judge(values: dict[str, float | None | Exception], t: Thresholds) -> dict[str, str]:
    """{metric: phase} for one measurement. Pure."""
    phases = {}
    requests = values.get("requests")
    enough = isinstance(requests, float) and math.isfinite(requests) and requests >= t.min_requests
    for metric in QUERIES:
        v = values.get(metric)
        if isinstance(v, Exception):
            phases[metric] = "Error"
        elif v is None or math.isnan(v):
            phases[metric] = "Inconclusive"
        elif metric == "requests":
            phases[metric] = "Successful" if enough else "Inconclusive"
        elif metric != "quality_regression_upper" and not enough:
            phases[metric] = "Inconclusive"  # a rate of too few requests says nothing
        else:
            limit = {"error_rate": t.max_error_rate, "ttft_p95_ratio": t.max_latency_ratio,
                     "itl_p95_ratio": t.max_latency_ratio, "quality_regression_upper": t.max_regression}[metric]
            phases[metric] = "Successful" if v <= limit else "Failed"
    return phases


@dataclass
class MetricRun:
    """Argo's per-metric tally."""

    successful: int = 0
    failed: int = 0
    inconclusive: int = 0
    error: int = 0
    consecutive_error: int = 0
    values: list[float | None] = field(default_factory=list)


@dataclass
class AnalysisRun:
    """The measurements of one analysis, their tally and its phase (Running until it ends)."""

    thresholds: Thresholds
    count: int
    failure_limit: int = 0
    consecutive_error_limit: int = 4
    metrics: dict[str, MetricRun] = field(default_factory=lambda: {m: MetricRun() for m in QUERIES})
    measurements: list[dict[str, Any]] = field(default_factory=list)
    phase: str = "Running"
    message: str = ""

    def add(self, values: dict[str, float | None | Exception]) -> str:
        """Judge one measurement, tally it and return the analysis phase after it. Pure (no I/O)."""
        phases = judge(values, self.thresholds)
        self.measurements.append({"values": values, "phases": phases})
        for metric, phase in phases.items():
            run, v = self.metrics[metric], values.get(metric)
            run.values.append(v if isinstance(v, float) else None)
            run.consecutive_error = run.consecutive_error + 1 if phase == "Error" else 0
            setattr(run, phase.lower(), getattr(run, phase.lower()) + 1)
        failed = [m for m, r in self.metrics.items()
                  if r.failed > self.failure_limit or r.consecutive_error > self.consecutive_error_limit]
        if failed:
            self.phase, self.message = "Failed", "; ".join(self.describe(m) for m in failed)
            return self.phase
        inconclusive = [m for m, r in self.metrics.items() if r.inconclusive]
        if not inconclusive and len(self.measurements) >= self.count:
            inconclusive = [m for m, r in self.metrics.items() if not r.successful]
        if inconclusive:
            self.phase, self.message = "Inconclusive", "; ".join(self.describe(m) for m in inconclusive)
        elif len(self.measurements) >= self.count:
            self.phase, self.message = "Successful", f"{self.count} measurements, every metric passed"
        return self.phase

    def describe(self, metric: str) -> str:
        """'error_rate = 0.21, 0.18 (condition <= 0.05; 2 failed of 2, failure_limit 0)': the metric, its values
        and thresholds, for the audit log and the artifacts."""
        r = self.metrics[metric]
        vals = ", ".join("no data" if v is None else f"{v:.4g}" for v in r.values)
        if r.consecutive_error > self.consecutive_error_limit:
            last = self.measurements[-1]["values"][metric]
            return (f"{metric}: {r.consecutive_error} measurements in a row could not be taken "
                    f"(consecutive_error_limit {self.consecutive_error_limit}; last: {last})")
        tally = (f"{r.failed} failed, {r.inconclusive} inconclusive, {r.error} errors of {len(r.values)}; "
                 f"failure_limit {self.failure_limit}")
        return f"{metric} = {vals} (condition {self.thresholds.condition(metric)}; {tally})"

    def rows(self) -> list[dict[str, Any]]:
        """One row per measurement and metric (the Prefect table artifact)."""
        out = []
        for i, m in enumerate(self.measurements, 1):
            for metric, phase in m["phases"].items():
                v = m["values"].get(metric)
                shown = str(v) if isinstance(v, Exception) else "no data" if v is None else f"{v:.6g}"
                out.append({"measurement": i, "metric": metric, "value": shown,
                            "condition": self.thresholds.condition(metric), "phase": phase})
        return out


def run_analysis(run: AnalysisRun, prometheus_url: str, canary: str, stable: str, interval_s: float,
                 on_measurement: Callable[[AnalysisRun], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> AnalysisRun:
    """Measure every interval_s (after waiting the first one, so the window holds only what followed) until
    the run ends."""
    while run.phase == "Running":
        sleep(interval_s)
        run.add(measure(prometheus_url, canary, stable, interval_s))
        if on_measurement is not None:
            on_measurement(run)
    return run
