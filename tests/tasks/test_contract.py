"""The task-backend contract, run against every backend: SQLite and Redis (saq).

The Redis runs use the real Redis on 127.0.0.1:6379, each test on its own queue
name, whose keys are deleted afterwards. With CI=true an unreachable Redis
fails these tests instead of skipping them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

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
)
from sia.errors import (
    InvalidArgument,
    QueueFull,
    ShuttingDown,
    TaskNotCancellable,
    TaskNotFound,
    Unavailable,
    UpstreamUnavailable,
)
from sia.providers.retry import RetryPolicy, call_with_retries
from sia.tasks.base import TaskBackend
from sia.tasks.codec import cursor_to_text
from sia.tasks.redis import RedisTaskBackend
from sia.tasks.sqlite import SqliteTaskBackend
from tests.tasks.backend_helpers import (
    REDIS_URL,
    GatedRunner,
    Make,
    ProgressRunner,
    delete_queue_keys,
    images_result,
    make_request,
    make_result,
    open_watches,
    quick,
    require_redis,
    started,
    stays_unchanged,
    wait_status,
    watch_until,
)
from tests.waiting import until, within


@pytest.fixture(params=["sqlite", "redis"])
async def backends(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Make]:
    """A factory of backends of one kind, all on the same store for this test."""
    kind: str = request.param
    queue = f"test-{uuid.uuid4().hex[:10]}"
    if kind == "redis":
        await require_redis()
    made: list[TaskBackend] = []

    def make(**kwargs: int) -> TaskBackend:
        backend: TaskBackend
        if kind == "redis":
            backend = RedisTaskBackend(REDIS_URL, queue=queue, heartbeat=2, **kwargs)  # type: ignore[arg-type]
        else:
            backend = SqliteTaskBackend(tmp_path / "db" / "tasks.sqlite3", **kwargs)  # type: ignore[arg-type]
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.aclose()
    if kind == "redis":
        await delete_queue_keys(queue)


async def test_submit_runs_task_and_round_trips_everything(
    backends: Make,
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
    backends: Make,
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
    backends: Make,
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
    backends: Make,
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
    backends: Make,
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


async def test_concurrent_submits_with_one_request_id_make_one_task(
    backends: Make,
) -> None:
    """Concurrent submits sharing a request_id all get the same single task."""
    runner = GatedRunner()
    backend = await started(backends, runner)
    tasks = await asyncio.gather(
        *(backend.submit(make_request(request_id="dup")) for _ in range(20))
    )
    assert len({task.id for task in tasks}) == 1


async def test_queue_full_raises(backends: Make) -> None:
    """Once queued plus running tasks reach queue_limit, submit raises QueueFull."""
    runner = GatedRunner()
    backend = await started(backends, runner, workers=1, queue_limit=2)
    first = await backend.submit(make_request(request_id="a"))
    await backend.submit(make_request())
    await runner.wait_started()
    with pytest.raises(QueueFull) as caught:
        await backend.submit(make_request())
    assert caught.value.metadata == {"limit": "2"}
    assert (await backend.submit(make_request(request_id="a"))).id == first.id
    runner.release.set()
    await wait_status(backend, first.id, TaskStatus.SUCCEEDED)
    await backend.submit(make_request())


async def test_cancel_queued_task(backends: Make) -> None:
    """A queued task is cancelled at once and never runs."""
    runner = GatedRunner()
    backend = await started(backends, runner, workers=1)
    busy = await backend.submit(make_request())
    await runner.wait_started()
    waiting = await backend.submit(make_request())

    cancelled = await backend.cancel(waiting.id)
    assert cancelled.status is TaskStatus.CANCELLED
    assert cancelled.error == ImageError("CANCELLED", "cancelled by the client")
    assert cancelled.finished_at is not None
    assert await backend.get(waiting.id) == cancelled

    runner.release.set()
    await wait_status(backend, busy.id, TaskStatus.SUCCEEDED)
    assert runner.calls == [busy.id]


async def test_cancel_running_task(backends: Make) -> None:
    """Cancelling a running task cancels its runner, and the task stays CANCELLED."""
    runner = GatedRunner()
    backend = await started(backends, runner)
    task = await backend.submit(make_request())
    await runner.wait_started()
    assert (await backend.get(task.id)).status is TaskStatus.RUNNING

    cancelled = await backend.cancel(task.id)
    assert cancelled.status is TaskStatus.CANCELLED
    await within(runner.any_cancelled.wait(), "cancel did not reach the running runner")
    assert runner.cancelled == [task.id]
    await asyncio.sleep(0.1)
    stored = await backend.get(task.id)
    assert stored.status is TaskStatus.CANCELLED
    assert stored.result is None


async def test_cancel_finished_or_unknown_task(
    backends: Make,
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


async def test_get_unknown_task(backends: Make) -> None:
    """Getting an id nobody stored raises TaskNotFound."""
    backend = await started(backends, quick)
    with pytest.raises(TaskNotFound):
        await backend.get("task_missing")


async def test_concurrency_is_bounded_by_workers(
    backends: Make,
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
    backends: Make,
) -> None:
    """A task interrupted by drain goes back to QUEUED and completes in the next process."""
    runner = GatedRunner()
    first = await started(backends, runner, workers=1)
    tasks = [await first.submit(make_request()) for _ in range(3)]
    await runner.wait_started()
    await first.drain(0.1)
    assert runner.cancelled == [tasks[0].id]
    assert {(await first.get(t.id)).status for t in tasks} == {TaskStatus.QUEUED}
    await first.aclose()

    second = await started(backends, quick)
    for task in tasks:
        await wait_status(second, task.id, TaskStatus.SUCCEEDED)
    assert (await second.get(tasks[0].id)).attempts == 2
    assert (await second.get(tasks[1].id)).attempts == 1


async def test_drain_lets_a_running_task_finish_within_grace(
    backends: Make,
) -> None:
    """drain waits for a task still running, stores it SUCCEEDED after one attempt (not
    requeued to run again), and returns as soon as it has finished."""
    runner = GatedRunner()
    backend = await started(backends, runner)
    task = await backend.submit(make_request())
    await runner.wait_started()
    drain = asyncio.create_task(backend.drain(60))
    done, _ = await asyncio.wait({drain}, timeout=0.3)
    runner.release.set()
    assert not done, "drain ended without waiting for the running task"
    await within(drain, "drain still waits after its running task finished")
    stored = await backend.get(task.id)
    assert (stored.status, stored.attempts) == (TaskStatus.SUCCEEDED, 1)
    assert (runner.calls, runner.cancelled) == ([task.id], [])


async def test_submit_after_drain_is_refused(backends: Make) -> None:
    """Once drain has begun, submit raises ShuttingDown."""
    backend = await started(backends, quick)
    await backend.drain(0)
    with pytest.raises(ShuttingDown):
        await backend.submit(make_request())


async def test_ready_follows_the_database(backends: Make) -> None:
    """ready is False before start and after close, True in between; aclose is idempotent."""
    backend = backends()
    assert not await backend.ready()
    await backend.start(quick)
    assert await backend.ready()
    await backend.aclose()
    await backend.aclose()
    assert not await backend.ready()


async def test_a_task_interrupted_max_attempts_times_fails_abandoned(backends: Make) -> None:
    """Interrupted (drained mid-run) TASK_MAX_ATTEMPTS times, a task fails ABANDONED, unrun."""
    runner = GatedRunner()
    first = await started(backends, runner, workers=1, max_attempts=2)
    task = await first.submit(make_request())
    await runner.wait_started()
    await first.aclose()
    runner.started.clear()
    # The backend that fails it (SQLite: the one whose drain finds it out of attempts;
    # Redis: the one that dequeues it next) tells the hook, once it is stored FAILED: the
    # app's tells its webhook.
    told: list[Task] = []
    stored: list[TaskStatus] = []
    reader: list[TaskBackend] = []  # an open backend, to read the task as the hook hears it

    async def on_abandoned(task: Task) -> None:
        told.append(task)
        stored.append((await reader[-1].get(task.id)).status)

    second = backends(workers=1, max_attempts=2)
    reader.append(second)
    await second.start(runner, on_abandoned=on_abandoned)
    await runner.wait_started()
    await second.aclose()
    assert runner.calls == [task.id, task.id]

    ran: list[str] = []

    async def runner_after(task: Task) -> GenerationResult:
        ran.append(task.id)
        return make_result(task)

    third = backends(workers=1, max_attempts=2)
    reader.append(third)
    await third.start(runner_after, on_abandoned=on_abandoned)
    failed = await wait_status(third, task.id, TaskStatus.FAILED)
    assert failed.error is not None
    assert failed.error.code == "ABANDONED"
    assert "interrupted 2 times" in failed.error.message
    assert ran == []
    await until(lambda: bool(told), "on_abandoned was not called")
    [heard] = told
    assert (heard.id, heard.status, heard.error) == (task.id, TaskStatus.FAILED, failed.error)
    assert heard.request == task.request
    assert stored == [TaskStatus.FAILED]


async def test_billed_calls_per_task_have_one_cap(backends: Make) -> None:
    """After an interruption the rerun gets one upstream call, and a failure is not rerun."""
    policy = RetryPolicy(max_retries=3, base_delay=0, max_delay=0)
    calls: list[int] = []
    gate = GatedRunner()

    async def failing_call() -> GenerationResult:
        calls.append(1)
        raise UpstreamUnavailable("down", metadata={})

    async def runner(task: Task) -> GenerationResult:
        if task.attempts == 1:
            return await gate(task)  # interrupted by the drain below
        return await call_with_retries(failing_call, policy=policy, deadline=10**9)

    first = await started(backends, runner, workers=1)
    task = await first.submit(make_request())
    await gate.wait_started()
    await first.aclose()
    second = await started(backends, runner, workers=1)
    failed = await wait_status(second, task.id, TaskStatus.FAILED)
    assert failed.error is not None
    assert failed.error.code == "UPSTREAM_UNAVAILABLE"
    assert failed.attempts == 2
    assert len(calls) == 1  # not 4 (the policy's), nor 4 per remaining task attempt


async def test_a_first_attempt_keeps_the_providers_retries(backends: Make) -> None:
    """A first attempt makes the policy's calls, then fails for good: no task-level rerun."""
    policy = RetryPolicy(max_retries=2, base_delay=0, max_delay=0)
    calls: list[int] = []

    async def failing_call() -> GenerationResult:
        calls.append(1)
        raise UpstreamUnavailable("down", metadata={})

    async def runner(task: Task) -> GenerationResult:
        return await call_with_retries(failing_call, policy=policy, deadline=10**9)

    backend = await started(backends, runner, workers=1)
    task = await backend.submit(make_request())
    failed = await wait_status(backend, task.id, TaskStatus.FAILED)
    assert failed.attempts == 1
    assert len(calls) == 3


