"""The JSON bodies of webhook events."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from sia.domain import GeneratedImage, ImageError, TaskStatus
from sia.webhooks.events import (
    TASK_CANCELLED,
    TASK_FAILED,
    TASK_IMAGE,
    TASK_SUCCEEDED,
    final_kind,
    task_event,
)
from tests.webhooks.helpers import make_task


def test_succeeded_event_holds_the_task_and_its_images() -> None:
    """task.succeeded: the ids, the status, the model and every image's link."""
    task = make_task("https://hooks.example/in", images=2)
    event = task_event(task, TASK_SUCCEEDED)
    body = json.loads(event.payload)
    assert event.id.startswith("msg_")
    assert "." not in event.id
    assert (event.type, event.task_id) == (TASK_SUCCEEDED, task.id)
    assert body["type"] == TASK_SUCCEEDED
    assert body["timestamp"].endswith("Z")
    datetime.fromisoformat(body["timestamp"])
    data = body["data"]
    assert data["task_id"] == task.id
    assert data["status"] == "succeeded"
    assert data["request_id"] == "req-1"
    assert data["model"] == "m-1"
    assert data["error"] is None
    assert data["finished_at"].endswith("Z")
    assert data["images"] == [
        {
            "index": i,
            "url": f"https://img.example/{i}.jpeg",
            "size": "1024x1024",
            "content_type": "image/jpeg",
            "error": None,
        }
        for i in range(2)
    ]
    assert "image" not in data


def test_failed_event_holds_the_error() -> None:
    """task.failed: the task's error code and message, and no images."""
    error = ImageError("UPSTREAM_REJECTED", "the prompt was refused")
    task = make_task("https://hooks.example/in", TaskStatus.FAILED, error=error)
    data = json.loads(task_event(task, final_kind(task)).payload)["data"]
    assert data["status"] == "failed"
    assert data["error"] == {"code": "UPSTREAM_REJECTED", "message": "the prompt was refused"}
    assert data["images"] == []


def test_image_event_adds_the_image() -> None:
    """task.image: the image just produced, an image's own error included."""
    task = make_task("https://hooks.example/in", TaskStatus.RUNNING, each_image=True)
    image = GeneratedImage(index=3, error=ImageError("CONTENT_FILTERED", "refused"))
    data = json.loads(task_event(task, TASK_IMAGE, image=image).payload)["data"]
    assert data["status"] == "running"
    assert data["image"] == {
        "index": 3,
        "url": "",
        "size": "",
        "content_type": "",
        "error": {"code": "CONTENT_FILTERED", "message": "refused"},
    }


def test_an_event_has_one_id_however_often_it_is_made() -> None:
    """The id follows the task, the type and the image: the same event made twice (a task
    re-run) keeps its id, so the store and the receiver see one event."""
    task, other = make_task("https://hooks.example/in"), make_task("https://hooks.example/in")
    first, second = task_event(task, TASK_SUCCEEDED), task_event(task, TASK_SUCCEEDED)
    assert first.id == second.id
    ids = {
        first.id,
        task_event(other, TASK_SUCCEEDED).id,
        task_event(task, TASK_IMAGE, image=GeneratedImage(index=0)).id,
        task_event(task, TASK_IMAGE, image=GeneratedImage(index=1)).id,
    }
    assert len(ids) == 4
    assert all(len(each) == len("msg_") + 24 for each in ids)


def test_final_kind_follows_the_status() -> None:
    """The end event's type is the task's final status; an unfinished task has none."""
    url = "https://hooks.example/in"
    assert final_kind(make_task(url)) == TASK_SUCCEEDED
    assert final_kind(make_task(url, TaskStatus.FAILED)) == TASK_FAILED
    assert final_kind(make_task(url, TaskStatus.CANCELLED)) == TASK_CANCELLED
    with pytest.raises(ValueError, match="has not finished"):
        final_kind(make_task(url, TaskStatus.RUNNING))


def test_bad_kinds_are_refused() -> None:
    """An unknown type, or an image without task.image (or the reverse), is a bug."""
    task = make_task("https://hooks.example/in")
    with pytest.raises(ValueError, match="unknown webhook event type"):
        task_event(task, "task.exploded")
    with pytest.raises(ValueError, match="only with"):
        task_event(task, TASK_IMAGE)
    with pytest.raises(ValueError, match="only with"):
        task_event(task, TASK_SUCCEEDED, image=GeneratedImage(index=0))
