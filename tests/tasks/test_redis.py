"""What only the redis backend does: its keys for owners, an owner's index of tasks
(expired entries dropped, the set trimmed and expiring, ties and the scan bound on paging),
watches across replicas (one subscription each, announcements on one channel), and a task
whose replica died in its last attempt abandoned by another's sweep.

These run on the real Redis on 127.0.0.1:6379, each test on its own queue name; with
CI=true an unreachable Redis fails them instead of skipping them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from redis import asyncio as aioredis

from sia.domain import GenerationRequest, GenerationResult, Task, TaskStatus
from sia.tasks.redis import RedisTaskBackend
from tests.tasks.backend_helpers import (
    REDIS_URL,
    GatedRunner,
    ProgressRunner,
    delete_queue_keys,
    images_result,
    make_request,
    make_result,
    open_watches,
    require_redis,
    stays_unchanged,
    wait_status,
    watch_until,
)
from tests.waiting import until

_RETENTION = 100


@pytest.fixture
async def backend() -> AsyncIterator[RedisTaskBackend]:
    """A started backend on a queue of its own, one worker held by a GatedRunner."""
    await require_redis()
    queue = f"test-{uuid.uuid4().hex[:10]}"
    made = RedisTaskBackend(REDIS_URL, queue=queue, workers=1, retention=_RETENTION)
    await made.start(GatedRunner())
    try:
        yield made
    finally:
        await made.aclose()
        await delete_queue_keys(queue)


@pytest.fixture
async def redis() -> AsyncIterator[aioredis.Redis]:
    """A client of the test Redis, to look at and change keys behind the backend."""
    client = aioredis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()


def _index(backend: RedisTaskBackend, owner: str) -> str:
    return f"sia:{backend.queue_name}:owner-tasks:{owner}"


async def _submit(backend: RedisTaskBackend, owner: str, count: int) -> list[Task]:
    return [await backend.submit(make_request(), owner=owner) for _ in range(count)]


async def test_request_ids_are_claimed_per_owner_under_their_keys(
    backend: RedisTaskBackend, redis: aioredis.Redis
) -> None:
    """Owner "" keeps the claim key it had before owners; another owner's is length-prefixed."""
    anonymous = await backend.submit(make_request(request_id="r-1"))
    alice = await backend.submit(make_request(request_id="r-1"), owner="alice")
    prefix = f"sia:{backend.queue_name}"
    assert await redis.get(f"{prefix}:request:r-1") == anonymous.id.encode()
    assert await redis.get(f"{prefix}:owner-request:5:alice:r-1") == alice.id.encode()


async def test_the_index_expires_and_is_trimmed_on_submit(
    backend: RedisTaskBackend, redis: aioredis.Redis
) -> None:
    """Each submit renews the owner's index expiry (twice the retention) and drops entries
    older than that."""
    index = _index(backend, "alice")
    stale_ms = int(time.time() * 1000) - 3 * _RETENTION * 1000
    await redis.zadd(index, {"task_stale": stale_ms})
    [task] = await _submit(backend, "alice", 1)
    assert 0 < await redis.ttl(index) <= 2 * _RETENTION
    assert await redis.zrange(index, 0, -1, withscores=True) == [
        (task.id.encode(), task.created_at.timestamp() * 1000)
    ]


async def test_entries_of_expired_jobs_are_dropped_when_listed(
    backend: RedisTaskBackend, redis: aioredis.Redis
) -> None:
    """A listed entry whose job has expired is left out of the page and removed from the index."""
    tasks = await _submit(backend, "alice", 3)
    await redis.delete(f"saq:job:{backend.queue_name}:{tasks[1].id}")  # as its TTL would
    listed, cursor = await backend.list("alice")
    assert ([t.id for t in listed], cursor) == ([tasks[2].id, tasks[0].id], "")
    assert await redis.zscore(_index(backend, "alice"), tasks[1].id) is None
    assert await redis.zcard(_index(backend, "alice")) == 2