async def test_the_owner_is_stored_and_returned_everywhere(backends: Make) -> None:
    """submit, get, the task a worker runs and the task it leaves all carry the owner;
    without one, the owner is ""."""
    seen: list[str] = []
    gate = asyncio.Event()

    async def runner(task: Task) -> GenerationResult:
        seen.append(task.owner)
        await gate.wait()
        return make_result(task)

    backend = await started(backends, runner, workers=1)
    task = await backend.submit(make_request(), owner="alice")
    anonymous = await backend.submit(make_request())
    cancelled = await backend.submit(make_request(), owner="bob")
    assert (task.owner, anonymous.owner, cancelled.owner) == ("alice", "", "bob")
    running = await wait_status(backend, task.id, TaskStatus.RUNNING)
    assert running.owner == "alice"
    assert (await backend.cancel(cancelled.id)).owner == "bob"
    gate.set()
    assert (await wait_status(backend, task.id, TaskStatus.SUCCEEDED)).owner == "alice"
    assert (await wait_status(backend, anonymous.id, TaskStatus.SUCCEEDED)).owner == ""
    assert (await backend.get(cancelled.id)).owner == "bob"
    assert seen == ["alice", ""]


async def test_a_request_id_belongs_to_its_owner(backends: Make) -> None:
    """One request_id under two owners makes two tasks; again under one of them, it returns
    that owner's task; owner and request_id never run into each other."""
    backend = await started(backends, GatedRunner(), workers=1)
    alice = await backend.submit(make_request(request_id="r-1"), owner="alice")
    bob = await backend.submit(make_request(request_id="r-1"), owner="bob")
    anonymous = await backend.submit(make_request(request_id="r-1"))
    assert len({alice.id, bob.id, anonymous.id}) == 3
    again = await backend.submit(make_request(prompt="other", request_id="r-1"), owner="bob")
    assert (again.id, again.owner) == (bob.id, "bob")
    assert (await backend.submit(make_request(request_id="r-1"))).id == anonymous.id

    pairs = [("a:b", "c"), ("a", "b:c"), ("", "1:a:b:c"), ("1:a", "b:c"), ("", "a:b:c")]
    ids = {(await backend.submit(make_request(request_id=r), owner=o)).id for o, r in pairs}
    assert len(ids) == len(pairs)


