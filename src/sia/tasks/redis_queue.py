"""saq's queue and worker as the `redis` backend runs them, and Redis's persistence check.

- The sweep needs two sightings before it re-queues a job (see `_Queue`).
- An outage costs no CPU: saq's dequeue loop would retry at once, forever,
  so a failed dequeue waits an exponential back-off shared by every worker
  slot (`Outage`), and the upkeep loops skip a round quietly instead of
  logging a traceback each second.
- Nothing finished is lost to an outage: a job's final write (its result, or
  its retry) waits for Redis to come back rather than being dropped, which
  would leave the job to the sweep and generate it again; the sweep holds
  off until such writes have had their chance (`Outage.settling`).
- Abandoned jobs: a job stored failed as out of attempts (failed by `_run_job` after
  drains, or aborted by this queue's sweep after a crash) is told to `on_abandoned`
  once, by the replica that wrote it, after the write.
- Announcements: each finish and re-queue (a worker's, a drain's, the
  sweep's) is announced on the queue's task-changed channel once written
  (see `sia.tasks.redis_events`); a failed PUBLISH, here or saq's own, is
  dropped and never fails the write it follows.

redis-py's exceptions never leave the `sia.tasks` package.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

from redis.exceptions import RedisError, ResponseError
from saq import Job, Status, Worker
from saq.queue.redis import RedisQueue

from sia.errors import ConfigError
from sia.logs import get_logger
from sia.tasks.redis_jobs import failed_abandoned

if TYPE_CHECKING:
    from redis import asyncio as aioredis

log = get_logger("sia.tasks.redis")

#: What redis-py raises when Redis cannot answer (its connection errors are also OSErrors).
FAULTS = (RedisError, OSError)
#: Back-off between Redis attempts during an outage: short at first, then capped well
#: inside the 10 s in which work must resume once Redis is back.
FIRST_DELAY = 0.1
MAX_DELAY = 2.0

#: Told of a job this queue has just stored failed ABANDONED; must not raise.
OnAbandoned: TypeAlias = Callable[[Job], Awaitable[None]]


class Outage:
    """Whether Redis is unreachable, and how long a worker waits before trying again.

    The first call to succeed after an outage wakes every waiting one, so that
    finished jobs' writes land at once rather than a back-off later.
    """

    def __init__(self) -> None:
        self.failures = 0
        self.resumed_at = -MAX_DELAY
        self._back = asyncio.Event()

    async def wait(self, exc: BaseException) -> None:
        """Record a failed call and sleep the back-off; the first failure is logged."""
        if self.failures == 0:
            log.error("redis_unreachable", error=type(exc).__name__, detail=str(exc)[:200])
            self._back = asyncio.Event()
        self.failures += 1
        delay = min(MAX_DELAY, FIRST_DELAY * 2 ** min(self.failures, 10))
        pause = random.uniform(delay / 2, delay)  # noqa: S311 - jitter, not crypto
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._back.wait(), pause)

    def over(self) -> None:
        """Record a call that succeeded."""
        if self.failures:
            log.warning("redis_reachable_again", failed_calls=self.failures)
            self.failures = 0
            self.resumed_at = asyncio.get_running_loop().time()
            self._back.set()

    def settling(self) -> bool:
        """Down, or back for less than one back-off: writes delayed by it may not have
        landed yet, so a job that looks abandoned may only be late."""
        return bool(self.failures) or (
            asyncio.get_running_loop().time() - self.resumed_at < MAX_DELAY
        )


class JobWorker(Worker[Any]):
    """saq's worker without its signal handlers (the app owns SIGTERM and SIGINT),
    whose upkeep rounds skip quietly while Redis is unreachable."""

    SIGNALS = []  # noqa: RUF012 - overrides saq's class attribute

    async def abort(self, abort_threshold: float) -> None:
        with contextlib.suppress(*FAULTS):
            await super().abort(abort_threshold)

    async def worker_info(self, ttl: int = 60) -> Any:
        with contextlib.suppress(*FAULTS):
            return await super().worker_info(ttl)
        return None


class JobQueue(RedisQueue):
    """saq's Redis queue with a sweep that needs two sightings before it re-queues,
    the outage handling of the module docstring, and `on_abandoned` told of each job
    it stores failed ABANDONED.

    saq's sweep re-queues any job in the active list that is not ACTIVE, but a
    worker that has just dequeued a job has not marked it ACTIVE yet: a sweep
    landing in that moment would run the job twice. A job is swept only when
    two consecutive rounds (one interval apart) both find it suspect; a live
    worker has marked it ACTIVE and touches it long before then.
    """

    def __init__(
        self, redis: aioredis.Redis, name: str, *, on_abandoned: OnAbandoned | None = None
    ) -> None:
        super().__init__(redis, name=name)
        self.on_abandoned = on_abandoned
        self._suspects: set[bytes] = set()
        self.outage = Outage()
        self.closing = False
        #: Where each change of a task is PUBLISHed, as the task id.
        self.changes_channel = f"sia:{name}:task-changed"

    async def announce(self, task_id: str) -> None:
        """Tell every replica's watchers that `task_id` changed; call after the write.

        Best effort: a failure is logged and dropped. The subscriptions drop in
        the same outage, and each replica wakes all its watchers when its own
        subscription is back (`sia.tasks.redis_events`).
        """
        try:
            await self.redis.publish(self.changes_channel, task_id)
        except FAULTS as exc:
            log.info("task_change_unannounced", task_id=task_id, error=type(exc).__name__)

    async def notify(self, job: Job) -> None:
        # saq's PUBLISH on the job's own channel (its sweep listens there) runs after the
        # write, inside _finish and _retry: failing, it would make them write again.
        with contextlib.suppress(*FAULTS):
            await super().notify(job)

    async def dequeue(self, timeout: float = 0.0, poll_interval: float = 0.0) -> Job | None:
        try:
            job = await super().dequeue(timeout, poll_interval)
        except FAULTS as exc:
            await self.outage.wait(exc)
            return None
        self.outage.over()
        return job

    async def schedule(self, lock: int = 1) -> list[str]:
        try:
            return await super().schedule(lock)
        except FAULTS:
            return []

    async def _finish(self, job: Job, status: Status, **kwargs: Any) -> None:
        await self._until_written(super()._finish, job, status, **kwargs)
        await self.announce(job.key)
        if status is Status.FAILED and failed_abandoned(job):  # by _run_job, after drains
            await self._abandoned(job)

    async def _abandoned(self, job: Job) -> None:
        if self.on_abandoned is not None:
            await self.on_abandoned(job)

    async def _retry(self, job: Job, error: str | None) -> None:
        await self._until_written(super()._retry, job, error)
        await self.announce(job.key)

    async def _until_written(self, write: Any, *args: Any, **kwargs: Any) -> None:
        """`write(*args)`, tried again after each back-off until Redis takes it."""
        while True:
            try:
                await write(*args, **kwargs)
            except FAULTS as exc:
                if self.closing:
                    raise  # the job stays in the active list: the sweep re-queues it
                await self.outage.wait(exc)
            else:
                self.outage.over()
                return

    async def sweep(self, lock: int = 60, abort: float = 5.0) -> list[str]:
        # Touches and final writes failed during an outage too: start afresh once every
        # replica has had a back-off to retry them, so a job whose replica lives is seen
        # written (or touched) before it is swept.
        if self.outage.settling():
            self._suspects.clear()
            return []
        try:
            return await self._sweep_round(lock, abort)
        except FAULTS:
            self._suspects.clear()
            return []

    async def _sweep_round(self, lock: int, abort: float) -> list[str]:
        redis = self.redis
        if not await redis.set(self.namespace("sweep"), 1, nx=True, ex=lock):
            return []
        ids = await redis.lrange(self._active, 0, -1)  # type: ignore[misc]  # see ping()
        jobs = await redis.mget(ids) if ids else []
        suspects = set()
        for job_id, raw in zip(ids, jobs, strict=True):
            job = self.deserialize(raw) if raw else None
            if job is None or job.status is not Status.ACTIVE or job.stuck:
                suspects.add(job_id)
        swept, self._suspects = suspects & self._suspects, suspects - self._suspects
        for job_id in swept:
            job = await self._get_job_by_id(job_id)
            if job is None:
                await redis.lrem(self._active, 0, job_id)  # type: ignore[misc]  # see ping()
                continue
            log.warning("task_swept", task_id=job.key, attempts=job.attempts)
            await self.abort(job, error=self.swept_error_message)
            with contextlib.suppress(TimeoutError):
                await job.refresh(abort)
            if job.retryable:
                await self.retry(job, error=self.swept_error_message)
            else:  # its last attempt was interrupted: it reads FAILED, ABANDONED
                await self.finish(job, Status.ABORTED, error=self.swept_error_message)
                await self._abandoned(job)
        return [job_id.decode() for job_id in swept]


async def ping(redis: aioredis.Redis) -> bool:
    """True when Redis answers PING."""
    # redis-py types each command for its sync and async clients at once.
    return bool(await redis.ping())  # type: ignore[misc]


async def check_persistence(redis: aioredis.Redis, *, required: bool) -> None:
    """Warn, or raise ConfigError when `required`, if Redis would lose its data on a restart.

    Every accepted task lives only in Redis: without persistence a restart
    loses them all. AOF keeps each write; RDB snapshots alone lose what came
    since the last one, so they earn a warning but pass. A server that
    refuses INFO and CONFIG (some managed ones) cannot be checked: logged.
    """
    try:
        info = await redis.info("persistence")
        aof = str(info.get("aof_enabled", "0")) == "1"
        schedule = "" if aof else await _save_schedule(redis)
    except ResponseError as exc:
        log.warning("redis_persistence_unchecked", error=str(exc)[:200])
        return
    if aof:
        log.info("redis_persistence", aof=True)
        return
    if schedule is None:
        log.warning("redis_persistence_unchecked", detail="appendonly is off; CONFIG is refused")
        return
    if schedule:
        log.warning(
            "redis_persistence_weak",
            detail="RDB snapshots only: tasks accepted since the last snapshot are lost "
            "if Redis restarts; turn on appendonly",
        )
        return
    message = (
        "Redis has persistence off (appendonly no, no save schedule): every queued and "
        "running task is lost if it restarts; turn on appendonly"
    )
    if required:
        raise ConfigError(f"REDIS_URL: {message} (or set REDIS_REQUIRE_PERSISTENCE=false)")
    log.warning("redis_persistence_off", detail=message)


async def _save_schedule(redis: aioredis.Redis) -> str | None:
    """Redis's RDB `save` schedule: "" when off, None when CONFIG is refused."""
    try:
        config = await redis.config_get("save")
    except ResponseError:
        return None
    value = config.get("save") or config.get(b"save") or ""
    return value.decode() if isinstance(value, bytes) else str(value)
