"""The use cases: generate, submit, get, cancel and list tasks, usage, and housekeeping.

`ImageService` is the domain core the edges call. It knows the provider, the
task backend and the blob store only through their protocols, and nothing of
gRPC or HTTP. The edges authenticate the caller (`AccessControl.authenticate`)
and pass its key here, where its limits are applied and its usage counted;
a caller of None is anonymous (access control off).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from datetime import timedelta
from typing import TYPE_CHECKING

from sia.domain import (
    GeneratedImage,
    GenerationRequest,
    GenerationResult,
    ImageError,
    ResponseFormat,
    utcnow,
)
from sia.errors import (
    DeadlineExceeded,
    ImageStoreUnavailable,
    NotFound,
    ReferencesBusy,
    RequestIdReused,
    SiaError,
    TaskNotFound,
)
from sia.logs import get_logger
from sia.validation import Defaults, check_images, check_reference_total

if TYPE_CHECKING:
    from collections.abc import Iterator
    from datetime import date

    from sia.access.base import ApiKey, UsageEntry
    from sia.access.gate import AccessControl
    from sia.config import Settings
    from sia.domain import Task, TaskStatus
    from sia.health import Readiness
    from sia.metrics import Metrics
    from sia.providers.base import ImageProvider
    from sia.storage.base import BlobStore
    from sia.tasks.base import TaskBackend

log = get_logger("sia.service")

_EXPIRED = ImageError("IMAGE_EXPIRED", "the stored image has expired")
#: Waits (seconds) before a task's store attempts after the first. A blip keeps the
#: billed images; the total stays well inside the 30 s a Redis job has past IMAGE_TIMEOUT.
STORE_RETRY_DELAYS = (1.0, 3.0, 8.0)
_NO_TIMER = contextlib.nullcontext()


def _as_bytes(request: GenerationRequest) -> GenerationRequest:
    """The same request, asking the provider for image bytes instead of its URLs."""
    return dataclasses.replace(request, response_format=ResponseFormat.B64_JSON)


#: Decoded bytes of data-URI references that calls and submissions in flight may hold
#: together (each holds about five times its share: message, strings, upstream body).
REFERENCE_BYTES_IN_FLIGHT = 64 * 1024 * 1024


class ByteBudget:
    """At most `limit` bytes held at once; a claim past it is refused, never queued."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    @contextlib.contextmanager
    def claim(self, size: int) -> Iterator[None]:
        """Hold `size` bytes for the block, or raise ReferencesBusy when they would not fit."""
        if self.held + size > self.limit:
            raise ReferencesBusy(
                f"reference images of other calls fill this instance's {self.limit:,} bytes "
                "for them; retry shortly",
                metadata={"limit_bytes": str(self.limit)},
            )
        self.held += size
        try:
            yield
        finally:
            self.held -= size


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
    ) -> None:
        self.settings = settings
        self.access = access
        # Calls of anonymous callers skip the gate unless the account has a limit.
        self._gate_anonymous = access is not None and bool(access.account_ipm)
        self.provider = provider
        self.tasks = tasks
        self.store = store
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
    ) -> GenerationResult:
        """Generate now, within IMAGE_TIMEOUT and the caller's time if sooner.

        `caller_timeout` is the time the caller has left and enforces itself by
        cancelling this coroutine, as gRPC does at a call's deadline. Retries
        stop short of it; the service sets a timer of its own only when
        IMAGE_TIMEOUT comes first (a timer per call costs more than the rest of
        the deadline handling together).

        For URL results, images the provider returns as bytes are stored so the
        URL points at this service; with STORE_RESULTS every image is fetched
        as bytes and stored, so its URL outlives the provider's.

        Data-URI references are decoded and checked first, off the event loop,
        and hold their share of REFERENCE_BYTES_IN_FLIGHT until the call ends.
        The caller's key must allow the model and have room in its limits; the
        call holds one of its concurrency slots and reserves its most images and
        cost against the key's quotas while it runs.
        """
        access = self.access
        if access is None or (caller is None and not self._gate_anonymous):
            return await self._generate_checked(request, caller_timeout, "")
        async with access.calling(caller, request):
            owner = caller.name if caller is not None else ""
            return await self._generate_checked(request, caller_timeout, owner)

    async def _generate_checked(
        self, request: GenerationRequest, caller_timeout: float | None, owner: str
    ) -> GenerationResult:
        if request.images and (size := check_reference_total(request.images)):
            with self.references.claim(size):
                await check_images(request.images)
                return await self._generate(request, caller_timeout, owner)
        return await self._generate(request, caller_timeout, owner)

    async def _generate(
        self, request: GenerationRequest, caller_timeout: float | None, owner: str
    ) -> GenerationResult:
        store = request.response_format is ResponseFormat.URL
        if store and self.settings.store_results:
            result = await self._call_provider(_as_bytes(request), caller_timeout, owner)
        else:
            result = await self._call_provider(request, caller_timeout, owner)
        return await self._store_bytes(result) if store else result

    async def run_task(self, task: Task) -> GenerationResult:
        """Task runner: generate as bytes and keep every image in the blob store.

        Task results must outlive the provider's URLs (Ark's expire after 24 h),
        so tasks always ask the provider for the image bytes. The generation is
        billed: a failing blob store is retried, never the generation.
        Its key is checked again (revoked: KeyRevoked; over a quota or budget:
        QuotaExceeded) and the account's images per minute are waited for.
        """
        request, access = _as_bytes(task.request), self.access
        if access is None:
            result = await self._call_provider(request, None, task.owner)
        else:
            async with access.running(task.owner, request):
                result = await self._call_provider(request, None, task.owner)
        return await self._store_bytes(result, retry_delays=STORE_RETRY_DELAYS)

    async def submit(self, request: GenerationRequest, *, caller: ApiKey | None = None) -> Task:
        """Store `request` as a task of the caller (or return the caller's task of its
        request_id, which must be for the same request)."""
        if self.access is not None:
            await self.access.admit(caller, request)
        owner = caller.name if caller is not None else ""
        if request.images and (size := check_reference_total(request.images)):
            with self.references.claim(size):
                await check_images(request.images)
                task = await self.tasks.submit(request, owner=owner)
        else:
            task = await self.tasks.submit(request, owner=owner)
        if task.request != request:
            raise RequestIdReused(request.request_id, task.id)
        return task

    async def get_task(self, task_id: str, *, caller: ApiKey | None = None) -> Task:
        """The caller's task, with its result's images as URLs or bytes, as it asked.

        Another key's task is TaskNotFound, exactly as a missing one.
        """
        task = await self._own_task(task_id, caller)
        if task.result is None:
            return task
        result = await self._materialize(task.result, task.request.response_format)
        return dataclasses.replace(task, result=result)

    async def cancel_task(self, task_id: str, *, caller: ApiKey | None = None) -> Task:
        """Cancel a queued or running task of the caller."""
        await self._own_task(task_id, caller)
        return await self.tasks.cancel(task_id)

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
                result = await self._materialize(task.result, ResponseFormat.URL)
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

    async def _call_provider(
        self, request: GenerationRequest, caller_timeout: float | None, owner: str
    ) -> GenerationResult:
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
                result = await self.provider.generate(request, timeout=budget)
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

    async def _store_bytes(
        self, result: GenerationResult, *, retry_delays: tuple[float, ...] = ()
    ) -> GenerationResult:
        """Move inline image bytes into the blob store, linking each image to its blob.

        After an `ImageStoreUnavailable` the images not yet stored are tried
        again after each of `retry_delays` (seconds); then the error is raised.
        """
        if not any(image.data for image in result.images):
            return result  # URL results: nothing to store

        async def store(image: GeneratedImage) -> GeneratedImage:
            if not image.data:
                return image
            key = await self.store.put(image.data, image.content_type)
            return dataclasses.replace(
                image,
                blob_key=key,
                url=self.store.url(key),
                data=b"",
            )

        images = list(result.images)
        for delay in (*retry_delays, None):
            outcomes = await asyncio.gather(*map(store, images), return_exceptions=True)
            failure: ImageStoreUnavailable | None = None
            for index, outcome in enumerate(outcomes):
                if isinstance(outcome, ImageStoreUnavailable):
                    failure = outcome  # keep the bytes; the next round tries this image again
                elif isinstance(outcome, BaseException):
                    raise outcome  # anything else is not the store's fault to wait out
                else:
                    images[index] = outcome
            if failure is None:
                break
            if delay is None:
                raise failure
            log.warning("image_store_retry", delay_seconds=delay, error=failure.message)
            await asyncio.sleep(delay)
        return dataclasses.replace(result, images=tuple(images))

    async def _materialize(
        self, result: GenerationResult, response_format: ResponseFormat
    ) -> GenerationResult:
        """Fill in each stored image's URL, or its bytes for B64_JSON."""

        async def fill(image: GeneratedImage) -> GeneratedImage:
            if not image.blob_key:
                return image
            if response_format is ResponseFormat.URL:
                return dataclasses.replace(image, url=self.store.url(image.blob_key))
            try:
                data = await self.store.get(image.blob_key)
            except NotFound:
                return dataclasses.replace(image, error=_EXPIRED)
            return dataclasses.replace(image, url="", data=data)

        images = await asyncio.gather(*(fill(image) for image in result.images))
        return dataclasses.replace(result, images=tuple(images))


def _add(a: UsageEntry, b: UsageEntry) -> UsageEntry:
    """The sum of two usage entries of one key and model (the first one's day)."""
    return dataclasses.replace(
        a,
        requests=a.requests + b.requests,
        images=a.images + b.images,
        output_tokens=a.output_tokens + b.output_tokens,
        cost_micros=a.cost_micros + b.cost_micros,
    )
