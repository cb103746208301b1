"""The service's plain data types: requests, results and tasks.

Nothing here knows about gRPC, HTTP or protobuf. The gRPC edge converts its
messages to these types and back; providers, task backends and blob stores
speak only these.
"""

from __future__ import annotations

import enum
import random
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime


class ResponseFormat(enum.StrEnum):
    """How generated images are handed back to the caller."""

    URL = "url"
    B64_JSON = "b64_json"


class TaskStatus(enum.StrEnum):
    """Where an async task is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """True once the task can no longer change."""
        return self in _TERMINAL


_TERMINAL = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED})


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A validated request for one image or a sequential group.

    `max_images` is None for a single image and the group's upper bound for a
    sequential request. `size` and `model` are always resolved (never empty).
    """

    prompt: str
    model: str
    size: str
    response_format: ResponseFormat = ResponseFormat.URL
    watermark: bool | None = None
    images: tuple[str, ...] = ()
    seed: int | None = None
    guidance_scale: float | None = None
    max_images: int | None = None
    request_id: str = ""
    webhook_url: str = ""  # async only: where task events are POSTed (validated, http(s))
    webhook_images: bool = False  # also an event per image of a group, not only at the end

    @property
    def sequential(self) -> bool:
        """True for a group request (GenerateSequentialImages)."""
        return self.max_images is not None


@dataclass(frozen=True, slots=True)
class ImageError:
    """Why one image, or a whole task, failed: a stable code and a message."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    """One image of a result: a URL, inline bytes, or an error.

    `blob_key` is set when the image lives in the service's blob store; the
    URL or bytes are then derived from it when the result is returned.
    """

    index: int
    url: str = ""
    data: bytes = b""
    size: str = ""
    content_type: str = ""
    blob_key: str = ""
    error: ImageError | None = None

    @property
    def ok(self) -> bool:
        """True when the image was generated."""
        return self.error is None


@dataclass(frozen=True, slots=True)
class Usage:
    """What a generation consumed, as the provider bills it."""

    generated_images: int = 0
    output_tokens: int = 0


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """The images a provider returned for one request."""

    model: str
    images: tuple[GeneratedImage, ...]
    usage: Usage
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True, slots=True)
class Task:
    """An async generation as stored by a task backend."""

    id: str
    request: GenerationRequest
    status: TaskStatus
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    result: GenerationResult | None = None
    error: ImageError | None = None
    attempts: int = 0
    owner: str = ""  # the name of the API key that submitted it ("" with access control off)


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


def new_request_id() -> str:
    """A fresh request id: 32 lower-case hex digits, like uuid4().hex.

    Request ids correlate log lines and upstream calls; they need to be
    unique, not unguessable, so they come from the process's PRNG (seeded
    from the OS) instead of a getrandom() system call per RPC.
    """
    return f"{random.getrandbits(128):032x}"


def new_task_id() -> str:
    """A fresh, unguessable task id: `task_` and 24 URL-safe characters."""
    return "task_" + secrets.token_urlsafe(18)


#: What a provider calls with each image of a group as it arrives (streams, task progress).
OnImage = Callable[[GeneratedImage], Awaitable[None]]
