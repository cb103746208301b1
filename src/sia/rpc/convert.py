"""Conversion between image.v1 protobuf messages and the domain types."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from google.protobuf.timestamp_pb2 import Timestamp

from sia.api.image.v1 import image_service_pb2 as pb
from sia.domain import GenerationRequest, ResponseFormat, TaskStatus
from sia.errors import InvalidArgument
from sia.validation import validate_request

if TYPE_CHECKING:
    from sia.domain import GeneratedImage, GenerationResult, ImageError, Task
    from sia.validation import Defaults

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FORMATS = {
    pb.RESPONSE_FORMAT_UNSPECIFIED: ResponseFormat.URL,
    pb.RESPONSE_FORMAT_URL: ResponseFormat.URL,
    pb.RESPONSE_FORMAT_B64_JSON: ResponseFormat.B64_JSON,
}
_STATUSES = {
    TaskStatus.QUEUED: pb.TASK_STATUS_QUEUED,
    TaskStatus.RUNNING: pb.TASK_STATUS_RUNNING,
    TaskStatus.SUCCEEDED: pb.TASK_STATUS_SUCCEEDED,
    TaskStatus.FAILED: pb.TASK_STATUS_FAILED,
    TaskStatus.CANCELLED: pb.TASK_STATUS_CANCELLED,
}


def _response_format(value: int) -> ResponseFormat:
    try:
        return _FORMATS[value]  # type: ignore[index]  # an open proto3 enum may hold any int
    except KeyError:
        raise InvalidArgument.field(
            "response_format", f"unknown value {value}; use URL or B64_JSON"
        ) from None


def generate_request(msg: pb.GenerateImageRequest, defaults: Defaults) -> GenerationRequest:
    """A validated domain request from GenerateImageRequest."""
    return validate_request(
        defaults,
        prompt=msg.prompt,
        model=msg.model,
        size=msg.size,
        response_format=_response_format(msg.response_format),
        watermark=msg.watermark if msg.HasField("watermark") else None,
        images=msg.images,
        seed=msg.seed if msg.HasField("seed") else None,
        guidance_scale=msg.guidance_scale if msg.HasField("guidance_scale") else None,
        request_id=msg.request_id,
    )


def sequential_request(
    msg: pb.GenerateSequentialImagesRequest, defaults: Defaults
) -> GenerationRequest:
    """A validated domain request from GenerateSequentialImagesRequest."""
    return validate_request(
        defaults,
        prompt=msg.prompt,
        model=msg.model,
        size=msg.size,
        response_format=_response_format(msg.response_format),
        watermark=msg.watermark if msg.HasField("watermark") else None,
        images=msg.images,
        max_images=msg.max_images if msg.HasField("max_images") else None,
        sequential=True,
    )


def timestamp(value: datetime) -> Timestamp:
    """A protobuf Timestamp for a timezone-aware datetime.

    Exact to the microsecond, from timedelta arithmetic: four times faster
    than `Timestamp.FromDatetime` (pure Python), and it runs on every response.
    """
    since = value - _EPOCH
    return Timestamp(seconds=since.days * 86400 + since.seconds, nanos=since.microseconds * 1000)


def error(value: ImageError) -> pb.Error:
    """The Error message for a domain error."""
    return pb.Error(code=value.code, message=value.message)


def image(value: GeneratedImage) -> pb.Image:
    """The Image message for one generated image or its failure."""
    if value.error is not None:
        return pb.Image(index=value.index, error=error(value.error))
    return pb.Image(
        url=value.url,
        data=value.data,
        size=value.size,
        content_type=value.content_type,
        index=value.index,
    )


def generate_response(result: GenerationResult) -> pb.GenerateImageResponse:
    """The GenerateImageResponse for a result."""
    return pb.GenerateImageResponse(
        images=[image(i) for i in result.images],
        usage=pb.Usage(
            generated_images=result.usage.generated_images,
            output_tokens=result.usage.output_tokens,
        ),
        model=result.model,
        created_at=timestamp(result.created_at),
    )


def task_status(value: TaskStatus) -> pb.TaskStatus.ValueType:
    """The proto enum value for a task status."""
    return _STATUSES[value]


def task_response(task: Task) -> pb.GetImageTaskResponse:
    """The GetImageTaskResponse for a task."""
    msg = pb.GetImageTaskResponse(
        task_id=task.id,
        status=task_status(task.status),
        created_at=timestamp(task.created_at),
        updated_at=timestamp(task.updated_at),
        request_id=task.request.request_id,
    )
    if task.result is not None:
        msg.result.CopyFrom(generate_response(task.result))
    if task.error is not None:
        msg.error.CopyFrom(error(task.error))
    if task.finished_at is not None:
        msg.finished_at.CopyFrom(timestamp(task.finished_at))
    return msg