async def _pages(
    backend: TaskBackend, owner: str, *, limit: int, status: TaskStatus | None = None
) -> list[tuple[list[Task], str]]:
    """Every page of `owner`'s listing, following cursors until the empty one."""
    pages = [await backend.list(owner, status=status, limit=limit)]
    while pages[-1][1]:
        assert len(pages) < 50, "the cursors never end"
        pages.append(await backend.list(owner, status=status, limit=limit, after=pages[-1][1]))
    return pages


async def _submit_spaced(backend: TaskBackend, owner: str, count: int) -> list[Task]:
    """`count` tasks of `owner`, one of "bob" after each, each a few ms after the last."""
    tasks = []
    for _ in range(count):
        tasks.append(await backend.submit(make_request(), owner=owner))
        await backend.submit(make_request(), owner="bob")
        await asyncio.sleep(0.003)  # distinct creation times, even at Redis's millisecond
    return tasks


async def test_list_pages_through_an_owners_tasks_newest_first(backends: Make) -> None:
    """Five tasks, two a page: pages of 2, 2 and 1, newest first, the last with cursor ""."""
    backend = await started(backends, GatedRunner(), workers=1)
    tasks = await _submit_spaced(backend, "alice", 5)
    pages = await _pages(backend, "alice", limit=2)
    assert [len(page) for page, _ in pages] == [2, 2, 1]
    assert all(cursor for _, cursor in pages[:-1])
    assert [task.id for page, _ in pages for task in page] == [t.id for t in reversed(tasks)]
    assert {task.owner for page, _ in pages for task in page} == {"alice"}
    listed = pages[0][0][0]
    assert listed == await backend.get(listed.id)
    everything, cursor = await backend.list("alice", limit=100)
    assert ([t.id for t in everything], cursor) == ([t.id for t in reversed(tasks)], "")


