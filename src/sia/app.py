"""The application: opens every resource, runs until a signal, shuts down in order.

Start-up order: blob store, provider, the webhook deliveries (their worker
resends what a previous run left pending), task backend, access control (keys
and usage loaded), the task workers, gRPC server, HTTP server, retention sweeper,
access sync (usage written, keys reloaded), readiness monitor; then readiness
turns serving. The monitor checks the task store and the blob store every
READINESS_INTERVAL seconds, so either one failing takes the instance out of
`/ready` and gRPC health alike, and its recovery brings it back.

Shutdown order (SIGTERM or SIGINT):
  1. readiness off: `/ready` answers 503, grpc.health.v1 NOT_SERVING, and
     new ImageService and REST API calls are refused with UNAVAILABLE (503);
  2. drain, within SHUTDOWN_GRACE: the gRPC server stops accepting and lets
     in-flight calls finish, as do HTTP requests in flight, while the task
     backend stops taking tasks and lets running ones finish (those still
     running are put back in the queue for the next start);
  3. close the sweeper, the HTTP server, the task store, the provider and
     the blob store, in reverse order of opening.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, Self

from sia.access.factory import build_access
from sia.errors import ConfigError
from sia.health import Readiness
from sia.http.server import HttpServer
from sia.logs import get_logger
from sia.metrics import Metrics
from sia.providers.ark import ArkProvider
from sia.providers.offline import OfflineProvider
from sia.providers.openai import OpenAIProvider
from sia.rpc.server import GrpcServer
from sia.runner import TaskRunner
from sia.service import ImageService
from sia.storage.local import ImageLinks, LocalBlobStore
from sia.tasks.sqlite import SqliteTaskBackend
from sia.webhooks import Webhooks, build_delivery_store

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine
    from types import TracebackType

    from sia.config import Settings
    from sia.providers.base import ImageProvider
    from sia.storage.base import BlobStore
    from sia.tasks.base import TaskBackend

log = get_logger("sia.app")

#: Seconds between readiness checks of the task and blob stores: each is one cheap
#: round trip, and a short outage (a Redis restart) should still show in health.
READINESS_INTERVAL = 2.0


def build_provider(settings: Settings, readiness: Readiness) -> ImageProvider:
    """The provider that IMAGE_PROVIDER (or the presence of a key) selects.

    HTTP providers report refused credentials to readiness, which keeps the
    instance out of rotation until a later call succeeds.
    """
    if settings.provider == "offline":
        return OfflineProvider(
            image_format=settings.offline_image_format, latency=settings.offline_latency
        )
    assert settings.image_api_key is not None  # Settings requires a key for these providers

    def on_health(problem: str | None) -> None:
        # Out of rotation no call could show the problem fixed: serve again after a while.
        recheck = settings.provider_recheck_interval
        readiness.report("provider", problem, expires_after=recheck)

    cls = ArkProvider if settings.provider == "ark" else OpenAIProvider
    return cls(
        settings.image_base_url,
        settings.image_api_key.get_secret_value(),
        max_retries=settings.image_max_retries,
        max_connections=settings.image_max_connections,
        on_health=on_health,
    )


def build_tasks(settings: Settings, metrics: Metrics) -> TaskBackend:
    """The task backend TASK_BACKEND selects."""
    if settings.task_backend == "redis":
        from sia.tasks.redis import RedisTaskBackend  # noqa: PLC0415 - saq loads only when used

        return RedisTaskBackend(
            settings.redis_url.get_secret_value(),
            queue=settings.redis_queue,
            workers=settings.task_workers,
            queue_limit=settings.task_queue_limit,
            retention=settings.task_retention,
            job_timeout=settings.image_timeout + 30,
            heartbeat=settings.task_heartbeat,
            max_attempts=settings.task_max_attempts,
            require_persistence=(
                settings.app_environment == "production" and settings.redis_require_persistence
            ),
            metrics=metrics,
        )
    return SqliteTaskBackend(
        settings.data_dir / "tasks.db",
        workers=settings.task_workers,
        queue_limit=settings.task_queue_limit,
        max_attempts=settings.task_max_attempts,
        metrics=metrics,
    )


def build_store(settings: Settings, http_url: Callable[[], str]) -> BlobStore:
    """The blob store BLOB_STORE selects; `http_url()` is the HTTP side server's URL."""
    if settings.blob_store == "s3":
        from sia.storage.s3 import S3BlobStore  # noqa: PLC0415 - the S3 client loads only when used

        secret = settings.s3_secret_access_key
        return S3BlobStore(
            bucket=settings.s3_bucket,
            prefix=settings.s3_prefix,
            endpoint_url=settings.s3_endpoint_url or None,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id or None,
            secret_access_key=secret.get_secret_value() if secret else None,
            url_expiry=settings.task_retention,
            public_base_url=settings.s3_public_url or None,
        )
    return LocalBlobStore(
        settings.data_dir / "images", http_url, links=ImageLinks.from_settings(settings)
    )


