"""Conversion between image.v1 protobuf messages and the domain types."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import TYPE_CHECKING

from google.protobuf.timestamp_pb2 import Timestamp

from sia.access.base import MICROS
from sia.api.image.v1 import image_service_pb2 as pb
from sia.domain import GenerationRequest, GenerationResult, ResponseFormat, TaskStatus
from sia.errors import InvalidArgument
from sia.validation import validate_page, validate_request

if TYPE_CHECKING:
    from sia.access.base import UsageEntry
    from sia.domain import GeneratedImage, ImageError, Task
    from sia.validation import Defaults

#: Most days one GetUsage call may sum.
MAX_USAGE_DAYS = 366

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


def asynchronous_only(msg: pb.GenerateImageRequest | pb.GenerateSequentialImagesRequest) -> None:
    """Refuse the webhook fields on a call that answers at once: they mean a task."""
    for name in ("webhook_url", "webhook_each_image"):
        if getattr(msg, name, None):
            raise InvalidArgument.field(
                name, "only for GenerateImageAsync and GenerateSequentialImagesAsync"
            )


def generate_request(msg: pb.GenerateImageRequest, defaults: Defaults) -> GenerationRequest:
    """A validated domain request from GenerateImageRequest."""
    return _validated(
        msg,
        defaults,
        seed=msg.seed if msg.HasField("seed") else None,
        guidance_scale=msg.guidance_scale if msg.HasField("guidance_scale") else None,
        request_id=msg.request_id,
        webhook_url=msg.webhook_url,
    )


def sequential_request(
    msg: pb.GenerateSequentialImagesRequest, defaults: Defaults
) -> GenerationRequest:
    """A validated domain request from GenerateSequentialImagesRequest."""
    return _validated(
        msg,
        defaults,
        max_images=msg.max_images if msg.HasField("max_images") else None,
        sequential=True,
        request_id=msg.request_id,
        webhook_url=msg.webhook_url,
        webhook_images=msg.webhook_each_image,
    )


def _validated(
    msg: pb.GenerateImageRequest | pb.GenerateSequentialImagesRequest,
    defaults: Defaults,
    *,
    seed: int | None = None,
    guidance_scale: float | None = None,
    request_id: str = "",
    max_images: int | None = None,
    sequential: bool = False,
    webhook_url: str = "",
    webhook_images: bool = False,
) -> GenerationRequest:
    """validate_request on the fields both requests share, plus each one's own."""
    return validate_request(
        defaults,
        prompt=msg.prompt,
        model=msg.model,
        size=msg.size,
        response_format=_response_format(msg.response_format),
        watermark=msg.watermark if msg.HasField("watermark") else None,
        images=msg.images,
        seed=seed,
        guidance_scale=guidance_scale,
        max_images=max_images,
        sequential=sequential,
        request_id=request_id,
        webhook_url=webhook_url,
        webhook_images=webhook_images,
    )


def timestamp(value: datetime) -> Timestamp:
    """A protobuf Timestamp for a timezone-aware datetime (see `set_timestamp`)."""
    msg = Timestamp()
    set_timestamp(msg, value)
    return msg


def set_timestamp(msg: Timestamp, value: datetime) -> None:
    """Set `msg` to a timezone-aware datetime.

    Exact to the microsecond, from timedelta arithmetic: four times faster
    than `Timestamp.FromDatetime` (pure Python), and it runs on every response.
    """
    since = value - _EPOCH
    msg.seconds = since.days * 86400 + since.seconds
    msg.nanos = since.microseconds * 1000


def error(value: ImageError) -> pb.Error:
    """The Error message for a domain error."""
    return pb.Error(code=value.code, message=value.message)


def generate_response(result: GenerationResult) -> pb.GenerateImageResponse:
    """The GenerateImageResponse for a result."""
    msg = pb.GenerateImageResponse()
    _fill_response(msg, result)
    return msg


def _fill_response(msg: pb.GenerateImageResponse, result: GenerationResult) -> None:
    # Filled in place: half the cost of building each part and copying it in.
    msg.model = result.model
    for value in result.images:
        if value.error is not None:
            msg.images.add(index=value.index, error=error(value.error))
        else:
            msg.images.add(
                url=value.url,
                data=value.data,
                size=value.size,
                content_type=value.content_type,
                index=value.index,
            )
    msg.usage.generated_images = result.usage.generated_images
    msg.usage.output_tokens = result.usage.output_tokens
    set_timestamp(msg.created_at, result.created_at)