async def test_list_filters_by_status(backends: Make) -> None:
    """With a status, only the owner's tasks in that status are listed, across pages."""
    runner = GatedRunner()
    backend = await started(backends, runner, workers=1)
    [running, *queued] = await _submit_spaced(backend, "alice", 5)
    await runner.wait_started()
    await wait_status(backend, running.id, TaskStatus.RUNNING)
    await backend.cancel(queued[1].id)

    def listed(pages: list[tuple[list[Task], str]]) -> list[str]:
        assert all(len(page) <= 1 for page, _ in pages)
        return [task.id for page, _ in pages for task in page]

    expected = [queued[3].id, queued[2].id, queued[0].id]
    assert listed(await _pages(backend, "alice", limit=1, status=TaskStatus.QUEUED)) == expected
    cancelled = await _pages(backend, "alice", limit=1, status=TaskStatus.CANCELLED)
    assert listed(cancelled) == [queued[1].id]
    assert listed(await _pages(backend, "alice", limit=1, status=TaskStatus.RUNNING)) == [
        running.id
    ]
    assert await backend.list("alice", status=TaskStatus.SUCCEEDED) == ([], "")


async def test_list_never_shows_another_owners_tasks(backends: Make) -> None:
    """An owner sees only their own tasks; one with none gets an empty last page."""
    backend = await started(backends, GatedRunner(), workers=1)
    mine = await _submit_spaced(backend, "alice", 3)
    tasks, cursor = await backend.list("alice")
    assert ([t.id for t in tasks], cursor) == ([t.id for t in reversed(mine)], "")
    bobs, _ = await backend.list("bob")
    assert len(bobs) == 3
    assert not {t.id for t in bobs} & {t.id for t in mine}
    assert await backend.list("carol") == ([], "")
    assert await backend.list("") == ([], "")