async def test_tasks_of_one_millisecond_page_in_id_order(
    backend: RedisTaskBackend, redis: aioredis.Redis
) -> None:
    """Entries sharing a score are paged by descending id, each exactly once."""
    tasks = await _submit(backend, "alice", 5)
    await redis.zadd(_index(backend, "alice"), dict.fromkeys((t.id for t in tasks), 1000), xx=True)
    seen: list[str] = []
    cursor = ""
    for _ in range(3):
        page, cursor = await backend.list("alice", limit=2, after=cursor)
        seen += [t.id for t in page]
    assert cursor == ""
    assert seen == sorted((t.id for t in tasks), reverse=True)


async def test_a_filtered_listing_reads_a_bounded_number_of_entries(
    backend: RedisTaskBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past LIST_SCAN entries a call returns what it found (maybe nothing) and a cursor that
    goes on from there."""
    monkeypatch.setattr("sia.tasks.redis_index.LIST_SCAN", 3)
    [oldest, *_] = await _submit(backend, "alice", 7)
    await backend.cancel(oldest.id)
    pages = [await backend.list("alice", status=TaskStatus.CANCELLED, limit=1)]
    while pages[-1][1]:
        pages.append(
            await backend.list("alice", status=TaskStatus.CANCELLED, limit=1, after=pages[-1][1])
        )
    # Submissions within one millisecond list by id, so the oldest may come a little early.
    assert [t.id for page, _ in pages for t in page] == [oldest.id]
    assert len(pages) == 3 and pages[0][0] == []


@pytest.fixture
async def replicas() -> AsyncIterator[tuple[RedisTaskBackend, RedisTaskBackend, ProgressRunner]]:
    """Two replicas on one queue: A runs tasks with a ProgressRunner of two images; B, drained
    at once, runs none but answers and watches."""
    await require_redis()
    queue = f"test-{uuid.uuid4().hex[:10]}"
    runner = ProgressRunner(images=2)
    a = RedisTaskBackend(REDIS_URL, queue=queue, workers=1, heartbeat=2)
    b = RedisTaskBackend(REDIS_URL, queue=queue, workers=1, heartbeat=2)
    runner.backend = a
    await a.start(runner)
    await b.start(GatedRunner())
    await b.drain(0)  # its worker stops before any task is queued
    try:
        yield a, b, runner
    finally:
        await a.aclose()
        await b.aclose()
        await delete_queue_keys(queue)


def _group() -> GenerationRequest:
    return GenerationRequest(prompt="a comic strip", model="m-1", size="1024x1024", max_images=4)


async def test_a_watch_on_one_replica_sees_a_task_another_runs(
    replicas: tuple[RedisTaskBackend, RedisTaskBackend, ProgressRunner],
) -> None:
    """B's watch wakes as A starts the task, at each of its images and at its end; B reads
    each state from Redis."""
    a, b, runner = replicas
    busy = await a.submit(_group())
    await runner.wait_started()
    task = await a.submit(_group())
    await asyncio.sleep(0.2)
    async with b.watch(task.id) as watch:
        assert (await b.get(task.id)).status is TaskStatus.QUEUED
        assert await stays_unchanged(watch)
        for _ in range(3):
            await runner.step()
        await wait_status(a, busy.id, TaskStatus.SUCCEEDED)

        def running_with(count: int) -> Callable[[Task], bool]:
            def check(t: Task) -> bool:
                images = 0 if t.result is None else len(t.result.images)
                return t.status is TaskStatus.RUNNING and images == count

            return check

        await watch_until(watch, b, task.id, running_with(0), "RUNNING")
        for count in (1, 2):
            await runner.step()
            shown = await watch_until(watch, b, task.id, running_with(count), f"{count} images")
            assert shown.result == images_result(task, count)
        await runner.step()
        done = await watch_until(
            watch, b, task.id, lambda t: t.status is TaskStatus.SUCCEEDED, "SUCCEEDED"
        )
        assert done.result == images_result(task, 3)
    assert open_watches(b) == 0
    assert runner.calls == [busy.id, task.id]


async def test_a_cancel_on_one_replica_wakes_a_watch_on_the_other(
    replicas: tuple[RedisTaskBackend, RedisTaskBackend, ProgressRunner],
) -> None:
    """A task running on A, cancelled through B, wakes A's watch and B's."""
    a, b, runner = replicas
    task = await a.submit(_group())
    await runner.wait_started()
    await wait_status(b, task.id, TaskStatus.RUNNING)
    await asyncio.sleep(0.2)

    def cancelled(t: Task) -> bool:
        return t.status is TaskStatus.CANCELLED

    async with a.watch(task.id) as on_a, b.watch(task.id) as on_b:
        await b.cancel(task.id)
        await watch_until(on_b, b, task.id, cancelled, "CANCELLED on B")
        await watch_until(on_a, a, task.id, cancelled, "CANCELLED on A")


async def test_changes_are_announced_on_one_channel_as_task_ids(
    backend: RedisTaskBackend, redis: aioredis.Redis
) -> None:
    """Each change PUBLISHes the task's id, and nothing else, on sia:<queue>:task-changed."""
    pubsub = redis.pubsub()
    await pubsub.subscribe(f"sia:{backend.queue_name}:task-changed")
    try:
        assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"  # type: ignore[index]
        task = await backend.submit(make_request())  # the GatedRunner takes it: RUNNING
        await backend.cancel(task.id)
        seen: list[bytes] = []
        while len(seen) < 3 and (message := await pubsub.get_message(timeout=5)):
            seen.append(message["data"])
        assert seen[:3] == [task.id.encode()] * 3  # submit, claim, cancel (and the abort's end)
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


async def _crash(backend: RedisTaskBackend) -> None:
    """Stop `backend` as SIGKILL would: its job is never touched, finished or re-queued
    again, and its sweep stops (its queue's writes do nothing, then its worker ends)."""
    queue, worker_task = backend._queue, backend._worker_task
    assert queue is not None and worker_task is not None

    async def nothing(*args: object, **kwargs: object) -> None:
        return None

    queue.update = queue._finish = queue._retry = nothing  # type: ignore[method-assign]
    worker_task.cancel()
    await asyncio.gather(worker_task, return_exceptions=True)


async def test_a_task_whose_replica_dies_in_its_last_attempt_is_abandoned_by_the_sweep() -> None:
    """A dies running a task's last attempt: B's sweep fails it ABANDONED, unrun, and tells
    on_abandoned once, the task as stored."""
    await require_redis()
    queue = f"test-{uuid.uuid4().hex[:10]}"
    told: list[Task] = []

    async def on_abandoned(task: Task) -> None:
        told.append(task)

    ran: list[str] = []

    async def runner_b(task: Task) -> GenerationResult:
        ran.append(task.id)
        return make_result(task)

    runner = GatedRunner()
    options = {"queue": queue, "workers": 1, "heartbeat": 1, "max_attempts": 1}
    a = RedisTaskBackend(REDIS_URL, **options)  # type: ignore[arg-type]
    b = RedisTaskBackend(REDIS_URL, **options)  # type: ignore[arg-type]
    try:
        await a.start(runner, on_abandoned=on_abandoned)
        task = await a.submit(make_request())
        await runner.wait_started()
        await _crash(a)
        await b.start(runner_b, on_abandoned=on_abandoned)
        failed = await wait_status(b, task.id, TaskStatus.FAILED)
        assert failed.error is not None
        assert failed.error.code == "ABANDONED"
        await until(lambda: bool(told), "on_abandoned was not called")
        await asyncio.sleep(1.1)  # another sweep: none tells it again
        [heard] = told
        assert (heard.id, heard.status, heard.error) == (task.id, TaskStatus.FAILED, failed.error)
        assert heard.request == task.request
        assert ran == []
    finally:
        await a.aclose()
        await b.aclose()
        await delete_queue_keys(queue)
