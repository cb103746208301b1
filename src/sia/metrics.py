"""Prometheus metrics, defined on an explicit registry per running app.

Names follow the Prometheus naming guide and the usual gRPC server names
(`grpc_server_handled_total` and friends), so existing gRPC dashboards fit.

The metrics updated on every call (the gRPC server's and the provider
call's) are `LoopMetric`s: plain numbers updated on the event loop's thread
and read by the same thread when /metrics is scraped: prometheus-client's own
types take a lock on every update, a cost every call would pay (bench/README.md
has the figures).
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from sia.access.base import MICROS
from sia.domain import TaskStatus

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator, Sequence

    from sia.tasks.base import TaskStats

# `*_created` series double the output and no dashboard of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus-client leaves it unannotated

#: Latency buckets in seconds, from a fast cached call to a slow 4K group.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600,
)  # fmt: skip


class Value:
    """One series of a counter or gauge."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add `amount`."""
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        """Subtract `amount` (gauges)."""
        self.value -= amount


class Buckets:
    """One series of a histogram: a count per bucket (not cumulative) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        """Count one observation in the first bucket whose bound is >= `amount`."""
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class LoopMetric(Collector):
    """A labelled counter, gauge or histogram updated from one thread, without locks.

    `labels(*values)` returns the series (a `Value`, or `Buckets` for a
    histogram); the registry reads them all on each scrape.
    """

    def __init__(
        self,
        kind: Literal["counter", "gauge", "histogram"],
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        registry: CollectorRegistry,
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        self.kind = kind
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._bounds = (*(float(b) for b in buckets), float("inf"))
        # The `le` labels as prometheus-client writes them ("0.005", "1.0", "+Inf").
        self._le = tuple(floatToGoString(b) for b in self._bounds)  # type: ignore[no-untyped-call]
        self._series: dict[tuple[str, ...], Any] = {}
        registry.register(self)

    def labels(self, *values: str) -> Any:
        """The series for these label values (created on first use)."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
        series = self._series.get(values)
        if series is None:
            series = Buckets(self._bounds) if self.kind == "histogram" else Value()
            self._series[values] = series
        return series

    def collect(self) -> Iterator[Metric]:
        """One metric family with every series (called by the registry on scrape)."""
        items = list(self._series.items())  # one atomic copy
        if self.kind == "histogram":
            histogram = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
            for values, series in items:
                cumulative, points = 0, []
                for le, count in zip(self._le, series.counts, strict=True):
                    cumulative += count
                    points.append((le, float(cumulative)))
                histogram.add_metric(values, points, series.sum)
            yield histogram
            return
        family_type = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        family = family_type(self.name, self.documentation, labels=self.labelnames)
        for values, series in items:
            family.add_metric(values, series.value)
        yield family