async def test_pages_stay_put_while_tasks_are_submitted(backends: Make) -> None:
    """Tasks submitted between two pages neither shift the next page nor repeat a task."""
    backend = await started(backends, GatedRunner(), workers=1)
    tasks = await _submit_spaced(backend, "alice", 4)
    first, cursor = await backend.list("alice", limit=2)
    newer = await _submit_spaced(backend, "alice", 3)
    second, last = await backend.list("alice", limit=2, after=cursor)
    assert [t.id for t in first + second] == [t.id for t in reversed(tasks)]
    assert last == ""
    fresh, _ = await backend.list("alice", limit=3)
    assert [t.id for t in fresh] == [t.id for t in reversed(newer)]


@pytest.mark.parametrize(
    "token",
    [
        "not a token",
        "bm9wZQ",  # base64 of "nope"
        cursor_to_text("yesterday", "task_x"),  # neither a time nor a score
        "WyJhIl0",  # base64 of '["a"]'
        "x" * 600,
    ],
)
async def test_a_bad_cursor_is_an_invalid_page_token(backends: Make, token: str) -> None:
    """A page token that no listing made raises InvalidArgument naming page_token."""
    backend = await started(backends, quick)
    with pytest.raises(InvalidArgument) as caught:
        await backend.list("alice", after=token)
    assert [v.field for v in caught.value.violations] == ["page_token"]


def _group(prompt: str = "a comic strip", **changes: object) -> GenerationRequest:
    """A group request (max_images set), with the webhook fields of an async one."""
    request = dataclasses.replace(make_request(prompt), max_images=4)
    return dataclasses.replace(request, **changes)  # type: ignore[arg-type]


async def _progressing(make: Make, **kwargs: int) -> tuple[TaskBackend, ProgressRunner]:
    """A started backend whose runner is a ProgressRunner of two images."""
    runner = ProgressRunner(images=2)
    backend = make(**kwargs)
    runner.backend = backend
    await backend.start(runner)
    return backend, runner


async def test_a_group_task_round_trips_with_its_webhook_fields(backends: Make) -> None:
    """A group request (max_images) with webhook_url and webhook_images is stored, run and
    listed as it was submitted; without them it keeps their defaults."""
    seen: list[GenerationRequest] = []

    async def runner(task: Task) -> GenerationResult:
        seen.append(task.request)
        return images_result(task, 3)

    backend = await started(backends, runner)
    request = _group(
        webhook_url="https://hooks.example.test/sia?x=1", webhook_images=True, request_id="g-1"
    )
    task = await backend.submit(request, owner="alice")
    assert task.request == request
    assert task.request.sequential
    done = await wait_status(backend, task.id, TaskStatus.SUCCEEDED)
    assert done.request == request
    assert done.result == images_result(task, 3)
    assert seen == [request]
    [listed], _ = await backend.list("alice")
    assert listed.request == request

    plain = await backend.submit(_group())
    stored = (await backend.get(plain.id)).request
    assert (stored.max_images, stored.webhook_url, stored.webhook_images) == (4, "", False)


