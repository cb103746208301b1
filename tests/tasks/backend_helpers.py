"""Task backends and helpers shared by the backend tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from redis import asyncio as aioredis
from redis.exceptions import RedisError

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
