"""Task backends and helpers shared by the backend tests."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import pytest
from redis import asyncio as aioredis

from sia.domain import GeneratedImage, GenerationRequest, GenerationResult, Task, TaskStatus, Usage
from sia.tasks.base import Runner, TaskBackend
from tests.waiting import within

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

#: Builds a backend on the test's own store; called again, it reopens the same store.
Make = Callable[..., TaskBackend]


def make_request(prompt: str = "a red fox", request_id: str = "") -> GenerationRequest:
    """A small valid request."""
    return GenerationRequest(prompt=prompt, model="m-1", size="1024x1024", request_id=request_id)


def make_result(task: Task) -> GenerationResult:
    """A stored-form result: the image lives in the blob store."""
    return GenerationResult(
        model=task.request.model,
        images=(GeneratedImage(index=0, blob_key="k.jpeg", content_type="image/jpeg"),),
        usage=Usage(generated_images=1),
    )


async def quick(task: Task) -> GenerationResult:
    """A runner that succeeds at once."""
    return make_result(task)


class GatedRunner:
    """A runner that blocks each task until `release` is set, recording what happens."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.calls: list[str] = []
        self.cancelled: list[str] = []
        self.any_cancelled = asyncio.Event()

    async def wait_started(self) -> None:
        """Return once a task has reached the runner; fail the test if none does."""
        await within(self.started.wait(), "no task reached the runner")

    async def __call__(self, task: Task) -> GenerationResult:
        self.calls.append(task.id)
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append(task.id)
            self.any_cancelled.set()
            raise
        return make_result(task)


async def wait_status(
    backend: TaskBackend, task_id: str, status: TaskStatus, timeout: float = 15
) -> Task:
    """Poll until the task reaches `status`; fail the test if it has not within `timeout` s."""
    task = await backend.get(task_id)

    async def poll() -> None:
        nonlocal task
        while task.status is not status:
            await asyncio.sleep(0.01)
            task = await backend.get(task_id)

    await within(poll(), f"task {task_id} is not {status.value} after {timeout} s", timeout)
    return task


async def started(make: Make, runner: Runner, **kwargs: int) -> TaskBackend:
    """A backend from `make`, started with `runner`."""
    backend = make(**kwargs)
    await backend.start(runner)
    return backend


async def require_redis() -> None:
    """Skip when Redis is unreachable, or fail under CI=true."""
    client = aioredis.from_url(REDIS_URL)
    try:
        await client.ping()  # type: ignore[misc]
    except Exception as exc:
        message = f"Redis at {REDIS_URL} is unreachable ({type(exc).__name__})"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI requires it")
        pytest.skip(message)
    finally:
        await client.aclose()


async def delete_queue_keys(queue: str) -> None:
    """Delete every key saq and the backend made for `queue`."""
    client = aioredis.from_url(REDIS_URL)
    try:
        for pattern in (f"saq:{queue}:*", f"saq:job:{queue}:*", "saq:abort:*", f"sia:{queue}:*"):
            keys = [key async for key in client.scan_iter(match=pattern, count=500)]
            if keys and pattern != "saq:abort:*":
                await client.delete(*keys)
    finally:
        await client.aclose()