async def test_progress_shows_the_images_so_far_until_the_result_replaces_them(
    backends: Make,
) -> None:
    """While a group runs, get() shows it RUNNING with 1, then 2 images; the final result
    replaces them; progress for a finished or unknown task changes nothing and raises nothing."""
    backend, runner = await _progressing(backends)
    task = await backend.submit(_group())
    await runner.wait_started()
    running = await wait_status(backend, task.id, TaskStatus.RUNNING)
    assert running.result is None

    last = running.updated_at
    for count in (1, 2):
        await runner.step()
        shown = await backend.get(task.id)
        assert shown.status is TaskStatus.RUNNING
        assert shown.result == images_result(task, count)
        assert shown.finished_at is None
        assert shown.updated_at >= last
        last = shown.updated_at

    await runner.step()
    done = await wait_status(backend, task.id, TaskStatus.SUCCEEDED)
    assert done.result == images_result(task, 3)

    await backend.progress(task.id, images_result(task, 1), attempt=task.attempts)
    assert await backend.get(task.id) == done
    await backend.progress("task_unknown", images_result(task, 1), attempt=1)
    with pytest.raises(TaskNotFound):
        await backend.get("task_unknown")


async def test_progress_of_a_task_not_running_is_ignored(backends: Make) -> None:
    """A queued or cancelled task ignores progress; a failed or cancelled one shows no partial
    images, only its error."""
    backend, runner = await _progressing(backends, workers=1)
    running = await backend.submit(_group())
    await runner.wait_started()
    queued = await backend.submit(_group())
    await backend.progress(queued.id, images_result(queued, 1), attempt=queued.attempts)
    assert (await backend.get(queued.id)).result is None

    await runner.step()
    assert (await backend.get(running.id)).result == images_result(running, 1)
    cancelled = await backend.cancel(running.id)
    assert (cancelled.status, cancelled.result) == (TaskStatus.CANCELLED, None)
    await backend.progress(running.id, images_result(running, 2), attempt=running.attempts)
    assert (await backend.get(running.id)).result is None


async def test_a_failed_group_shows_no_partial_images(backends: Make) -> None:
    """A runner that reported an image and then failed leaves FAILED with its error only."""
    holder: list[TaskBackend] = []

    async def runner(task: Task) -> GenerationResult:
        await holder[0].progress(task.id, images_result(task, 1), attempt=task.attempts)
        raise Unavailable("upstream went away")

    backend = backends()
    holder.append(backend)
    await backend.start(runner)
    task = await backend.submit(_group())
    failed = await wait_status(backend, task.id, TaskStatus.FAILED)
    assert (failed.result, failed.error) == (None, ImageError("UNAVAILABLE", "upstream went away"))


async def test_a_watch_wakes_on_running_each_progress_and_the_end(backends: Make) -> None:
    """A watch on a queued task stays quiet while it waits, then wakes when it starts, at each
    image and at the end; every watch is released on exit."""
    backend, runner = await _progressing(backends, workers=1)
    busy = await backend.submit(_group("busy"))
    await runner.wait_started()
    task = await backend.submit(_group())
    await asyncio.sleep(0.2)  # the submit's own announcement has been delivered
    async with backend.watch(task.id) as watch:
        assert (await backend.get(task.id)).status is TaskStatus.QUEUED
        assert await stays_unchanged(watch), "a watch of an unchanged task woke"
        assert open_watches(backend) == 1

        for _ in range(3):  # the busy task's images and end: not this watch's business
            await runner.step()
        await wait_status(backend, busy.id, TaskStatus.SUCCEEDED)

        def running_with(count: int) -> Callable[[Task], bool]:
            def check(t: Task) -> bool:
                images = 0 if t.result is None else len(t.result.images)
                return t.status is TaskStatus.RUNNING and images == count

            return check

        await watch_until(watch, backend, task.id, running_with(0), "RUNNING")
        for count in (1, 2):
            await runner.step()
            await watch_until(watch, backend, task.id, running_with(count), f"{count} images")
        await runner.step()
        done = await watch_until(
            watch, backend, task.id, lambda t: t.status is TaskStatus.SUCCEEDED, "SUCCEEDED"
        )
        assert done.result == images_result(task, 3)
    assert open_watches(backend) == 0


