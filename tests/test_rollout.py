"""The canary (issue 12 §1-2, §4): AnalysisRun semantics as pure functions, then the rollout flow end to end
against a real server (challenger routing, injected faults), a real Prometheus scraping it, the quality probe's
pushgateway, a real registry and a real Prefect API."""

from __future__ import annotations

import math

import pytest

from moeops.rollout.analysis import QUERIES, AnalysisRun, QueryError, Thresholds, judge, window

T = Thresholds(max_error_rate=0.05, max_latency_ratio=1.5, min_requests=5, max_regression=0.01)
GOOD = {"requests": 40.0, "error_rate": 0.0, "ttft_p95_ratio": 1.1, "itl_p95_ratio": 0.9,
        "quality_regression_upper": 0.0}


def test_judge_each_metric_against_its_condition():
    assert judge(GOOD, T) == dict.fromkeys(QUERIES, "Successful")
    assert judge({**GOOD, "error_rate": 0.2}, T)["error_rate"] == "Failed"
    assert judge({**GOOD, "ttft_p95_ratio": 3.0}, T)["ttft_p95_ratio"] == "Failed"
    assert judge({**GOOD, "itl_p95_ratio": math.inf}, T)["itl_p95_ratio"] == "Failed"
    assert judge({**GOOD, "quality_regression_upper": 0.02}, T)["quality_regression_upper"] == "Failed"
    # no data or NaN is never a pass
    assert judge({**GOOD, "ttft_p95_ratio": None}, T)["ttft_p95_ratio"] == "Inconclusive"
    assert judge({**GOOD, "quality_regression_upper": math.nan}, T)["quality_regression_upper"] == "Inconclusive"
    # too few canary requests: the request count and every rate are inconclusive, the probe still judged
    few = judge({**GOOD, "requests": 4.0, "error_rate": 0.5}, T)
    assert few == {**dict.fromkeys(QUERIES, "Inconclusive"), "quality_regression_upper": "Successful"}
    assert judge({**GOOD, "requests": QueryError("down")}, T)["requests"] == "Error"


def test_analysis_run_argo_semantics():
    run = AnalysisRun(T, count=3)
    assert run.add(GOOD) == "Running" and run.add(GOOD) == "Running" and run.add(GOOD) == "Successful"

    run = AnalysisRun(T, count=5)  # failure_limit 0: the first failed measurement ends it, naming the metric
    assert run.add(GOOD) == "Running"
    assert run.add({**GOOD, "error_rate": 0.21}) == "Failed"
    assert run.message.startswith("error_rate = 0, 0.21 (condition <= 0.05; 1 failed")

    run = AnalysisRun(T, count=3, failure_limit=1)  # one failure tolerated, the second is not
    assert run.add({**GOOD, "ttft_p95_ratio": 2.0}) == "Running"
    assert run.add({**GOOD, "ttft_p95_ratio": 2.5}) == "Failed" and "ttft_p95_ratio" in run.message

    run = AnalysisRun(T, count=5)  # an empty window ends it inconclusive at once
    assert run.add({**GOOD, "requests": None}) == "Inconclusive" and run.message.startswith("requests = no data")

    # errors: tolerated up to consecutive_error_limit in a row, then Failed; a success resets the streak
    run = AnalysisRun(T, count=10, consecutive_error_limit=2)
    down = dict.fromkeys(QUERIES, QueryError("prometheus: connection refused"))
    assert [run.add(down), run.add(down), run.add(GOOD), run.add(down), run.add(down)] == ["Running"] * 5
    assert run.add(down) == "Failed" and "3 measurements in a row could not be taken" in run.message
    # ... and a run whose measurements all erred within the limit is inconclusive, not a pass
    run = AnalysisRun(T, count=2, consecutive_error_limit=4)
    assert run.add(down) == "Running" and run.add(down) == "Inconclusive"
    # a failure outranks an inconclusive metric in the same measurement
    assert AnalysisRun(T, count=2).add({**GOOD, "error_rate": 0.3, "quality_regression_upper": None}) == "Failed"


def test_window_and_queries():
    assert window(30) == "30s" and window(1.5) == "1500ms"
    q = QUERIES["error_rate"].format(canary="v4", stable="v3", window="30s")
    assert q == ('(sum(increase(moeops_requests_total{model_version="v4",status=~"5.."}[30s])) or vector(0))'
                 ' / sum(increase(moeops_requests_total{model_version="v4"}[30s]))')
    assert 'model_version="v3"' in QUERIES["ttft_p95_ratio"].format(canary="v4", stable="v3", window="1s")


@pytest.mark.parametrize("info, expected", [
    ({"version": "v1", "challenger": "v2", "challenger_weight": 0.1}, 0.1),
    ({"version": "v1", "challenger": {"version": "v2", "weight": 0.5}}, 0.5),
    ({"version": "v1", "challenger": None, "challenger_weight": 0.0}, 0.0),
    ({"version": "v1", "challenger": "v9", "challenger_weight": 0.1}, None),
])
def test_served_weight(info, expected):
    from flows.rollout import served_weight

    assert served_weight(info, "v2") == expected