_STATUS_OF = {value: status for status, value in _STATUSES.items()}


def list_query(msg: pb.ListImageTasksRequest) -> tuple[TaskStatus | None, int, str]:
    """The status filter, page size and page token of a ListImageTasksRequest."""
    status = None
    if msg.status != pb.TASK_STATUS_UNSPECIFIED:
        status = _STATUS_OF.get(msg.status)
        if status is None:
            raise InvalidArgument.field("status", f"unknown value {msg.status}")
    return status, validate_page(msg.page_size or None, msg.page_token), msg.page_token


def list_response(tasks: list[Task], cursor: str) -> pb.ListImageTasksResponse:
    """The ListImageTasksResponse for one page."""
    return pb.ListImageTasksResponse(
        tasks=[task_response(task) for task in tasks], next_page_token=cursor
    )


def usage_period(msg: pb.GetUsageRequest, today: date) -> tuple[date, date]:
    """The first and last day a GetUsageRequest asks for."""
    if msg.start_date:
        first = _date("start_date", msg.start_date)
        last = _date("end_date", msg.end_date) if msg.end_date else today
        if last < first:
            raise InvalidArgument.field("end_date", "is before start_date")
        if (last - first).days >= MAX_USAGE_DAYS:
            raise InvalidArgument.field(
                "start_date", f"at most {MAX_USAGE_DAYS} days before end_date"
            )
        return first, last
    if msg.end_date:
        raise InvalidArgument.field("start_date", "required when end_date is set")
    if msg.period == pb.USAGE_PERIOD_MONTH:
        return today.replace(day=1), today
    if msg.period not in (pb.USAGE_PERIOD_UNSPECIFIED, pb.USAGE_PERIOD_TODAY):
        raise InvalidArgument.field("period", f"unknown value {msg.period}")
    return today, today


def _date(field: str, value: str) -> date:
    try:
        if len(value) != len("YYYY-MM-DD"):  # fromisoformat also takes "20261201"
            raise ValueError
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidArgument.field(field, "must be a date, YYYY-MM-DD") from None


def usage_response(
    key: str, first: date, last: date, rows: list[UsageEntry], currency: str
) -> pb.GetUsageResponse:
    """The GetUsageResponse for a key's usage per model."""
    msg = pb.GetUsageResponse(
        key=key, start_date=first.isoformat(), end_date=last.isoformat(), currency=currency
    )
    total = msg.total
    for row in rows:
        cost = row.cost_micros / MICROS
        msg.models.add(
            model=row.model,
            requests=row.requests,
            images=row.images,
            output_tokens=row.output_tokens,
            cost=cost,
        )
        total.requests += row.requests
        total.images += row.images
        total.output_tokens += row.output_tokens
        total.cost += cost
    return msg


def image(value: GeneratedImage) -> pb.Image:
    """The Image message of one image (or its per-image error)."""
    if value.error is not None:
        return pb.Image(index=value.index, error=error(value.error))
    return pb.Image(
        url=value.url,
        data=value.data,
        size=value.size,
        content_type=value.content_type,
        index=value.index,
    )


def stream_event(event: GeneratedImage | GenerationResult) -> pb.StreamSequentialImagesResponse:
    """The StreamSequentialImagesResponse of an image, or of the finished result."""
    if isinstance(event, GenerationResult):
        done = pb.StreamCompleted(
            model=event.model,
            usage=pb.Usage(
                generated_images=event.usage.generated_images,
                output_tokens=event.usage.output_tokens,
            ),
        )
        set_timestamp(done.created_at, event.created_at)
        return pb.StreamSequentialImagesResponse(completed=done)
    return pb.StreamSequentialImagesResponse(image=image(event))


def task_status(value: TaskStatus) -> pb.TaskStatus.ValueType:
    """The proto enum value for a task status."""
    return _STATUSES[value]


def task_response(task: Task) -> pb.GetImageTaskResponse:
    """The GetImageTaskResponse for a task."""
    msg = pb.GetImageTaskResponse(
        task_id=task.id, status=task_status(task.status), request_id=task.request.request_id
    )
    set_timestamp(msg.created_at, task.created_at)
    set_timestamp(msg.updated_at, task.updated_at)
    if task.result is not None:
        _fill_response(msg.result, task.result)
    if task.error is not None:
        msg.error.CopyFrom(error(task.error))
    if task.finished_at is not None:
        set_timestamp(msg.finished_at, task.finished_at)
    return msg
