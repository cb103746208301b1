"""What the calls return: small frozen dataclasses made from the protobuf answers.

Each keeps the message it was made from as `raw` (left out of repr and equality), for
the rare field a client wants that these types do not carry.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from sia.api.image.v1 import image_service_pb2 as pb
from sia.client.errors import DownloadError

if TYPE_CHECKING:
    import os
    import ssl

    from google.protobuf.message import Message

__all__ = [
    "Completed",
    "Health",
    "Image",
    "ImageFailure",
    "ModelUsage",
    "Result",
    "StreamEvent",
    "Task",
    "TaskPage",
    "TaskStatus",
    "Usage",
    "UsageReport",
]


class TaskStatus(StrEnum):
    """Where an async task is in its life."""

    UNSPECIFIED = "unspecified"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def done(self) -> bool:
        """Whether the task has ended (it will not change again)."""
        return self in (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED)

    @classmethod
    def from_proto(cls, value: int) -> TaskStatus:
        name = pb.TaskStatus.Name(value).removeprefix("TASK_STATUS_")  # type: ignore[arg-type]
        return cls(name.lower())

    def to_proto(self) -> pb.TaskStatus.ValueType:
        return pb.TaskStatus.Value(f"TASK_STATUS_{self.name}")


@dataclass(frozen=True, slots=True)
class ImageFailure:
    """Why one image (or a task) has no result: a stable code and a message for people."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Image:
    """One generated image: its bytes (`data`) or a `url`, or the `error` it failed with."""

    index: int
    url: str = ""
    data: bytes = field(default=b"", repr=False)
    size: str = ""
    content_type: str = ""
    error: ImageFailure | None = None
    raw: pb.Image | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """Whether the image was generated."""
        return self.error is None

    def read(self, *, timeout: float = 60.0, context: ssl.SSLContext | None = None) -> bytes:
        """The image file's bytes: `data`, or else downloaded from `url` (over HTTPS with
        `context`, for example one trusting a private CA; else the system's CAs)."""
        if self.error is not None:
            raise DownloadError(
                f"image {self.index} failed: {self.error.code}: {self.error.message}"
            )
        if self.data:
            return self.data
        if urlsplit(self.url).scheme not in ("http", "https"):
            raise DownloadError(f"image {self.index} has neither data nor an http(s) URL")
        try:
            # The scheme is checked above: only http(s) URLs the server sent are opened.
            with urllib.request.urlopen(self.url, timeout=timeout, context=context) as answer:  # noqa: S310
                body: bytes = answer.read()
        except OSError as exc:  # URLError and HTTPError are OSErrors
            raise DownloadError(
                f"image {self.index}: could not download {self.url}: {exc}"
            ) from exc
        return body

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = 60.0,
        context: ssl.SSLContext | None = None,
    ) -> Path:
        """Write the image file to `path` and return it (`context` as for `read`)."""
        target = Path(path)
        target.write_bytes(self.read(timeout=timeout, context=context))
        return target

    @classmethod
    def from_proto(cls, message: pb.Image) -> Image:
        error = None
        if message.HasField("error"):
            error = ImageFailure(message.error.code, message.error.message)
        return cls(
            index=message.index,
            url=message.url,
            data=message.data,
            size=message.size,
            content_type=message.content_type,
            error=error,
            raw=message,
        )


@dataclass(frozen=True, slots=True)
class Usage:
    """What a generation consumed, as the provider bills it."""

    generated_images: int = 0
    output_tokens: int = 0

    @classmethod
    def from_proto(cls, message: pb.Usage) -> Usage:
        return cls(message.generated_images, message.output_tokens)


@dataclass(frozen=True, slots=True)
class Result:
    """A generation's images in order, what it consumed and the model that made them."""

    images: tuple[Image, ...]
    usage: Usage
    model: str
    created_at: datetime | None = None
    raw: pb.GenerateImageResponse | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_proto(cls, message: pb.GenerateImageResponse) -> Result:
        return cls(
            images=tuple(Image.from_proto(image) for image in message.images),
            usage=Usage.from_proto(message.usage),
            model=message.model,
            created_at=_time(message, "created_at"),
            raw=message,
        )


