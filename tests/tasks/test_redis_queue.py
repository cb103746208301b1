"""The redis backend's queue through the end of an outage: waiters woken, the sweep held off."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis import asyncio as aioredis

from sia.tasks.redis_queue import MAX_DELAY, JobQueue, Outage
from tests.tasks.backend_helpers import REDIS_URL, delete_queue_keys, require_redis
from tests.waiting import within


async def test_the_first_success_wakes_every_waiting_call() -> None:
    """Calls sleeping the back-off retry as soon as one call gets through."""
    outage = Outage()
    outage.failures = 20  # the back-off is at its cap
    waiting = [asyncio.create_task(outage.wait(ConnectionError())) for _ in range(3)]
    await asyncio.sleep(0.05)
    outage.over()
    await within(asyncio.gather(*waiting), "waiters slept out their back-off", timeout=0.5)
    assert outage.settling()  # just back: the sweep still waits


@pytest.fixture
async def queue() -> AsyncIterator[JobQueue]:
    """A JobQueue on the loopback Redis, under a name of its own."""
    await require_redis()
    name = f"sweep-{uuid.uuid4().hex[:8]}"
    redis = aioredis.from_url(REDIS_URL)
    try:
        yield JobQueue(redis, name)
    finally:
        await redis.aclose()
        await delete_queue_keys(name)


async def _sweep(queue: JobQueue) -> list[str]:
    """One sweep round, its lock released so the next round runs at once."""
    swept = await queue.sweep(lock=60)
    await queue.redis.delete(queue.namespace("sweep"))
    return swept


async def test_the_sweep_holds_off_just_after_an_outage(queue: JobQueue) -> None:
    """A job that looks abandoned right after Redis returns may only have its final write
    still in back-off: the sweep counts no sightings until a back-off has passed."""
    await queue.redis.lpush(queue._active, b"saq:job:lost")  # type: ignore[misc]  # redis-py's union
    queue.outage.failures = 3
    queue.outage.over()
    assert await _sweep(queue) == []
    assert await _sweep(queue) == []  # would be the second sighting: held off

    queue.outage.resumed_at -= MAX_DELAY  # a back-off later
    assert await _sweep(queue) == []  # the first sighting
    assert await _sweep(queue) == ["saq:job:lost"]
