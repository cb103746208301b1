"""AsyncClient: the asyncio client, one coroutine per ImageService call (streams are
async iterators).

Every gRPC error leaves a method as a SiaError (sia.client.errors), raised from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

import grpc
import grpc.aio

from sia.api.image.v1 import image_service_pb2 as pb
from sia.api.image.v1 import image_service_pb2_grpc as pb_grpc
from sia.client import _requests
from sia.client._channel import GENERATION_TIMEOUT, TIMEOUT, ChannelSettings, channel_options
from sia.client.errors import translated
from sia.client.results import (
    Health,
    Result,
    StreamEvent,
    Task,
    TaskPage,
    TaskStatus,
    UsageReport,
    stream_event,
)

if TYPE_CHECKING:
    import os
    from collections.abc import AsyncGenerator, Mapping, Sequence
    from datetime import date
    from types import TracebackType

    from sia.client._requests import ImageInput, Period, ResponseFormat

__all__ = ["AsyncClient"]


class AsyncClient:
    """An asyncio SIA client; use it as an async context manager or await close()."""

    def __init__(
        self,
        target: str = "localhost:8080",
        *,
        api_key: str | None = None,
        tls: bool = False,
        ca: str | os.PathLike[str] | None = None,
        cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
        timeout: float = TIMEOUT,
        generation_timeout: float = GENERATION_TIMEOUT,
        options: Sequence[tuple[str, Any]] = (),
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """`api_key` defaults to $SIA_API_KEY; `ca`, `cert` or `key` imply `tls`;
        `timeout` is the deadline of short calls, `generation_timeout` of generations
        and group streams; watches have none (every method takes its own `timeout` too)."""
        self._settings = ChannelSettings.build(
            target,
            api_key=api_key,
            tls=tls,
            ca=ca,
            cert=cert,
            key=key,
            timeout=timeout,
            generation_timeout=generation_timeout,
            options=options,
            environ=environ,
        )
        credentials = self._settings.credentials()
        opts = channel_options(self._settings.options)
        self._channel = (
            grpc.aio.secure_channel(target, credentials, options=opts)
            if credentials is not None
            else grpc.aio.insecure_channel(target, options=opts)
        )
        self._stub = pb_grpc.ImageServiceStub(self._channel)
        self._metadata = self._settings.metadata
        self._closed = False

    def __repr__(self) -> str:
        return self._settings.describe(type(self).__name__)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled. Closing twice is fine."""
        if not self._closed:
            self._closed = True
            await self._channel.close()

    def _short(self, timeout: float | None) -> float:
        return self._settings.timeout if timeout is None else timeout

    def _long(self, timeout: float | None) -> float:
        return self._settings.generation_timeout if timeout is None else timeout

    async def generate_image(
        self,
        prompt: str,
        *,
        model: str = "",
        size: str = "",
        images: Sequence[ImageInput] = (),
        seed: int | None = None,
        guidance_scale: float | None = None,
        response_format: ResponseFormat | None = None,
        watermark: bool | None = None,
        timeout: float | None = None,
    ) -> Result:
        """Generate one image and wait for it (GenerateImage)."""
        request = _requests.generate_request(
            prompt,
            model=model,
            size=size,
            images=images,
            seed=seed,
            guidance_scale=guidance_scale,
            response_format=response_format,
            watermark=watermark,
        )
        with translated():
            answer = await self._stub.GenerateImage(
                request, timeout=self._long(timeout), metadata=self._metadata
            )
        return Result.from_proto(answer)

    async def generate_group(
        self,
        prompt: str,
        *,
        model: str = "",
        size: str = "",
        images: Sequence[ImageInput] = (),
        max_images: int | None = None,
        response_format: ResponseFormat | None = None,
        watermark: bool | None = None,
        timeout: float | None = None,
    ) -> Result:
        """Generate a consistent group of images and wait for all (GenerateSequentialImages)."""
        request = _requests.group_request(
            prompt,
            model=model,
            size=size,
            images=images,
            max_images=max_images,
            response_format=response_format,
            watermark=watermark,
        )
        with translated():
            answer = await self._stub.GenerateSequentialImages(
                request, timeout=self._long(timeout), metadata=self._metadata
            )
        return Result.from_proto(answer)

    async def stream_group(
        self,
        prompt: str,
        *,
        model: str = "",
        size: str = "",
        images: Sequence[ImageInput] = (),
        max_images: int | None = None,
        response_format: ResponseFormat | None = None,
        watermark: bool | None = None,
        timeout: float | None = None,
    ) -> AsyncGenerator[StreamEvent, None]:
        """Each image of a group as it is made, then one Completed (StreamSequentialImages).

        Leaving the loop early cancels the call, which stops the generation."""
        request = _requests.group_request(
            prompt,
            model=model,
            size=size,
            images=images,
            max_images=max_images,
            response_format=response_format,
            watermark=watermark,
        )
        call = self._stub.StreamSequentialImages(
            request, timeout=self._long(timeout), metadata=self._metadata
        )
        try:
            with translated():
                async for message in call:
                    yield stream_event(message)
        finally:
            call.cancel()

    async def submit(
        self,
        prompt: str,
        *,
        model: str = "",
        size: str = "",
        images: Sequence[ImageInput] = (),
        seed: int | None = None,
        guidance_scale: float | None = None,
        response_format: ResponseFormat | None = None,
        watermark: bool | None = None,
        request_id: str = "",
        webhook_url: str = "",
        timeout: float | None = None,
    ) -> Task:
        """Store one image's generation as a task; answers at once (GenerateImageAsync)."""
        request = _requests.generate_request(
            prompt,
            model=model,
            size=size,
            images=images,
            seed=seed,
            guidance_scale=guidance_scale,
            response_format=response_format,
            watermark=watermark,
            request_id=request_id,
            webhook_url=webhook_url,
        )
        with translated():
            answer = await self._stub.GenerateImageAsync(
                request, timeout=self._short(timeout), metadata=self._metadata
            )
        return Task.from_submit(answer)

    async def submit_group(
        self,
        prompt: str,
        *,
        model: str = "",
        size: str = "",
        images: Sequence[ImageInput] = (),
        max_images: int | None = None,
        response_format: ResponseFormat | None = None,
        watermark: bool | None = None,
        request_id: str = "",
        webhook_url: str = "",
        webhook_each_image: bool = False,
        timeout: float | None = None,
    ) -> Task:
        """Store a group's generation as a task (GenerateSequentialImagesAsync)."""
        request = _requests.group_request(
            prompt,
            model=model,
            size=size,
            images=images,
            max_images=max_images,
            response_format=response_format,
            watermark=watermark,
            request_id=request_id,
            webhook_url=webhook_url,
            webhook_each_image=webhook_each_image,
        )
        with translated():
            answer = await self._stub.GenerateSequentialImagesAsync(
                request, timeout=self._short(timeout), metadata=self._metadata
            )
        return Task.from_submit(answer)

    async def get_task(self, task_id: str, *, timeout: float | None = None) -> Task:
        """A task's current state (GetImageTask)."""
        with translated():
            answer = await self._stub.GetImageTask(
                pb.GetImageTaskRequest(task_id=task_id),
                timeout=self._short(timeout),
                metadata=self._metadata,
            )
        return Task.from_proto(answer)

    async def watch_task(
        self, task_id: str, *, timeout: float | None = None
    ) -> AsyncGenerator[Task, None]:
        """The task's state now and at every change, ending with its final state
        (WatchImageTask). No deadline unless `timeout`: a watch lasts as long as the task
        (a server shutting down ends it with Unavailable)."""
        call = self._stub.WatchImageTask(
            pb.WatchImageTaskRequest(task_id=task_id),
            timeout=timeout,  # None: no deadline
            metadata=self._metadata,
        )
        try:
            with translated():
                async for message in call:
                    yield Task.from_proto(message)
        finally:
            call.cancel()

    async def wait_task(self, task_id: str, *, timeout: float | None = None) -> Task:
        """Watch the task to its end and return the final state (no deadline unless
        `timeout`, which bounds the whole wait)."""
        last = None
        async for last in self.watch_task(task_id, timeout=timeout):  # noqa: B007
            pass
        assert last is not None, "a watch sends the task's state at once"
        return last

    async def cancel_task(self, task_id: str, *, timeout: float | None = None) -> Task:
        """Cancel a queued or running task (CancelImageTask); a finished one is
        FailedPrecondition."""
        with translated():
            answer = await self._stub.CancelImageTask(
                pb.CancelImageTaskRequest(task_id=task_id),
                timeout=self._short(timeout),
                metadata=self._metadata,
            )
        return Task.from_cancel(answer)

    async def list_tasks(
        self,
        *,
        status: TaskStatus | str | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> TaskPage:
        """One page of the caller's tasks, newest first (ListImageTasks)."""
        with translated():
            answer = await self._stub.ListImageTasks(
                _requests.list_request(status, page_size, page_token),
                timeout=self._short(timeout),
                metadata=self._metadata,
            )
        return TaskPage.from_proto(answer)

    async def iter_tasks(
        self,
        *,
        status: TaskStatus | str | None = None,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> AsyncGenerator[Task, None]:
        """Every one of the caller's tasks, newest first, fetched a page at a time."""
        token = ""
        while True:
            page = await self.list_tasks(
                status=status, page_size=page_size, page_token=token, timeout=timeout
            )
            for task in page.tasks:
                yield task
            token = page.next_page_token
            if not token:
                return

    async def usage(
        self,
        *,
        period: Period | None = None,
        start_date: date | str | None = None,
        end_date: date | str | None = None,
        timeout: float | None = None,
    ) -> UsageReport:
        """What the caller's key used and spent, per model (GetUsage): today by default."""
        with translated():
            answer = await self._stub.GetUsage(
                _requests.usage_request(period, start_date, end_date),
                timeout=self._short(timeout),
                metadata=self._metadata,
            )
        return UsageReport.from_proto(answer)

    async def health(self, *, timeout: float | None = None) -> Health:
        """Whether the service can take work (HealthCheck; needs no key)."""
        with translated():
            answer = await self._stub.HealthCheck(
                pb.HealthCheckRequest(), timeout=self._short(timeout), metadata=self._metadata
            )
        return Health.from_proto(answer)