class App:
    """One running SIA instance; use as `async with App(settings) as app:`.

    `provider` replaces the one the settings select (tests pass their own);
    `readiness_interval` is the seconds between the stores' readiness checks.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        provider: ImageProvider | None = None,
        readiness_interval: float = READINESS_INTERVAL,
    ) -> None:
        self.settings = settings
        self._provider = provider
        self._readiness_interval = readiness_interval
        self.metrics = Metrics()
        self.readiness = Readiness()
        self._stack = AsyncExitStack()
        self._stopped = asyncio.Event()
        self._shutdown_done = False
        self._background: set[asyncio.Task[None]] = set()
        # Where image links start: PUBLIC_URL, else the HTTP port (the bound one once it runs).
        scheme = "http" if settings.http_tls_cert_file is None else "https"
        self._link_base = settings.public_url or f"{scheme}://localhost:{settings.http_port}"

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    async def _start(self) -> None:
        settings, stack = self.settings, self._stack
        self.store = build_store(settings, lambda: self._link_base)
        stack.push_async_callback(self.store.aclose)
        self.provider = self._provider or build_provider(settings, self.readiness)
        stack.push_async_callback(self.provider.aclose)
        # Opened before the task backend, so closed after it: runs ending in its final
        # drain still store their events.
        deliveries = build_delivery_store(settings)
        await deliveries.open()
        stack.push_async_callback(deliveries.aclose)
        self.webhooks = Webhooks(settings, deliveries, self.metrics)
        await self.webhooks.start()
        stack.push_async_callback(self.webhooks.aclose)
        self.tasks = build_tasks(settings, self.metrics)
        stack.push_async_callback(self.tasks.aclose)
        self.access = build_access(settings, self.metrics)
        stack.push_async_callback(self.access.aclose)
        await self.access.start()
        self.service = ImageService(
            settings,
            provider=self.provider,
            tasks=self.tasks,
            store=self.store,
            metrics=self.metrics,
            readiness=self.readiness,
            access=self.access,
            webhooks=self.webhooks,
        )
        self._check_default_size()
        runner = TaskRunner(self.service)
        await self.tasks.start(runner, on_abandoned=runner.abandoned)

        self.grpc = GrpcServer(
            settings, self.service, self.metrics, self.readiness, access=self.access
        )
        await self.grpc.start()
        stack.push_async_callback(self.grpc.stop, 0)
        self.readiness.on_change(lambda serving: self._spawn(self.grpc.set_serving(serving)))

        self.readiness.add_check("tasks", self.tasks.ready, "task store is not answering")
        self.readiness.add_check(
            "images", self.store.ready, "image store cannot write or is out of space"
        )
        self.metrics.before_scrape(self.service.publish_task_stats)
        links = self.store.links if isinstance(self.store, LocalBlobStore) else None
        self.http = HttpServer(
            settings,
            readiness=self.readiness,
            metrics=self.metrics,
            images=self.store.image_dir,
            links=links,
            service=self.service,
            access=self.access,
        )
        await self.http.start()
        stack.push_async_callback(self.http.stop)
        if not settings.public_url:
            self._link_base = f"{self.http.scheme}://localhost:{self.http.port}"

        sweeper = asyncio.create_task(self._sweep_forever(), name="sia-retention-sweeper")
        stack.push_async_callback(_cancel, sweeper)
        syncer = asyncio.create_task(self.access.sync_forever(), name="sia-access-sync")
        stack.push_async_callback(_cancel, syncer)
        self.metrics.before_scrape(self.access.publish_budgets)
        await self.readiness.check()  # a store already broken keeps the instance out from the start
        monitor = self.readiness.monitor(self._readiness_interval)
        stack.push_async_callback(_cancel, asyncio.create_task(monitor, name="sia-readiness"))

        self.metrics.info.labels(settings.app_version, self.provider.name).set(1)
        self.readiness.mark_started()
        log.info(
            "server_ready",
            grpc_port=self.grpc.port,
            http_port=self.http.port,
            provider=self.provider.name,
            environment=settings.app_environment,
        )

    def _check_default_size(self) -> None:
        spec = self.provider.models.get(self.settings.image_model)
        if spec is None:
            raise ConfigError(
                f"IMAGE_MODEL: {self.settings.image_model!r} is not a model of the "
                f"{self.provider.name} provider; known: {', '.join(sorted(self.provider.models))}"
            )
        if (problem := spec.check_size(self.settings.image_default_size)) is not None:
            raise ConfigError(f"IMAGE_DEFAULT_SIZE: {problem}")

    @property
    def grpc_port(self) -> int:
        """The port the gRPC server listens on (useful with GRPC_PORT=0)."""
        return self.grpc.port

    @property
    def http_port(self) -> int:
        """The port the HTTP side server listens on."""
        return self.http.port

    def request_stop(self, sig: signal.Signals | None = None) -> None:
        """Ask `wait_for_stop` to return (what SIGTERM and SIGINT do)."""
        if sig is not None:
            log.info("shutdown_signal", signal=sig.name, grace_seconds=self.settings.shutdown_grace)
        self._stopped.set()

    async def wait_for_stop(self) -> None:
        """Return once `request_stop` has been called."""
        await self._stopped.wait()

    async def shutdown(self) -> None:
        """Run the shutdown order in the module docstring; idempotent."""
        if self._shutdown_done:
            return
        self._shutdown_done = True
        self.readiness.begin_shutdown()
        grace = self.settings.shutdown_grace
        await asyncio.gather(self.grpc.stop(grace), self.http.drain(grace), self.tasks.drain(grace))
        await self._stack.aclose()
        for task in list(self._background):
            await _cancel(task)
        log.info("shutdown_complete")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _sweep_forever(self) -> None:
        interval = min(300.0, max(1.0, self.settings.task_retention / 10))
        while True:
            try:
                await self.service.sweep()
            except Exception:
                log.exception("retention_sweep_failed")
            await asyncio.sleep(interval)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def serve(settings: Settings) -> None:
    """Run one instance until SIGTERM or SIGINT, then shut down in order.

    The handlers are installed before start-up, so a signal that arrives while
    the server starts still leads to a clean shutdown.
    """
    app = App(settings)
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, app.request_stop, sig)
    try:
        async with app:
            await app.wait_for_stop()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
