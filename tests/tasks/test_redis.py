"""What only the redis backend does for owners: its keys, and an owner's index of tasks
(expired entries dropped, the set trimmed and expiring, ties and the scan bound on paging).

These run on the real Redis on 127.0.0.1:6379, each test on its own queue name; with
CI=true an unreachable Redis fails them instead of skipping them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import pytest
from redis import asyncio as aioredis

from sia.domain import Task, TaskStatus
from sia.tasks.redis import RedisTaskBackend
from tests.tasks.backend_helpers import (
    REDIS_URL,
    GatedRunner,
    delete_queue_keys,
    make_request,
    require_redis,
)

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
