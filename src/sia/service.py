"""The use cases: generate (at once or streamed), submit, get, watch, cancel and list
tasks, usage, and housekeeping.

`ImageService` is the domain core the edges call. It knows the provider, the
task backend and the blob store only through their protocols, and nothing of
gRPC or HTTP. The edges authenticate the caller (`AccessControl.authenticate`)
and pass its key here, where its limits are applied and its usage counted;
a caller of None is anonymous (access control off). Running tasks is
`sia.runner`'s business.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from sia.domain import GeneratedImage, GenerationRequest, GenerationResult, ResponseFormat, utcnow
from sia.errors import DeadlineExceeded, RequestIdReused, ShuttingDown, SiaError, TaskNotFound
from sia.images import ImageKeeper, as_bytes, with_images
from sia.logs import get_logger
from sia.validation import (
    REFERENCE_BYTES_IN_FLIGHT,
    ByteBudget,
    Defaults,
    check_images,
    check_reference_total,
)
from sia.webhooks import TASK_CANCELLED

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Coroutine
    from datetime import date

    from sia.access.base import ApiKey, UsageEntry
    from sia.access.gate import AccessControl
    from sia.config import Settings
    from sia.domain import OnImage, Task, TaskStatus
    from sia.health import Readiness
    from sia.metrics import Metrics
    from sia.providers.base import ImageProvider
    from sia.storage.base import BlobStore
    from sia.tasks.base import TaskBackend
    from sia.webhooks import Webhooks

log = get_logger("sia.service")

_T = TypeVar("_T")


async def _to_the_end(step: Coroutine[Any, Any, _T]) -> _T:
    """Await `step` (a task store's write) to its end even if the caller is cancelled
    meanwhile (its client went away): a write cut halfway would leave a task half made,
    stored cancelled but still running, say. The caller still gets its CancelledError."""
    running = asyncio.ensure_future(step)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        running.add_done_callback(_log_failure)
        raise


def _log_failure(step: asyncio.Future[Any]) -> None:
    if not step.cancelled() and (exc := step.exception()) is not None:
        log.warning("task_write_failed_after_disconnect", error=repr(exc)[:200])


_NO_TIMER = contextlib.nullcontext()


class ImageService:
    """Generates images now or as tasks, and keeps stored results tidy."""

    def __init__(
        self,
        settings: Settings,
        *,
        provider: ImageProvider,
        tasks: TaskBackend,
        store: BlobStore,
        metrics: Metrics,
        readiness: Readiness,
        access: AccessControl | None = None,
        webhooks: Webhooks | None = None,
    ) -> None:
        self.settings = settings
        self.access = access
        # Calls of anonymous callers skip the gate unless the account has a limit.
        self._gate_anonymous = access is not None and bool(access.account_ipm)
        self.provider = provider
        self.tasks = tasks
        self.store = store
        self.images = ImageKeeper(store)
        self._shutdown: asyncio.Future[Any] | None = None
        self.webhooks = webhooks
        self.metrics = metrics
        self.readiness = readiness
        self.references = ByteBudget(REFERENCE_BYTES_IN_FLIGHT)
        self.defaults = Defaults(
            model=settings.image_model,
            size=settings.image_default_size,
            models=provider.models,
        )

    async def generate(
        self,
        request: GenerationRequest,
        *,
        caller: ApiKey | None = None,
        caller_timeout: float | None = None,
        on_image: OnImage | None = None,
    ) -> GenerationResult:
        """Generate now, within IMAGE_TIMEOUT and the caller's time if sooner.

        `caller_timeout` is the time the caller has left and enforces itself by
        cancelling this coroutine, as gRPC does at a call's deadline. Retries
        stop short of it; the service sets a timer of its own only when
        IMAGE_TIMEOUT comes first (a timer per call costs more than the rest of
        the deadline handling together).

        For URL results, images the provider returns as bytes are stored so the
        URL points at this service; with STORE_RESULTS every image is fetched
        as bytes and stored, so its URL outlives the provider's. `on_image` gets
        each image as the provider produces it, already stored.

        Data-URI references are decoded and checked first, off the event loop,
        and hold their share of REFERENCE_BYTES_IN_FLIGHT until the call ends.
        The caller's key must allow the model and have room in its limits; the
        call holds one of its concurrency slots and reserves its most images and
        cost against the key's quotas while it runs.
        """
        access = self.access
        if access is None or (caller is None and not self._gate_anonymous):
            return await self._generate_checked(request, caller_timeout, "", on_image)
        async with access.calling(caller, request):
            owner = caller.name if caller is not None else ""
            return await self._generate_checked(request, caller_timeout, owner, on_image)

    async def stream(
        self,
        request: GenerationRequest,
        *,
        caller: ApiKey | None = None,
        caller_timeout: float | None = None,
    ) -> AsyncIterator[GeneratedImage | GenerationResult]:
        """`generate`, yielding each image as the provider produces it, then the result.

        Closing the iterator early (the caller went away) cancels the generation,
        which closes the upstream connection.
        """
        queue: asyncio.Queue[GeneratedImage | GenerationResult | BaseException] = asyncio.Queue()

        async def produce() -> None:
            try:
                result = await self.generate(
                    request, caller=caller, caller_timeout=caller_timeout, on_image=queue.put
                )
            except Exception as exc:  # handed to the consumer, which raises it
                queue.put_nowait(exc)
            else:
                queue.put_nowait(result)

        producer = asyncio.create_task(produce(), name="sia-stream")
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, GenerationResult):
                    return
        finally:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer

    async def _generate_checked(
        self,
        request: GenerationRequest,
        caller_timeout: float | None,
        owner: str,
        on_image: OnImage | None,
    ) -> GenerationResult:
        if request.images and (size := check_reference_total(request.images)):
            with self.references.claim(size):
                await check_images(request.images)
                return await self._generate(request, caller_timeout, owner, on_image)
        return await self._generate(request, caller_timeout, owner, on_image)

    async def _generate(
        self,
        request: GenerationRequest,
        caller_timeout: float | None,
        owner: str,
        on_image: OnImage | None,
    ) -> GenerationResult:
        keep = request.response_format is ResponseFormat.URL
        if keep and self.settings.store_results:
            request = as_bytes(request)
        kept: dict[int, GeneratedImage] = {}
        if on_image is not None:
            user_callback = on_image

            async def on_image(image: GeneratedImage) -> None:
                if keep:  # stored before the caller sees it, once
                    image = kept[image.index] = await self.images.keep(image)
                await user_callback(image)

        result = await self.call_provider(request, caller_timeout, owner, on_image)
        result = with_images(result, kept)
        return await self.images.keep_all(result) if keep else result

    async def submit(self, request: GenerationRequest, *, caller: ApiKey | None = None) -> Task:
        """Store `request` (one image or a group) as a task of the caller (or return the
        caller's task of its request_id, which must be for the same request)."""
        if self.webhooks is not None:
            self.webhooks.check(request)
        if self.access is not None:
            await self.access.admit(caller, request)
        owner = caller.name if caller is not None else ""
        if request.images and (size := check_reference_total(request.images)):
            with self.references.claim(size):
                await check_images(request.images)
                task = await _to_the_end(self.tasks.submit(request, owner=owner))
        else:
            task = await _to_the_end(self.tasks.submit(request, owner=owner))
        if task.request != request:
            raise RequestIdReused(request.request_id, task.id)
        return task

    async def get_task(self, task_id: str, *, caller: ApiKey | None = None) -> Task:
        """The caller's task, with its result's images as URLs or bytes, as it asked
        (a running group's images so far).

        Another key's task is TaskNotFound, exactly as a missing one.
        """
        return await self._shown(await self._own_task(task_id, caller))

    async def watch(self, task_id: str, *, caller: ApiKey | None = None) -> AsyncIterator[Task]:
        """The caller's task now, then again at each change, until it has ended.

        Shutdown ends a watch that is still open with ShuttingDown (the client
        watches again on another instance) rather than cutting it.
        """
        async with self.tasks.watch(task_id) as changes:
            task = await self._own_task(task_id, caller)
            yield await self._shown(task)
            seen = _state(task)
            stopping = self._stopping()
            while not task.status.is_terminal:
                changed = asyncio.ensure_future(changes.changed())
                try:
                    await asyncio.wait((changed, stopping), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()  # the caller's cancel or deadline, or shutdown
                if not changed.done() or changed.cancelled():
                    raise ShuttingDown
                task = await self._own_task(task_id, caller)
                if (state := _state(task)) != seen:  # compared before reading any image
                    seen = state
                    yield await self._shown(task)

    def _stopping(self) -> asyncio.Future[Any]:
        """One future every watch shares, done when shutdown begins."""
        if self._shutdown is None:
            self._shutdown = asyncio.ensure_future(self.readiness.shutdown_begun.wait())
        return self._shutdown

    async def cancel_task(self, task_id: str, *, caller: ApiKey | None = None) -> Task:
        """Cancel a queued or running task of the caller."""
        await self._own_task(task_id, caller)
        return await _to_the_end(self._cancel(task_id))

    async def _cancel(self, task_id: str) -> Task:
        task = await self.tasks.cancel(task_id)
        if self.webhooks is not None and task.request.webhook_url:
            try:
                await self.webhooks.enqueue(await self._shown(task), TASK_CANCELLED)
            except SiaError as exc:  # the cancel stands; only its event is lost
                log.error(
                    "webhook_event_lost", task_id=task_id, kind=TASK_CANCELLED, error=exc.message
                )
        return task

    async def list_tasks(
        self,
        *,
        caller: ApiKey | None = None,
        status: TaskStatus | None = None,
        limit: int = 20,
        after: str = "",
    ) -> tuple[list[Task], str]:
        """A page of the caller's tasks, newest first, and the cursor of the next page.

        Stored images are listed as links, whatever format the task asked for:
        GetImageTask returns the bytes.
        """
        owner = caller.name if caller is not None else ""
        tasks, cursor = await self.tasks.list(owner, status=status, limit=limit, after=after)
        listed = []
        for task in tasks:
            if task.result is not None:
                result = await self.images.materialize(task.result, ResponseFormat.URL)
                task = dataclasses.replace(task, result=result)  # noqa: PLW2901 - the listed copy
            listed.append(task)
        return listed, cursor

    async def usage(
        self, first: date, last: date, *, caller: ApiKey | None = None
    ) -> list[UsageEntry]:
        """The caller's usage per model over the days [first, last] (UTC), by model id.

        Usage is counted per key: an anonymous caller has none.
        """
        if self.access is None or caller is None:
            return []
        await self.access.ledger.flush()  # what this replica counted, included
        rows = await self.access.store.usage(caller.name, first, last)
        by_model: dict[str, UsageEntry] = {}
        for row in rows:
            seen = by_model.get(row.model)
            by_model[row.model] = row if seen is None else _add(seen, row)
        return [by_model[model] for model in sorted(by_model)]

    async def _shown(self, task: Task) -> Task:
        if task.result is None:
            return task
        result = await self.images.materialize(task.result, task.request.response_format)
        return dataclasses.replace(task, result=result)

    async def _own_task(self, task_id: str, caller: ApiKey | None) -> Task:
        task = await self.tasks.get(task_id)
        if task.owner != (caller.name if caller is not None else ""):
            raise TaskNotFound(task_id)
        return task

    async def ready(self) -> bool:
        """True when this instance should receive traffic (the task store's check included:
        the app registers it with readiness)."""
        return await self.readiness.ready()

    async def publish_task_stats(self) -> None:
        """Refresh the task gauges from the backend (called on each scrape)."""
        self.metrics.set_task_stats(self.tasks.name, await self.tasks.stats())

    async def sweep(self) -> None:
        """Delete tasks and stored images older than the retention period."""
        cutoff = utcnow() - timedelta(seconds=self.settings.task_retention)
        tasks = await self.tasks.purge(cutoff)
        blobs = await self.store.sweep(cutoff)
        if tasks or blobs:
            log.info("retention_sweep", tasks_deleted=tasks, images_deleted=blobs)

    async def call_provider(
        self,
        request: GenerationRequest,
        caller_timeout: float | None,
        owner: str,
        on_image: OnImage | None = None,
    ) -> GenerationResult:
        """The provider's result for `request`, timed, counted, and charged to `owner`."""
        budget = self.settings.image_timeout
        timer: contextlib.AbstractAsyncContextManager[object]
        if caller_timeout is not None and caller_timeout < budget:
            budget, timer = caller_timeout, _NO_TIMER  # the caller cancels us in time
        else:
            timer = asyncio.timeout(budget)
        metrics, provider = self.metrics, self.provider.name
        start = time.perf_counter()
        try:
            async with timer:
                result = await self.provider.generate(request, timeout=budget, on_image=on_image)
        except TimeoutError:
            metrics.upstream_errors.labels(provider, "TIMEOUT").inc()
            raise DeadlineExceeded(f"the generation did not finish within {budget:.3g} s") from None
        except asyncio.CancelledError:
            if time.perf_counter() - start >= budget:  # the caller's deadline passed
                metrics.upstream_errors.labels(provider, "TIMEOUT").inc()
            raise
        except SiaError as exc:
            code = exc.metadata.get("upstream_code", exc.reason)
            metrics.upstream_errors.labels(provider, code).inc()
            if "answer_lost" in exc.metadata:
                metrics.upstream_answers_lost.labels(provider).inc()
            raise
        finally:
            elapsed = time.perf_counter() - start
            metrics.upstream_seconds.labels(provider, request.model).observe(elapsed)
        ok = sum(1 for image in result.images if image.ok)
        if ok:
            metrics.images_generated.labels(result.model, "success").inc(ok)
        if failed := len(result.images) - ok:
            metrics.images_generated.labels(result.model, "failure").inc(failed)
        if owner and self.access is not None:
            self.access.record(owner, result)
        return result


def _add(a: UsageEntry, b: UsageEntry) -> UsageEntry:
    """The sum of two usage entries of one key and model (the first one's day)."""
    return dataclasses.replace(
        a,
        requests=a.requests + b.requests,
        images=a.images + b.images,
        output_tokens=a.output_tokens + b.output_tokens,
        cost_micros=a.cost_micros + b.cost_micros,
    )


def _state(task: Task) -> tuple[object, ...]:
    """What a watcher is told about: a new status, images, error or end (not fresh links)."""
    images = len(task.result.images) if task.result is not None else 0
    return (task.status, images, task.error, task.finished_at)