async def test_a_watch_wakes_on_cancel_and_one_opened_after_the_end_reads_it(
    backends: Make,
) -> None:
    """Cancelling a running or a queued task wakes its watch; a watch opened after the end
    reads the final state (no change need come); watches of one task wake together."""
    runner = GatedRunner()
    backend = await started(backends, runner, workers=1)
    running = await backend.submit(make_request())
    await runner.wait_started()
    queued = await backend.submit(make_request())
    await wait_status(backend, running.id, TaskStatus.RUNNING)
    await asyncio.sleep(0.2)

    def cancelled(t: Task) -> bool:
        return t.status is TaskStatus.CANCELLED

    async with backend.watch(running.id) as first, backend.watch(running.id) as second:
        await backend.cancel(running.id)
        for watch in (first, second):
            await watch_until(watch, backend, running.id, cancelled, "CANCELLED")
    async with backend.watch(queued.id) as watch:
        await backend.cancel(queued.id)
        await watch_until(watch, backend, queued.id, cancelled, "CANCELLED")

    async with backend.watch(running.id) as late:
        assert (await backend.get(running.id)).status is TaskStatus.CANCELLED
        assert await stays_unchanged(late, 0.1)
    async with backend.watch("task_unknown"):
        with pytest.raises(TaskNotFound):
            await backend.get("task_unknown")
    assert open_watches(backend) == 0


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


async def test_a_thousand_idle_watches_cost_no_cpu(backends: Make) -> None:
    """1,000 watches waiting on idle tasks use under 5 % of a core (no polling per watch);
    a change still wakes every watch of its task, and all are released on exit."""
    backend = await started(backends, GatedRunner(), workers=1)
    await backend.submit(make_request("busy"))
    tasks = [await backend.submit(make_request()) for _ in range(20)]
    await asyncio.sleep(0.2)
    watches = [backend.watch(task.id) for task in tasks for _ in range(50)]
    for watch in watches:
        await watch.__aenter__()
    try:
        waiting = [asyncio.create_task(watch.changed()) for watch in watches]
        await asyncio.sleep(0.1)  # every waiter is parked on its event
        before, began = _cpu_seconds(), time.monotonic()
        await asyncio.sleep(1)
        share = (_cpu_seconds() - before) / (time.monotonic() - began)
        print(f"CPU with 1,000 idle watches: {share:.1%} of a core")
        assert share < 0.05
        assert open_watches(backend) == 1000
        assert not any(waiter.done() for waiter in waiting)

        await backend.cancel(tasks[0].id)
        woken = waiting[:50]
        await within(asyncio.gather(*woken), "a watch of the cancelled task slept on")
        await asyncio.sleep(0.1)
        assert not any(waiter.done() for waiter in waiting[50:])
        for waiter in waiting[50:]:
            waiter.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
    finally:
        for watch in watches:
            await watch.__aexit__(None, None, None)
    assert open_watches(backend) == 0


async def test_a_watch_wakes_when_a_drain_puts_its_task_back_in_the_queue(
    backends: Make,
) -> None:
    """A running task interrupted by drain goes back to QUEUED, and its watch wakes to see it."""
    runner = GatedRunner()
    backend = await started(backends, runner, workers=1)
    task = await backend.submit(make_request())
    await runner.wait_started()
    await wait_status(backend, task.id, TaskStatus.RUNNING)
    await asyncio.sleep(0.2)
    async with backend.watch(task.id) as watch:
        await backend.drain(0)
        await watch_until(
            watch, backend, task.id, lambda t: t.status is TaskStatus.QUEUED, "QUEUED again"
        )
