"""The image.v1.ImageService servicer: converts messages and delegates to ImageService.

Errors are raised as `SiaError`; the interceptor turns them into statuses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sia.api.image.v1 import image_service_pb2 as pb
from sia.api.image.v1 import image_service_pb2_grpc as pb_grpc
from sia.domain import utcnow
from sia.rpc import convert
from sia.rpc.interceptors import CALLER
from sia.validation import validate_task_id

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import grpc.aio

    from sia.domain import Task
    from sia.service import ImageService


def _submitted(task: Task) -> pb.GenerateImageAsyncResponse:
    return pb.GenerateImageAsyncResponse(
        task_id=task.id,
        status=convert.task_status(task.status),
        created_at=convert.timestamp(task.created_at),
    )


class ImageServicer(pb_grpc.ImageServiceServicer):
    """Thin gRPC edge of ImageService."""

    def __init__(self, service: ImageService) -> None:
        self.service = service

    async def GenerateImage(
        self, request: pb.GenerateImageRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GenerateImageResponse:
        """Generate one image and wait for it."""
        convert.asynchronous_only(request)
        domain = convert.generate_request(request, self.service.defaults)
        result = await self.service.generate(
            domain, caller=CALLER.get(), caller_timeout=context.time_remaining()
        )
        return convert.generate_response(result)

    async def GenerateSequentialImages(
        self,
        request: pb.GenerateSequentialImagesRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> pb.GenerateImageResponse:
        """Generate a group of images and wait for them."""
        convert.asynchronous_only(request)
        domain = convert.sequential_request(request, self.service.defaults)
        result = await self.service.generate(
            domain, caller=CALLER.get(), caller_timeout=context.time_remaining()
        )
        return convert.generate_response(result)

    async def StreamSequentialImages(
        self,
        request: pb.GenerateSequentialImagesRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[pb.StreamSequentialImagesResponse]:
        """Generate a group, sending each image as the provider produces it."""
        convert.asynchronous_only(request)
        domain = convert.sequential_request(request, self.service.defaults)
        events = self.service.stream(
            domain, caller=CALLER.get(), caller_timeout=context.time_remaining()
        )
        async for event in events:
            yield convert.stream_event(event)

    async def GenerateSequentialImagesAsync(
        self,
        request: pb.GenerateSequentialImagesRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> pb.GenerateImageAsyncResponse:
        """Store a group as a task and answer with its id."""
        domain = convert.sequential_request(request, self.service.defaults)
        return _submitted(await self.service.submit(domain, caller=CALLER.get()))

    async def WatchImageTask(
        self, request: pb.WatchImageTaskRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.GetImageTaskResponse]:
        """Send the task's state now and at every change, until it ends."""
        async for task in self.service.watch(
            validate_task_id(request.task_id), caller=CALLER.get()
        ):
            yield convert.task_response(task)

    async def GenerateImageAsync(
        self, request: pb.GenerateImageRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GenerateImageAsyncResponse:
        """Store the request as a task and answer with its id."""
        domain = convert.generate_request(request, self.service.defaults)
        return _submitted(await self.service.submit(domain, caller=CALLER.get()))

    async def GetImageTask(
        self, request: pb.GetImageTaskRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GetImageTaskResponse:
        """Answer a task's status and result."""
        task = await self.service.get_task(validate_task_id(request.task_id), caller=CALLER.get())
        return convert.task_response(task)

    async def CancelImageTask(
        self, request: pb.CancelImageTaskRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.CancelImageTaskResponse:
        """Cancel a queued or running task."""
        task = await self.service.cancel_task(
            validate_task_id(request.task_id), caller=CALLER.get()
        )
        return pb.CancelImageTaskResponse(task_id=task.id, status=convert.task_status(task.status))

    async def ListImageTasks(
        self, request: pb.ListImageTasksRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ListImageTasksResponse:
        """List the caller's tasks, newest first, a page at a time."""
        status, size, token = convert.list_query(request)
        tasks, cursor = await self.service.list_tasks(
            caller=CALLER.get(), status=status, limit=size, after=token
        )
        return convert.list_response(tasks, cursor)

    async def GetUsage(
        self, request: pb.GetUsageRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GetUsageResponse:
        """Report the caller's usage per model over a period."""
        first, last = convert.usage_period(request, utcnow().date())
        caller = CALLER.get()
        rows = await self.service.usage(first, last, caller=caller)
        return convert.usage_response(
            caller.name if caller else "", first, last, rows, self.service.settings.price_currency
        )

    async def HealthCheck(
        self, request: pb.HealthCheckRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.HealthCheckResponse:
        """Say whether this instance takes work."""
        settings = self.service.settings
        serving = await self.service.ready()
        return pb.HealthCheckResponse(
            status=pb.SERVING_STATUS_SERVING if serving else pb.SERVING_STATUS_NOT_SERVING,
            service=settings.app_name,
            version=settings.app_version,
            provider=self.service.provider.name,
            timestamp=convert.timestamp(utcnow()),
        )
