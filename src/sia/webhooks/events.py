"""The events SIA POSTs to a task's webhook: their types and their JSON bodies.

    {"type": "task.succeeded", "timestamp": "2025-03-01T12:00:00.000000Z",
     "data": {"task_id": "task_...", "status": "succeeded", "request_id": "...",
              "model": "...", "created_at": "...", "finished_at": "...",
              "images": [{"index": 0, "url": "https://...", "size": "2048x2048",
                          "content_type": "image/jpeg", "error": null}],
              "error": null}}

`task.failed` and `task.cancelled` carry the task's `error` ({code, message})
and whatever images it holds; `task.image` (per image of a group, when the
caller asked with webhook_each_image) adds `image`, the one just produced.
An event's id (`msg_...`, derived from the task, the type and the image's
index) becomes the `webhook-id` header, the same on every retry, so a
receiver can drop the duplicates that at-least-once delivery allows.
Images are never inlined: a task that asked for b64_json has empty URLs
here, and its images are read with GetImageTask.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import UTC
from typing import TYPE_CHECKING, Any, Final

import orjson

from sia.domain import GeneratedImage, ImageError, Task, TaskStatus, utcnow

if TYPE_CHECKING:
    from datetime import datetime

TASK_SUCCEEDED: Final = "task.succeeded"
TASK_FAILED: Final = "task.failed"
TASK_CANCELLED: Final = "task.cancelled"
TASK_IMAGE: Final = "task.image"
#: Every event type, in the order a task may send them.
EVENT_TYPES = (TASK_IMAGE, TASK_SUCCEEDED, TASK_FAILED, TASK_CANCELLED)

_FINAL_KINDS = {
    TaskStatus.SUCCEEDED: TASK_SUCCEEDED,
    TaskStatus.FAILED: TASK_FAILED,
    TaskStatus.CANCELLED: TASK_CANCELLED,
}


@dataclass(frozen=True, slots=True)
class Event:
    """One event for one task: `payload` is the exact body that is signed and sent."""

    id: str
    type: str
    task_id: str
    payload: bytes


def event_id(task_id: str, kind: str, image_index: int | None = None) -> str:
    """The webhook-id of one event of one task: `msg_` and 24 URL-safe characters.

    Derived from what the event is, not drawn at random: a runner that enqueues
    the same event twice (a task re-run after a crash between its final write
    and the enqueue) stores it once, or, if the first was already delivered,
    sends it under the same id, which the receiver drops as a duplicate.
    """
    name = f"{task_id}\n{kind}\n{'' if image_index is None else image_index}"
    digest = hashlib.sha256(name.encode()).digest()[:18]
    return "msg_" + base64.urlsafe_b64encode(digest).decode()


def final_kind(task: Task) -> str:
    """The event type a finished task sends; ValueError while it is still queued or running."""
    try:
        return _FINAL_KINDS[task.status]
    except KeyError:
        raise ValueError(f"task {task.id} has not finished ({task.status.value})") from None


def task_event(task: Task, kind: str, *, image: GeneratedImage | None = None) -> Event:
    """The event of type `kind` for `task`; `image` is the image a `task.image` event reports.

    The task's images should carry their links (the form GetImageTask returns):
    an image known only by its blob key is sent with an empty URL.
    """
    if kind not in EVENT_TYPES:
        raise ValueError(f"unknown webhook event type {kind!r}; one of {', '.join(EVENT_TYPES)}")
    if (kind == TASK_IMAGE) != (image is not None):
        raise ValueError("an image is given with, and only with, a task.image event")
    result = task.result
    data: dict[str, Any] = {
        "task_id": task.id,
        "status": task.status.value,
        "request_id": task.request.request_id,
        "model": result.model if result is not None else task.request.model,
        "created_at": _iso(task.created_at),
        "finished_at": None if task.finished_at is None else _iso(task.finished_at),
        "images": [] if result is None else [_image(each) for each in result.images],
        "error": _error(task.error),
    }
    if image is not None:
        data["image"] = _image(image)
    body = {"type": kind, "timestamp": _iso(utcnow()), "data": data}
    index = None if image is None else image.index
    return Event(
        id=event_id(task.id, kind, index), type=kind, task_id=task.id, payload=orjson.dumps(body)
    )


def _image(image: GeneratedImage) -> dict[str, Any]:
    return {
        "index": image.index,
        "url": image.url,
        "size": image.size,
        "content_type": image.content_type,
        "error": _error(image.error),
    }


def _error(error: ImageError | None) -> dict[str, str] | None:
    return None if error is None else {"code": error.code, "message": error.message}


def _iso(moment: datetime) -> str:
    """ISO 8601 in UTC with microseconds and a Z, as Standard Webhooks' examples write it."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
