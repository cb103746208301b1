"""Task backends and helpers shared by the backend tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from redis import asyncio as aioredis
from redis.exceptions import RedisError

from sia.domain import GeneratedImage, GenerationRequest, GenerationResult, Task, TaskStatus, Usage
from sia.tasks.base import Runner, TaskBackend, TaskWatch
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


def images_result(task: Task, count: int) -> GenerationResult:
    """A stored-form result of a group's first `count` images (each in the blob store)."""
    return GenerationResult(
        model=task.request.model,
        images=tuple(
            GeneratedImage(index=i, blob_key=f"{task.id}-{i}.jpeg", content_type="image/jpeg")
            for i in range(count)
        ),
        usage=Usage(generated_images=count),
        created_at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
    )


class ProgressRunner:
    """A group's runner, moved on by the test: each `step()` lets it report one more image
    through `backend.progress`; the step after the last returns the result of `images + 1`."""

    def __init__(self, images: int = 2) -> None:
        self.backend: TaskBackend | None = None  # set once the backend is made
        self.images = images
        self.started = asyncio.Event()
        self.calls: list[str] = []
        self._steps: asyncio.Queue[asyncio.Event] = asyncio.Queue()

    async def wait_started(self) -> None:
        """Return once a task has reached the runner; fail the test if none does."""
        await within(self.started.wait(), "no task reached the runner")

    async def step(self) -> None:
        """Let the running task report its next image (or end); return once it has."""
        done = asyncio.Event()
        await self._steps.put(done)
        await within(done.wait(), "the runner did not take its step")

    async def __call__(self, task: Task) -> GenerationResult:
        assert self.backend is not None, "set ProgressRunner.backend before starting it"
        self.calls.append(task.id)
        self.started.set()
        for count in range(1, self.images + 1):
            done = await self._steps.get()
            await self.backend.progress(task.id, images_result(task, count), attempt=task.attempts)
            done.set()
        (await self._steps.get()).set()
        return images_result(task, self.images + 1)


async def watch_until(
    watch: TaskWatch,
    backend: TaskBackend,
    task_id: str,
    check: Callable[[Task], bool],
    what: str,
    timeout: float = 10,
) -> Task:
    """Wait on `watch` and re-read the task after each change, until `check` holds for it;
    fail the test if no change shows it within `timeout` s. The task is read only after a
    change: a missed notification fails, it is not polled over."""

    async def follow() -> Task:
        while True:
            await watch.changed()
            task = await backend.get(task_id)
            if check(task):
                return task

    return await within(follow(), f"no change of {task_id} showed {what}", timeout)


async def stays_unchanged(watch: TaskWatch, seconds: float = 0.3) -> bool:
    """True when `watch.changed()` has not returned within `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            await watch.changed()
    except TimeoutError:
        return True
    return False


def open_watches(backend: TaskBackend) -> int:
    """How many watches of `backend` are open (its registry, a private part)."""
    return len(backend._watchers)  # type: ignore[attr-defined]


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


class OwnRedis:
    """A `redis-server` of one test's own, on a free port in `directory`, that it may kill."""

    def __init__(self, directory: Path, *, appendonly: bool = True, save: str = "") -> None:
        self.directory = directory
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._args = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(directory), "--appendonly", "yes" if appendonly else "no",
            "--save", save,
        ]  # fmt: skip
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start the server (again, on the same port and files) and wait until it answers."""
        self.proc = await asyncio.create_subprocess_exec(
            *self._args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        client = aioredis.from_url(self.url)

        async def answers() -> None:
            while True:
                try:
                    await client.ping()  # type: ignore[misc]
                    return
                except (RedisError, OSError):
                    await asyncio.sleep(0.05)

        try:
            await within(answers(), f"redis-server on port {self.port} did not start")
        finally:
            await client.aclose()

    async def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def own_redis(directory: Path, **options: Any) -> AsyncIterator[OwnRedis]:
    """A started `OwnRedis`, killed afterwards; skips (fails under CI) without redis-server."""
    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not installed; CI requires it")
        pytest.skip("redis-server is not installed")
    os.makedirs(directory, exist_ok=True)
    server = OwnRedis(directory, **options)
    await server.start()
    try:
        yield server
    finally:
        await server.kill()