@dataclass(frozen=True, slots=True)
class Completed:
    """The last event of a streamed group: what it consumed and the model."""

    usage: Usage
    model: str
    created_at: datetime | None = None

    @classmethod
    def from_proto(cls, message: pb.StreamCompleted) -> Completed:
        return cls(Usage.from_proto(message.usage), message.model, _time(message, "created_at"))


#: One message of stream_group: an image (or its per-image error), or the end.
StreamEvent = Image | Completed


def stream_event(message: pb.StreamSequentialImagesResponse) -> StreamEvent:
    if message.WhichOneof("event") == "completed":
        return Completed.from_proto(message.completed)
    return Image.from_proto(message.image)


@dataclass(frozen=True, slots=True)
class Task:
    """An async task's state; `result` and `images` fill in as it runs and ends."""

    id: str
    status: TaskStatus
    result: Result | None = None
    error: ImageFailure | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    finished_at: datetime | None = None
    request_id: str = ""
    raw: Message | None = field(default=None, repr=False, compare=False)

    @property
    def images(self) -> tuple[Image, ...]:
        """The images so far (a running group shows those finished)."""
        return self.result.images if self.result is not None else ()

    @property
    def done(self) -> bool:
        """Whether the task has ended."""
        return self.status.done

    @classmethod
    def from_proto(cls, message: pb.GetImageTaskResponse) -> Task:
        error = None
        if message.HasField("error"):
            error = ImageFailure(message.error.code, message.error.message)
        return cls(
            id=message.task_id,
            status=TaskStatus.from_proto(message.status),
            result=Result.from_proto(message.result) if message.HasField("result") else None,
            error=error,
            created_at=_time(message, "created_at"),
            updated_at=_time(message, "updated_at"),
            finished_at=_time(message, "finished_at"),
            request_id=message.request_id,
            raw=message,
        )

    @classmethod
    def from_submit(cls, message: pb.GenerateImageAsyncResponse) -> Task:
        status = TaskStatus.from_proto(message.status)
        return cls(message.task_id, status, created_at=_time(message, "created_at"), raw=message)

    @classmethod
    def from_cancel(cls, message: pb.CancelImageTaskResponse) -> Task:
        return cls(message.task_id, TaskStatus.from_proto(message.status), raw=message)


@dataclass(frozen=True, slots=True)
class TaskPage:
    """One page of the caller's tasks, newest first; pass `next_page_token` for the next."""

    tasks: tuple[Task, ...]
    next_page_token: str = ""

    @classmethod
    def from_proto(cls, message: pb.ListImageTasksResponse) -> TaskPage:
        return cls(tuple(Task.from_proto(t) for t in message.tasks), message.next_page_token)


@dataclass(frozen=True, slots=True)
class ModelUsage:
    """What one model (or the total, model "") was used for in the period."""

    model: str
    requests: int
    images: int
    output_tokens: int
    cost: float

    @classmethod
    def from_proto(cls, message: pb.ModelUsage) -> ModelUsage:
        return cls(
            message.model, message.requests, message.images, message.output_tokens, message.cost
        )


@dataclass(frozen=True, slots=True)
class UsageReport:
    """The caller's usage over a period of days (UTC), per model and in total."""

    key: str
    start_date: str
    end_date: str
    models: tuple[ModelUsage, ...]
    total: ModelUsage
    currency: str
    raw: pb.GetUsageResponse | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_proto(cls, message: pb.GetUsageResponse) -> UsageReport:
        return cls(
            key=message.key,
            start_date=message.start_date,
            end_date=message.end_date,
            models=tuple(ModelUsage.from_proto(m) for m in message.models),
            total=ModelUsage.from_proto(message.total),
            currency=message.currency,
            raw=message,
        )


@dataclass(frozen=True, slots=True)
class Health:
    """Whether the service can take work, and what it is."""

    serving: bool
    service: str
    version: str
    provider: str
    timestamp: datetime | None = None

    @classmethod
    def from_proto(cls, message: pb.HealthCheckResponse) -> Health:
        return cls(
            serving=message.status == pb.SERVING_STATUS_SERVING,
            service=message.service,
            version=message.version,
            provider=message.provider,
            timestamp=_time(message, "timestamp"),
        )


def _time(message: Message, name: str) -> datetime | None:
    if not message.HasField(name):
        return None
    stamp = getattr(message, name)
    moment: datetime = stamp.ToDatetime(tzinfo=UTC)
    return moment
