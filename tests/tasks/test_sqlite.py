"""The SQLite task backend, on real database files under tmp_path."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest
import structlog
from structlog.testing import capture_logs

from sia.domain import (
    GeneratedImage,
    GenerationRequest,
    GenerationResult,
    ImageError,
    ResponseFormat,
    Task,
    TaskStatus,
    Usage,
    utcnow,
)
from sia.errors import (
    QueueFull,
    ShuttingDown,
    TaskNotCancellable,
    TaskNotFound,
    Unavailable,
)
from sia.tasks.sqlite import SqliteTaskBackend

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from sia.tasks.base import Runner


def make_request(prompt: str = "a red fox", request_id: str = "") -> GenerationRequest:
    return GenerationRequest(prompt=prompt, model="m-1", size="1024x1024", request_id=request_id)


def make_result(task: Task) -> GenerationResult:
    return GenerationResult(
        model=task.request.model,
        images=(GeneratedImage(index=0, blob_key="k.jpeg", content_type="image/jpeg"),),
        usage=Usage(generated_images=1),
    )


async def quick(task: Task) -> GenerationResult:
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


async def wait_status(backend: SqliteTaskBackend, task_id: str, status: TaskStatus) -> Task:
    for _ in range(1000):
        task = await backend.get(task_id)
        if task.status is status:
            return task
        await asyncio.sleep(0.01)
    raise AssertionError(f"{task_id} is still {task.status}, not {status}")


@pytest.fixture
async def backends(tmp_path: Path) -> AsyncIterator[Callable[..., SqliteTaskBackend]]:
    made: list[SqliteTaskBackend] = []

    def make(**kwargs: int) -> SqliteTaskBackend:
        backend = SqliteTaskBackend(tmp_path / "db" / "tasks.sqlite3", **kwargs)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.aclose()


async def started(
    backends: Callable[..., SqliteTaskBackend], runner: Runner, **kwargs: int
) -> SqliteTaskBackend:
    backend = backends(**kwargs)
    await backend.start(runner)
    return backend


async def test_submit_runs_task_and_round_trips_everything(
    backends: Callable[..., SqliteTaskBackend],
) -> None:
    """A submitted task is QUEUED, then SUCCEEDED with its request and result intact."""
    request = GenerationRequest(
        prompt="a lighthouse",
        model="seedream-4",
        size="2048x2048",
        response_format=ResponseFormat.B64_JSON,
        watermark=False,
        images=("https://example.test/a.png", "data:image/png;base64,AAAA"),
        seed=42,
        guidance_scale=2.5,
        max_images=3,
        request_id="req-1",
    )
    result = GenerationResult(
        model="seedream-4",
        images=(
            GeneratedImage(index=0, url="https://cdn.test/0", size="2048x2048"),
            GeneratedImage(index=1, blob_key="abc.png", content_type="image/png", size="1x1"),
            GeneratedImage(index=2, error=ImageError("CONTENT_FILTERED", "blocked")),
        ),
        usage=Usage(generated_images=2, output_tokens=8192),
        created_at=datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
    )
    seen: list[dict[str, object]] = []

    async def runner(task: Task) -> GenerationResult:
        seen.append(structlog.contextvars.get_contextvars())
        return result

    backend = await started(backends, runner)
    task = await backend.submit(request)
    assert task.status is TaskStatus.QUEUED
    assert task.request == request
    assert task.created_at.tzinfo is not None
    assert task.attempts == 0

    done = await wait_status(backend, task.id, TaskStatus.SUCCEEDED)
    assert done.result == result
    assert done.request == request
    assert done.error is None
    assert done.attempts == 1
    assert done.created_at == task.created_at
    assert done.finished_at is not None
    assert done.finished_at.utcoffset() == timedelta(0)
    assert done.finished_at >= done.created_at
    assert seen == [{"task_id": task.id}]


async def test_runner_sia_error_fails_task_with_its_code(
    backends: Callable[..., SqliteTaskBackend],
) -> None:
    """A runner raising a SiaError leaves the task FAILED with that reason and message."""

    async def runner(task: Task) -> GenerationResult:
        raise Unavailable("upstream is down")

    backend = await started(backends, runner)
    task = await backend.submit(make_request())
    failed = await wait_status(backend, task.id, TaskStatus.FAILED)
    assert failed.error == ImageError("UNAVAILABLE", "upstream is down")
    assert failed.result is None
    assert failed.finished_at is not None


async def test_unexpected_exception_fails_task_as_internal_and_logs(
    backends: Callable[..., SqliteTaskBackend],
) -> None:
    """Any other exception becomes FAILED INTERNAL, with the traceback logged."""

    async def runner(task: Task) -> GenerationResult:
        raise ZeroDivisionError("boom")

    backend = await started(backends, runner)
    with capture_logs() as logs:
        task = await backend.submit(make_request())
        failed = await wait_status(backend, task.id, TaskStatus.FAILED)
    assert failed.error == ImageError("INTERNAL", "internal error")
    [entry] = [e for e in logs if e["event"] == "task_failed"]
    assert isinstance(entry["exc_info"], ZeroDivisionError)


async def test_result_with_image_bytes_is_refused(
    backends: Callable[..., SqliteTaskBackend],
) -> None:
    """A result that still carries image bytes is never stored; the task fails INTERNAL."""

    async def runner(task: Task) -> GenerationResult:
        return GenerationResult("m-1", (GeneratedImage(index=0, data=b"\xff\xd8"),), Usage())

    backend = await started(backends, runner)
    with capture_logs():
        task = await backend.submit(make_request())
        failed = await wait_status(backend, task.id, TaskStatus.FAILED)
    assert failed.error == ImageError("INTERNAL", "internal error")


async def test_same_request_id_returns_the_same_task(
    backends: Callable[..., SqliteTaskBackend],
) -> None:
    """Submitting a request_id again returns the existing task, even after it finished."""
    backend = await started(backends, quick)
    first = await backend.submit(make_request(request_id="r-1"))
    again = await backend.submit(make_request(prompt="different", request_id="r-1"))
    assert again.id == first.id
    await wait_status(backend, first.id, TaskStatus.SUCCEEDED)
    after = await backend.submit(make_request(request_id="r-1"))
    assert after.id == first.id
    assert after.status is TaskStatus.SUCCEEDED
    other = await backend.submit(make_request())
    assert other.id != first.id
    assert sum((await backend.counts()).values()) == 2


async def test_concurrent_submits_with_one_request_id_make_one_task(
    backends: Callable[..., SqliteTaskBackend],
) -> None:
    """Concurrent submits sharing a request_id all get the same single task."""
    runner = GatedRunner()
    backend = await started(backends, runner)
    tasks = await asyncio.gather(
        *(backend.submit(make_request(request_id="dup")) for _ in range(20))
    )
    assert len({task.id for task in tasks}) == 1
    assert sum((await backend.counts()).values()) == 1


async def test_queue_full_raises(backends: Callable[..., SqliteTaskBackend]) -> None:
    """Once queued plus running tasks reach queue_limit, submit raises QueueFull."""
    runner = GatedRunner()
    backend = await started(backends, runner, workers=1, queue_limit=2)
    first = await backend.submit(make_request(request_id="a"))
    await backend.submit(make_request())
    await runner.started.wait()
    with pytest.raises(QueueFull) as caught:
        await backend.submit(make_request())
    assert caught.value.metadata == {"limit": "2"}
    assert (await backend.submit(make_request(request_id="a"))).id == first.id
    runner.release.set()
    await wait_status(backend, first.id, TaskStatus.SUCCEEDED)
    await backend.submit(make_request())


async def test_cancel_queued_task(backends: Callable[..., SqliteTaskBackend]) -> None:
    """A queued task is cancelled at once and never runs."""
    runner = GatedRunner()
    backend = await started(backends, runner, workers=1)
    busy = await backend.submit(make_request())
    await runner.started.wait()
    waiting = await backend.submit(make_request())

    cancelled = await backend.cancel(waiting.id)
    assert cancelled.status is TaskStatus.CANCELLED
    assert cancelled.error == ImageError("CANCELLED", "cancelled by the client")
    assert cancelled.finished_at is not None
    assert await backend.get(waiting.id) == cancelled

    runner.release.set()
    await wait_status(backend, busy.id, TaskStatus.SUCCEEDED)
    assert runner.calls == [busy.id]


async def test_cancel_running_task(backends: Callable[..., SqliteTaskBackend]) -> None:
    """Cancelling a running task cancels its runner, and the task stays CANCELLED."""
    runner = GatedRunner()
    backend = await started(backends, runner)
    task = await backend.submit(make_request())
    await runner.started.wait()
    assert (await backend.get(task.id)).status is TaskStatus.RUNNING

    cancelled = await backend.cancel(task.id)
    assert cancelled.status is TaskStatus.CANCELLED
    await asyncio.wait_for(runner.any_cancelled.wait(), 5)
    assert runner.cancelled == [task.id]
    await asyncio.sleep(0.1)
    stored = await backend.get(task.id)
    assert stored.status is TaskStatus.CANCELLED
    assert stored.result is None
    assert (await backend.counts())[TaskStatus.CANCELLED] == 1


async def test_cancel_finished_or_unknown_task(
    backends: Callable[..., SqliteTaskBackend],
) -> None:
    """Cancelling a finished task raises TaskNotCancellable; an unknown one, TaskNotFound."""
    backend = await started(backends, quick)
    task = await backend.submit(make_request())
    await wait_status(backend, task.id, TaskStatus.SUCCEEDED)
    with pytest.raises(TaskNotCancellable) as caught:
        await backend.cancel(task.id)
    assert caught.value.metadata == {"task_id": task.id, "status": "succeeded"}
    with pytest.raises(TaskNotFound):
        await backend.cancel("task_nope")


async def test_get_unknown_task(backends: Callable[..., SqliteTaskBackend]) -> None:
    """Getting an id nobody stored raises TaskNotFound."""
    backend = await started(backends, quick)
    with pytest.raises(TaskNotFound):
        await backend.get("task_missing")


async def test_concurrency_is_bounded_by_workers(
    backends: Callable[..., SqliteTaskBackend],
) -> None:
    """With two workers, no more than two of five tasks ever run at once."""
    running = 0
    peak = 0

    async def runner(task: Task) -> GenerationResult:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        return make_result(task)

    backend = await started(backends, runner, workers=2)
    tasks = [await backend.submit(make_request()) for _ in range(5)]
    for task in tasks:
        await wait_status(backend, task.id, TaskStatus.SUCCEEDED)
    assert peak == 2


async def test_drained_tasks_run_again_after_restart(
    backends: Callable[..., SqliteTaskBackend],
) -> None:
    """A task interrupted by drain goes back to QUEUED and completes in the next process."""
    runner = GatedRunner()
    first = await started(backends, runner, workers=1)
    tasks = [await first.submit(make_request()) for _ in range(3)]
    await runner.started.wait()
    await first.drain(0.1)
    assert runner.cancelled == [tasks[0].id]
    assert {(await first.get(t.id)).status for t in tasks} == {TaskStatus.QUEUED}
    await first.aclose()

    second = await started(backends, quick)
    for task in tasks:
        await wait_status(second, task.id, TaskStatus.SUCCEEDED)
    assert (await second.get(tasks[0].id)).attempts == 2
    assert (await second.get(tasks[1].id)).attempts == 1


async def test_task_left_running_by_a_dead_process_runs_again(
    backends: Callable[..., SqliteTaskBackend], tmp_path: Path
) -> None:
    """A row still RUNNING when the file is reopened is queued again and run."""
    runner = GatedRunner()
    first = await started(backends, runner, workers=1)
    task = await first.submit(make_request())
    await runner.started.wait()
    await first.aclose()
    with sqlite3.connect(tmp_path / "db" / "tasks.sqlite3") as db:
        db.execute("UPDATE tasks SET status = 'running' WHERE id = ?", (task.id,))
    db.close()

    second = await started(backends, quick)
    done = await wait_status(second, task.id, TaskStatus.SUCCEEDED)
    assert done.attempts == 2


async def test_drain_grace_lets_short_tasks_finish(
    backends: Callable[..., SqliteTaskBackend],
) -> None:
    """A task that ends within the grace period is stored SUCCEEDED, and drain returns early."""
    started_event = asyncio.Event()

    async def runner(task: Task) -> GenerationResult:
        started_event.set()
        await asyncio.sleep(0.1)
        return make_result(task)

    backend = await started(backends, runner)
    task = await backend.submit(make_request())
    await started_event.wait()
    loop = asyncio.get_running_loop()
    began = loop.time()
    await backend.drain(10)
    assert loop.time() - began < 5
    assert (await backend.get(task.id)).status is TaskStatus.SUCCEEDED


async def test_submit_after_drain_is_refused(backends: Callable[..., SqliteTaskBackend]) -> None:
    """Once drain has begun, submit raises ShuttingDown."""
    backend = await started(backends, quick)
    await backend.drain(0)
    with pytest.raises(ShuttingDown):
        await backend.submit(make_request())


async def test_purge_removes_only_old_finished_tasks(
    backends: Callable[..., SqliteTaskBackend],
) -> None:
    """purge deletes finished tasks older than the cutoff and keeps everything else."""
    runner = GatedRunner()
    backend = await started(backends, runner, workers=1)
    old = await backend.submit(make_request())
    await backend.cancel(old.id)
    await asyncio.sleep(0.01)
    cutoff = utcnow()
    await asyncio.sleep(0.01)
    running = await backend.submit(make_request())
    await runner.started.wait()
    queued = await backend.submit(make_request())
    recent = await backend.submit(make_request())
    await backend.cancel(recent.id)

    assert await backend.purge(cutoff) == 1
    with pytest.raises(TaskNotFound):
        await backend.get(old.id)
    for task in (running, queued, recent):
        await backend.get(task.id)
    assert await backend.purge(cutoff) == 0


async def test_counts_include_every_status(backends: Callable[..., SqliteTaskBackend]) -> None:
    """counts reports each status, with zeros for those no task is in."""
    runner = GatedRunner()
    backend = await started(backends, runner, workers=1)
    assert await backend.counts() == dict.fromkeys(TaskStatus, 0)
    await backend.submit(make_request())
    await runner.started.wait()
    await backend.submit(make_request())
    cancelled = await backend.submit(make_request())
    await backend.cancel(cancelled.id)
    assert await backend.counts() == {
        TaskStatus.QUEUED: 1,
        TaskStatus.RUNNING: 1,
        TaskStatus.SUCCEEDED: 0,
        TaskStatus.FAILED: 0,
        TaskStatus.CANCELLED: 1,
    }


async def test_ready_follows_the_database(backends: Callable[..., SqliteTaskBackend]) -> None:
    """ready is False before start and after close, True in between; aclose is idempotent."""
    backend = backends()
    assert not await backend.ready()
    await backend.start(quick)
    assert await backend.ready()
    await backend.aclose()
    await backend.aclose()
    assert not await backend.ready()
