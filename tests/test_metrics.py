"""LoopMetric: the lock-free per-call metrics expose exactly what prometheus-client would."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sia.metrics import LoopMetric, Metrics


def test_exposition_matches_prometheus_client() -> None:
    """Counters, gauges and histograms (bucket bounds inclusive) read byte for byte the same."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counter = LoopMetric("counter", "calls_total", "Calls.", ("method",), registry=ours)
    gauge = LoopMetric("gauge", "in_flight", "Calls now.", ("method",), registry=ours)
    histogram = LoopMetric(
        "histogram", "call_seconds", "Call time.", ("method",), registry=ours, buckets=(0.1, 1)
    )
    ref_counter = Counter("calls_total", "Calls.", ("method",), registry=theirs)
    ref_gauge = Gauge("in_flight", "Calls now.", ("method",), registry=theirs)
    ref_histogram = Histogram(
        "call_seconds", "Call time.", ("method",), registry=theirs, buckets=(0.1, 1)
    )
    for method in ("a", "b"):
        for metric in (counter, ref_counter):
            metric.labels(method).inc()
            metric.labels(method).inc(2.5)
        for metric in (gauge, ref_gauge):
            metric.labels(method).inc(3)
            metric.labels(method).dec()
        for metric in (histogram, ref_histogram):
            for seconds in (0.05, 0.1, 0.5, 1.0, 7.0):
                metric.labels(method).observe(seconds)
    assert generate_latest(ours).decode() == generate_latest(theirs).decode()
    assert ours.get_sample_value("call_seconds_bucket", {"method": "a", "le": "0.1"}) == 2


def test_series_are_created_once_and_labels_are_checked() -> None:
    """labels() returns the same series for the same values and refuses a wrong count."""
    metric = LoopMetric("counter", "x_total", "X.", ("a", "b"), registry=CollectorRegistry())
    assert metric.labels("1", "2") is metric.labels("1", "2")
    with pytest.raises(ValueError, match="expected labels"):
        metric.labels("1")


def test_service_metrics_render_with_no_calls_yet() -> None:
    """A fresh app's /metrics lists the per-call families before any call."""
    text = Metrics().render().decode()
    for name in (
        "grpc_server_started_total",
        "grpc_server_handled_total",
        "grpc_server_handling_seconds",
        "grpc_server_in_flight_requests",
        "sia_undecodable_requests_total",
        "sia_upstream_request_seconds",
        "sia_images_generated_total",
    ):
        assert f"# HELP {name} " in text, name
