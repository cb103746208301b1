"""Task backends and helpers shared by the backend tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from sia.domain import GeneratedImage, GenerationRequest, GenerationResult, Task, TaskStatus, Usage
from sia.tasks.base import Runner, TaskBackend

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
    """Poll until the task reaches `status`."""
    task = await backend.get(task_id)
    async with asyncio.timeout(timeout):
        while task.status is not status:
            await asyncio.sleep(0.01)
            task = await backend.get(task_id)
    return task


async def started(make: Make, runner: Runner, **kwargs: int) -> TaskBackend:
    """A backend from `make`, started with `runner`."""
    backend = make(**kwargs)
    await backend.start(runner)
    return backend
