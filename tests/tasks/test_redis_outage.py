"""The redis backend through a Redis outage (its work, its watches), and its persistence
check at start-up.

Each test runs its own `redis-server` (in tmp_path, on a free port) so that it
can kill and restart it.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from redis import asyncio as aioredis
from structlog.testing import capture_logs

from sia.domain import TaskStatus
from sia.errors import ConfigError, Unavailable
from sia.tasks.redis import RedisTaskBackend
from tests.tasks.backend_helpers import (
    GatedRunner,
    make_request,
    open_watches,
    own_redis,
    quick,
    stays_unchanged,
    wait_status,
    watch_until,
)
from tests.waiting import within


def cpu_seconds() -> float:
    """CPU time (user + system) this process has used."""
    times = os.times()
    return times.user + times.system


@pytest.mark.slow
async def test_an_outage_costs_no_cpu_fails_fast_and_work_resumes(tmp_path: Path) -> None:
    """Redis down: no spinning worker loops, submits UNAVAILABLE with a retry delay, listings
    UNAVAILABLE too, not ready; Redis back: ready, and a new task runs."""
    async with own_redis(tmp_path / "redis") as redis:
        backend = RedisTaskBackend(redis.url, queue="outage", workers=16, heartbeat=2)
        await backend.start(quick)
        try:
            await redis.kill()
            await asyncio.sleep(0.5)  # the workers notice; the back-off then settles
            before, started = cpu_seconds(), time.monotonic()
            await asyncio.sleep(3)
            share = (cpu_seconds() - before) / (time.monotonic() - started)
            print(f"CPU during the outage: {share:.1%} of a core")
            # Without back-off the dequeue loops spin a whole core; the bound leaves room for
            # whatever else shares this test process (a full run measured 2 % to 7 %).
            assert share < 0.25

            with pytest.raises(Unavailable) as refused:
                await within(backend.submit(make_request()), "a submit hung during the outage")
            assert refused.value.retry_after
            with pytest.raises(Unavailable):
                await within(backend.list("alice"), "a listing hung during the outage")
            assert not await within(backend.ready(), "ready() hung during the outage")

            await redis.start()
            task = await backend.submit(make_request())
            await wait_status(backend, task.id, TaskStatus.SUCCEEDED, timeout=10)
            assert await backend.ready()
        finally:
            await backend.aclose()


async def test_a_task_finishing_during_an_outage_keeps_its_result(tmp_path: Path) -> None:
    """A run ending while Redis is down keeps its result once Redis is back, and is not run
    again, though the job looked stuck to the sweep."""
    async with own_redis(tmp_path / "redis") as redis:
        runner = GatedRunner()
        backend = RedisTaskBackend(redis.url, queue="outage", workers=2, heartbeat=2)
        await backend.start(runner)
        try:
            task = await backend.submit(make_request())
            await runner.wait_started()
            await redis.kill()
            runner.release.set()
            await asyncio.sleep(3)  # longer than the heartbeat: the job looks stuck
            await redis.start()
            done = await wait_status(backend, task.id, TaskStatus.SUCCEEDED, timeout=10)
            # The sweep holds off until the delayed write has landed: no rerun.
            assert done.attempts == 1
            assert len(runner.calls) == 1
        finally:
            await backend.aclose()


async def test_a_redis_without_persistence_is_refused_when_required(tmp_path: Path) -> None:
    """appendonly off and no save schedule: ConfigError when required, else a warning."""
    async with own_redis(tmp_path / "redis", appendonly=False) as redis:
        strict = RedisTaskBackend(redis.url, queue="p", require_persistence=True)
        with pytest.raises(ConfigError, match="REDIS_REQUIRE_PERSISTENCE"):
            await strict.start(quick)
        lenient = RedisTaskBackend(redis.url, queue="p")
        with capture_logs() as logs:
            await lenient.start(quick)
        await lenient.aclose()
    assert "redis_persistence_off" in [e["event"] for e in logs]


async def test_snapshots_only_warn_and_aof_passes(tmp_path: Path) -> None:
    """RDB snapshots alone are a warning even when required; AOF passes quietly."""
    async with own_redis(tmp_path / "rdb", appendonly=False, save="60 1") as redis:
        backend = RedisTaskBackend(redis.url, queue="p", require_persistence=True)
        with capture_logs() as logs:
            await backend.start(quick)
        await backend.aclose()
    assert "redis_persistence_weak" in [e["event"] for e in logs]
    async with own_redis(tmp_path / "aof") as redis:
        backend = RedisTaskBackend(redis.url, queue="p", require_persistence=True)
        with capture_logs() as logs:
            await backend.start(quick)
        await backend.aclose()
    assert not [e for e in logs if e["event"].startswith("redis_persistence_")]


async def test_watches_wake_when_redis_comes_back_and_follow_changes_again(
    tmp_path: Path,
) -> None:
    """Announcements made while the subscription is down are lost, so each watcher is woken
    once it is back (to read the state again); later changes are announced as before."""
    async with own_redis(tmp_path / "redis") as redis:
        runner = GatedRunner()
        backend = RedisTaskBackend(redis.url, queue="outage", workers=1, heartbeat=2)
        await backend.start(runner)
        try:
            task = await backend.submit(make_request())
            await runner.wait_started()
            await wait_status(backend, task.id, TaskStatus.RUNNING)
            await asyncio.sleep(1.2)  # appendfsync everysec: the claim is on disk
            async with backend.watch(task.id) as watch:
                assert await stays_unchanged(watch, 0.2)
                await redis.kill()
                await asyncio.sleep(0.5)
                await redis.start()
                await within(watch.changed(), "the watch slept through Redis coming back")
                assert (await backend.get(task.id)).status is TaskStatus.RUNNING

                runner.release.set()
                await watch_until(
                    watch, backend, task.id, lambda t: t.status is TaskStatus.SUCCEEDED, "the end"
                )
            assert open_watches(backend) == 0
        finally:
            await backend.aclose()


async def test_watches_wake_when_the_subscription_alone_is_cut(tmp_path: Path) -> None:
    """Redis closing the subscriber's connection (redis-py reconnects and subscribes again by
    itself) wakes each watcher too; later changes are announced as before."""
    async with own_redis(tmp_path / "redis") as redis:
        runner = GatedRunner()
        backend = RedisTaskBackend(redis.url, queue="cut", workers=1, heartbeat=2)
        await backend.start(runner)
        client = aioredis.from_url(redis.url)
        try:
            task = await backend.submit(make_request())
            await wait_status(backend, task.id, TaskStatus.RUNNING)
            await asyncio.sleep(0.2)
            async with backend.watch(task.id) as watch:
                assert await stays_unchanged(watch, 0.2)
                assert await client.client_kill_filter(_type="pubsub") == 1
                await within(watch.changed(), "the watch slept through its subscription's cut")
                runner.release.set()
                await watch_until(
                    watch, backend, task.id, lambda t: t.status is TaskStatus.SUCCEEDED, "the end"
                )
        finally:
            await client.aclose()
            await backend.aclose()
