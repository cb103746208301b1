"""Prometheus metrics, defined on an explicit registry per running app.

Names follow the Prometheus naming guide and the usual gRPC server names
(`grpc_server_handled_total` and friends), so existing gRPC dashboards fit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from sia.domain import TaskStatus

if TYPE_CHECKING:
    from prometheus_client.metrics import MetricWrapperBase

    from sia.tasks.base import TaskStats

# `*_created` series double the output and no dashboard of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus-client leaves it unannotated

#: Latency buckets in seconds, from a fast cached call to a slow 4K group.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600,
)  # fmt: skip


class Metrics:
    """Every metric the service exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        rpc = ("grpc_type", "grpc_service", "grpc_method")
        self.rpc_started = Counter(
            "grpc_server_started_total", "RPCs started on the server.", rpc, registry=r
        )
        self.rpc_handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by status code.",
            (*rpc, "grpc_code"),
            registry=r,
        )
        self.rpc_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time to handle an RPC, from receipt to the last byte sent.",
            rpc,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rpc_in_flight = Gauge(
            "grpc_server_in_flight_requests",
            "RPCs being handled right now.",
            ("grpc_service", "grpc_method"),
            registry=r,
        )
        self.images_generated = Counter(
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
            "Task attempts that failed transiently and were queued again.",
            ("backend",),
            registry=r,
        )
        self.task_outcomes = Counter(
            "sia_task_outcomes_total",
            "Tasks that finished, by outcome (succeeded, failed, cancelled).",
            ("backend", "outcome"),
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "sia_upstream_request_seconds",
            "Time the provider took to answer a generation.",
            ("provider", "model"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "sia_upstream_errors_total",
            "Failed provider calls, by provider and error code.",
            ("provider", "code"),
            registry=r,
        )
        self.info = Gauge(
            "sia_build_info",
            "Always 1; labels say which version and provider run.",
            ("version", "provider"),
            registry=r,
        )
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: MetricWrapperBase, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once per label set.

        `labels()` takes a lock and validates and builds its key on every
        call; the hot path (each RPC, each provider call) asks this instead.
        """
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def set_task_stats(self, backend: str, stats: TaskStats) -> None:
        """Publish a task backend's counts by status and its queue's depth and age."""
        for status, count in stats.counts.items():
            self.tasks.labels(backend, status.value).set(count)
        self.task_queue_depth.labels(backend).set(stats.counts.get(TaskStatus.QUEUED, 0))
        self.tasks_running.labels(backend).set(stats.counts.get(TaskStatus.RUNNING, 0))
        self.task_oldest_queued.labels(backend).set(stats.oldest_queued_seconds)

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
