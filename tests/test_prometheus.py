"""The real Prometheus of the tests (conftest `prometheus`, moeops/prometheus.py): it scrapes a running server
added at run time, and what is pushed to its Pushgateway comes back through PromQL with the pushed labels."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import httpx
from prometheus_client import CollectorRegistry, Gauge, delete_from_gateway, push_to_gateway


def until(fn, timeout_s: float = 20.0):
    """fn() until it returns something truthy (returned), or AssertionError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := fn():
            return value
        time.sleep(0.2)
    raise AssertionError(f"nothing within {timeout_s} s")


def total(prometheus, promql: str) -> float:
    result = prometheus.query(promql)
    return sum(float(r["value"][1]) for r in result)


def test_prometheus_scrapes_a_server_added_at_run_time(prometheus, server):
    target = urlsplit(server).netloc
    prometheus.add_target(target)
    try:
        prometheus.wait_for_target(target)
        ok = f'moeops_requests_total{{instance="{target}",job="moeops",model_version="v1",status="200"}}'
        before = total(prometheus, ok)
        r = httpx.post(server + "/v1/completions", json={"model": "moeops", "prompt": "def", "max_tokens": 2},
                       timeout=30)
        assert r.status_code == 200, r.text
        assert until(lambda: total(prometheus, ok) >= before + 1)
    finally:
        prometheus.remove_target(target)


def test_a_pushed_gauge_comes_back_through_promql(prometheus):
    gateway = urlsplit(prometheus.pushgateway_url).netloc
    registry = CollectorRegistry()
    gauge = Gauge("moeops_test_pushed", "a value pushed by the test", ("canary", "stable"), registry=registry)
    gauge.labels(canary="v2", stable="v1").set(0.25)
    push_to_gateway(gateway, job="moeops_test", registry=registry)
    try:
        (series,) = until(lambda: prometheus.query('moeops_test_pushed{canary="v2",stable="v1"}'))
        # honor_labels: the pushed job label, not the scrape job's ("pushgateway")
        assert series["metric"]["job"] == "moeops_test"
        assert float(series["value"][1]) == 0.25
    finally:
        delete_from_gateway(gateway, job="moeops_test")