class Metrics:
    """Every metric the service exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._refreshers: list[Callable[[], Awaitable[None]]] = []
        self._usage_children: dict[tuple[str, str], tuple[Any, ...]] = {}
        r = self.registry
        rpc = ("grpc_type", "grpc_service", "grpc_method")
        self.rpc_started = LoopMetric(
            "counter", "grpc_server_started_total", "RPCs started on the server.", rpc, registry=r
        )
        self.rpc_handled = LoopMetric(
            "counter",
            "grpc_server_handled_total",
            "RPCs completed on the server, by status code.",
            (*rpc, "grpc_code"),
            registry=r,
        )
        self.rpc_seconds = LoopMetric(
            "histogram",
            "grpc_server_handling_seconds",
            "Time to handle an RPC, from receipt to the last byte sent.",
            rpc,
            registry=r,
        )
        self.rpc_in_flight = LoopMetric(
            "gauge",
            "grpc_server_in_flight_requests",
            "RPCs being handled right now.",
            ("grpc_service", "grpc_method"),
            registry=r,
        )
        self.http_requests = LoopMetric(
            "counter",
            "http_requests_total",
            "HTTP requests answered, by route template, method and status code.",
            ("handler", "method", "status"),
            registry=r,
        )
        self.http_seconds = LoopMetric(
            "histogram",
            "http_request_duration_seconds",
            "Time to answer an HTTP request (for an event stream: how long it stayed open).",
            ("handler", "method"),
            registry=r,
        )
        self.undecodable_requests = LoopMetric(
            "counter",
            "sia_undecodable_requests_total",
            "Unary RPCs whose request bytes did not parse as the method's message "
            "(answered INVALID_ARGUMENT; also in grpc_server_handled_total).",
            ("grpc_service", "grpc_method"),
            registry=r,
        )
        self.images_generated = LoopMetric(
            "counter",
            "sia_images_generated_total",
            "Images generated, by model and outcome (success or failure).",
            ("model", "outcome"),
            registry=r,
        )
        self.tasks = Gauge(
            "sia_tasks", "Stored async tasks, by status.", ("backend", "status"), registry=r
        )
        self.task_queue_depth = Gauge(
            "sia_task_queue_depth", "Tasks waiting for a worker.", ("backend",), registry=r
        )
        self.task_oldest_queued = Gauge(
            "sia_task_oldest_queued_seconds",
            "Age of the oldest task still waiting for a worker (0 when none waits).",
            ("backend",),
            registry=r,
        )
        self.tasks_running = Gauge(
            "sia_tasks_running", "Tasks being run right now.", ("backend",), registry=r
        )
        self.task_retries = Counter(
            "sia_task_retries_total",
            "Task attempts run again after an interruption (a crash or a drain).",
            ("backend",),
            registry=r,
        )
        self.task_outcomes = Counter(
            "sia_task_outcomes_total",
            "Tasks that finished, by outcome (succeeded, failed, cancelled).",
            ("backend", "outcome"),
            registry=r,
        )
        self.upstream_seconds = LoopMetric(
            "histogram",
            "sia_upstream_request_seconds",
            "Time the provider took to answer a generation.",
            ("provider", "model"),
            registry=r,
        )
        self.upstream_errors = Counter(
            "sia_upstream_errors_total",
            "Failed provider calls, by provider and error code.",
            ("provider", "code"),
            registry=r,
        )
        self.upstream_answers_lost = Counter(
            "sia_upstream_answers_lost_total",
            "Provider answers cut off after a 2xx: likely generated and billed, but not "
            "delivered; never retried.",
            ("provider",),
            registry=r,
        )
        key_model = ("key", "model")
        self.key_requests = Counter(
            "sia_key_requests_total",
            "Generations that reached the provider, by API key name and model.",
            key_model,
            registry=r,
        )
        self.key_images = Counter(
            "sia_key_images_total",
            "Images generated, by API key name and model.",
            key_model,
            registry=r,
        )
        self.key_output_tokens = Counter(
            "sia_key_output_tokens_total",
            "Output tokens billed, by API key name and model.",
            key_model,
            registry=r,
        )
        self.key_spend = Counter(
            "sia_key_spend_total",
            "Estimated spend in PRICE_CURRENCY, by API key name and model.",
            key_model,
            registry=r,
        )
        self.budget_used = Gauge(
            "sia_key_budget_used_ratio",
            "Share of a key's budget spent in the period (day or month, UTC).",
            ("key", "period"),
            registry=r,
        )
        self.quota_rejections = Counter(
            "sia_quota_rejections_total",
            'Calls refused by a limit, by API key name ("" for the account) and limit.',
            ("key", "limit"),
            registry=r,
        )
        self.auth_failures = Counter(
            "sia_auth_failures_total",
            "Calls refused UNAUTHENTICATED, by reason (missing or invalid key).",
            ("reason",),
            registry=r,
        )
        self.info = Gauge(
            "sia_build_info",
            "Always 1; labels say which version and provider run.",
            ("version", "provider"),
            registry=r,
        )

    def count_usage(self, key: str, model: str, images: int, tokens: int, micros: int) -> None:
        """Add one generation to the per-key usage counters."""
        children = self._usage_children.get((key, model))
        if children is None:  # one set per key and model: labels() costs more than inc()
            children = self._usage_children[key, model] = tuple(
                counter.labels(key, model)
                for counter in (
                    self.key_requests,
                    self.key_images,
                    self.key_output_tokens,
                    self.key_spend,
                )
            )
        requests, images_counter, tokens_counter, spend = children
        requests.inc()
        if images:
            images_counter.inc(images)
        if tokens:
            tokens_counter.inc(tokens)
        if micros:
            spend.inc(micros / MICROS)

    def set_task_stats(self, backend: str, stats: TaskStats) -> None:
        """Publish a task backend's counts by status and its queue's depth and age."""
        for status, count in stats.counts.items():
            self.tasks.labels(backend, status.value).set(count)
        self.task_queue_depth.labels(backend).set(stats.counts.get(TaskStatus.QUEUED, 0))
        self.tasks_running.labels(backend).set(stats.counts.get(TaskStatus.RUNNING, 0))
        self.task_oldest_queued.labels(backend).set(stats.oldest_queued_seconds)

    def before_scrape(self, refresh: Callable[[], Awaitable[None]]) -> None:
        """Await `refresh()` before each scrape (for gauges read from elsewhere)."""
        self._refreshers.append(refresh)

    async def scrape(self) -> bytes:
        """Refresh what must be, then the registry in Prometheus text format."""
        for refresh in self._refreshers:
            await refresh()
        return self.render()

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
