"""The `redis` task backend: tasks shared by every replica through saq on Redis.

Each replica runs a saq worker on its own event loop next to the gRPC server.
A task is one saq job whose key is the task id, so any replica can answer for
any task with one Redis round trip. The job carries the request; its result is
the stored result (image bytes live in the blob store, never in Redis).

- Idempotency: saq de-duplicates a key only while its job is unfinished, so a
  `request_id` is claimed with `SET NX` for the retention period
  (`sia:<queue>:request:<request_id>` -> task id).
- Crashes: a running job is touched every `heartbeat / 3` seconds; the sweep
  of any live replica (every `heartbeat / 2` seconds) re-queues a job whose
  replica stopped touching it, up to `max_attempts` attempts in all, so a
  dead replica's task runs elsewhere within about 1.5 heartbeats. Delivery
  is therefore at least once: after a crash an upstream call may be repeated.
- Retries: a provider failure that another attempt may fix (rate limit, 5xx)
  is retried with exponential backoff; any other failure ends the task.
- Cancellation: saq's abort, plus a marker key so that a cancelled task stays
  cancelled even if its replica died while running it.
- Retention: finished jobs expire after the retention period (saq's job TTL).

redis-py's and saq's exceptions never leave this module: Redis being down
becomes `Unavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from redis import asyncio as aioredis
from redis.exceptions import RedisError
from saq import Job, Status, Worker
from saq.queue.redis import RedisQueue
from structlog.contextvars import bound_contextvars

from sia.domain import ImageError, Task, TaskStatus, new_task_id
from sia.errors import (
    ConfigError,
    QueueFull,
    ShuttingDown,
    TaskNotCancellable,
    TaskNotFound,
    Unavailable,
    retryable,
)
from sia.logs import get_logger
from sia.tasks.base import TaskStats
from sia.tasks.codec import request_from_json, request_to_json, result_from_json, result_to_json
from sia.tasks.errors import CANCELLED, INTERNAL, runner_failure, store_errors

if TYPE_CHECKING:
    from sia.domain import GenerationRequest
    from sia.metrics import Metrics
    from sia.tasks.base import Runner

log = get_logger("sia.tasks.redis")

FUNCTION = "run_task"
#: What redis-py raises when Redis cannot answer (its connection errors are also OSErrors).
_FAULTS = (RedisError, OSError)
ABANDONED = ImageError("ABANDONED", "the task's replicas stopped while running it too often")

_STATUSES = {
    Status.NEW: TaskStatus.QUEUED,
    Status.QUEUED: TaskStatus.QUEUED,
    Status.ACTIVE: TaskStatus.RUNNING,
    Status.ABORTING: TaskStatus.RUNNING,  # the sweep's abort before a retry
    Status.ABORTED: TaskStatus.FAILED,
    Status.FAILED: TaskStatus.FAILED,
    Status.COMPLETE: TaskStatus.SUCCEEDED,
}


class _Worker(Worker[Any]):
    """saq's worker without its signal handlers: the app owns SIGTERM and SIGINT."""

    SIGNALS = []  # noqa: RUF012 - overrides saq's class attribute


class _Queue(RedisQueue):
    """saq's Redis queue with a sweep that needs two sightings before it re-queues.

    saq's sweep re-queues any job in the active list that is not ACTIVE, but a
    worker that has just dequeued a job has not marked it ACTIVE yet: a sweep
    landing in that moment would run the job twice. A job is swept only when
    two consecutive rounds (one interval apart) both find it suspect; a live
    worker has marked it ACTIVE and touches it long before then.
    """

    def __init__(self, redis: aioredis.Redis, name: str) -> None:
        super().__init__(redis, name=name)
        self._suspects: set[bytes] = set()

    async def sweep(self, lock: int = 60, abort: float = 5.0) -> list[str]:
        redis = self.redis
        if not await redis.set(self.namespace("sweep"), 1, nx=True, ex=lock):
            return []
        ids = await redis.lrange(self._active, 0, -1)  # type: ignore[misc]  # see _ping
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
                await redis.lrem(self._active, 0, job_id)  # type: ignore[misc]  # see _ping
                continue
            log.warning("task_swept", task_id=job.key, attempts=job.attempts)
            await self.abort(job, error=self.swept_error_message)
            with contextlib.suppress(TimeoutError):
                await job.refresh(abort)
            if job.retryable:
                await self.retry(job, error=self.swept_error_message)
            else:
                await self.finish(job, Status.ABORTED, error=self.swept_error_message)
        return [job_id.decode() for job_id in swept]


class RedisTaskBackend:
    """A TaskBackend on Redis through saq; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        queue: str = "sia",
        workers: int = 4,
        queue_limit: int = 1000,
        retention: float = 86400.0,
        job_timeout: float = 330.0,
        heartbeat: float = 20.0,
        max_attempts: int = 3,
        metrics: Metrics | None = None,
    ) -> None:
        self._url = url
        self.queue_name = queue
        self.workers = workers
        self.queue_limit = queue_limit
        self._retention = max(1, int(retention))
        self._job_timeout = max(1, int(job_timeout))
        self._heartbeat = max(1.0, heartbeat)
        self._max_attempts = max_attempts
        self._metrics = metrics
        self._redis: aioredis.Redis | None = None
        self._queue: _Queue | None = None
        self._worker: _Worker | None = None
        self._worker_task: asyncio.Task[None] | None = None
        self._runner: Runner | None = None
        self._draining = False
        self._closed = False

    @property
    def name(self) -> str:
        """Short name shown in metrics."""
        return "redis"

    def _key(self, kind: str, name: str) -> str:
        return f"sia:{self.queue_name}:{kind}:{name}"

    async def start(self, runner: Runner) -> None:
        """Connect, then start this replica's saq worker."""
        self._runner = runner
        self._redis = aioredis.from_url(self._url)
        try:
            await _ping(self._redis)
        except _FAULTS as exc:
            await self._redis.aclose()
            raise ConfigError(f"REDIS_URL: cannot reach Redis ({type(exc).__name__})") from exc
        self._queue = _Queue(self._redis, name=self.queue_name)
        await self._queue.connect()
        sweep = max(1, int(self._heartbeat / 2))
        self._worker = _Worker(
            self._queue,
            functions=[(FUNCTION, self._run_job)],
            concurrency=self.workers,
            timers={"schedule": 1, "worker_info": 10, "sweep": sweep, "abort": 1},
            dequeue_timeout=1.0,
        )
        self._worker_task = asyncio.create_task(self._worker.start(), name="sia-saq-worker")
        async with asyncio.timeout(10):  # saq resets its stop event as it starts: let it
            while not self._worker.tasks:  # noqa: ASYNC110 - saq signals no "started" event
                await asyncio.sleep(0)

    async def submit(self, request: GenerationRequest) -> Task:
        """Enqueue a job, or return the task already claimed for request.request_id."""
        if self._draining:
            raise ShuttingDown
        queue, redis = self._conn
        task_id = new_task_id()
        with store_errors(*_FAULTS):
            if request.request_id:
                claim = self._key("request", request.request_id)
                claimed = await redis.set(claim, task_id, nx=True, ex=self._retention * 2)
                if not claimed and (existing := await self._claimed_task(claim)) is not None:
                    return existing
                if not claimed:  # the claim outlived its task: take it over
                    await redis.set(claim, task_id, ex=self._retention * 2)
            if await queue.count("incomplete") >= self.queue_limit:
                if request.request_id:
                    await redis.delete(self._key("request", request.request_id))
                raise QueueFull(self.queue_limit)
            job = Job(
                function=FUNCTION,
                kwargs={"request": request_to_json(request)},
                key=task_id,
                timeout=self._job_timeout,
                heartbeat=int(self._heartbeat),
                retries=self._max_attempts,
                ttl=self._retention,
                retry_delay=1.0,
                retry_backoff=60.0,
            )
            enqueued = await queue.enqueue(job)
        if enqueued is None:  # pragma: no cover - a fresh random key cannot collide
            raise Unavailable("the task could not be queued; retry")
        return self._task(enqueued, cancelled=False)

    async def _claimed_task(self, claim: str) -> Task | None:
        """The task a request_id claim points at; waits out a winner still enqueuing."""
        _, redis = self._conn
        for _ in range(50):
            owner = await redis.get(claim)
            if owner is None:
                return None
            with contextlib.suppress(TaskNotFound):
                return await self.get(owner.decode())
            await asyncio.sleep(0.02)  # the claim's winner sets it just before enqueuing
        return None

    async def get(self, task_id: str) -> Task:
        """The task as stored in Redis (any replica's)."""
        queue, redis = self._conn
        with store_errors(*_FAULTS):
            raw_job, marker = await redis.mget(queue.job_id(task_id), self._key("cancel", task_id))
        job = queue.deserialize(raw_job) if raw_job else None
        if job is None:
            raise TaskNotFound(task_id)
        return self._task(job, cancelled=marker is not None)

    async def cancel(self, task_id: str) -> Task:
        """Abort a queued or running job; its replica stops running it within a second."""
        queue, redis = self._conn
        task = await self.get(task_id)
        if task.status.is_terminal:
            raise TaskNotCancellable(task_id, task.status.value)
        with store_errors(*_FAULTS):
            await redis.set(self._key("cancel", task_id), 1, ex=self._retention)
            job = await queue.job(task_id)
            if job is not None:
                await queue.abort(job, CANCELLED.message, ttl=self._job_timeout)
        self._count("task_outcomes", TaskStatus.CANCELLED.value)
        return await self.get(task_id)

    async def stats(self) -> TaskStats:
        """Queued and running counts (finished jobs only expire), and the queue's age."""
        queue, redis = self._conn
        with store_errors(*_FAULTS):
            queued = await queue.count("queued")
            running = await queue.count("active")
            oldest_id = await redis.lindex(queue.namespace("queued"), 0)  # type: ignore[misc]  # see _ping
            oldest = queue.deserialize(await redis.get(oldest_id)) if oldest_id else None
        age = max(0.0, time.time() - oldest.queued / 1000) if oldest and oldest.queued else 0.0
        return TaskStats({TaskStatus.QUEUED: queued, TaskStatus.RUNNING: running}, age)

    async def purge(self, finished_before: datetime) -> int:
        """Nothing to do: finished jobs expire by themselves after the retention period."""
        return 0

    async def ready(self) -> bool:
        """True while Redis answers."""
        if self._redis is None:
            return False
        try:
            return await _ping(self._redis)
        except _FAULTS:
            return False

    async def drain(self, grace: float) -> None:
        """Stop dequeuing; give running jobs `grace` s, then put them back in the queue."""
        if self._draining:
            return
        self._draining = True
        worker = self._worker
        if worker is None:
            return
        # saq's upkeep loops sleep between rounds: with the stop event set first, a
        # cancel ends them now instead of after `grace`.
        worker.event.set()
        for task in [t for t in worker.tasks if t.get_name() != "process"]:
            task.cancel()
        worker._shutdown_grace_period_s = grace  # type: ignore[assignment]  # saq reads it in stop()
        await worker.stop()
        if self._worker_task is not None:
            await asyncio.gather(self._worker_task, return_exceptions=True)

    async def aclose(self) -> None:
        """Drain without grace if nobody drained, then disconnect; idempotent."""
        if self._closed:
            return
        self._closed = True
        await self.drain(0)
        if self._queue is not None:
            with contextlib.suppress(*_FAULTS):
                await self._queue.disconnect()
        self._queue = self._redis = None

    async def _run_job(self, ctx: dict[str, Any], *, request: str) -> str:
        """saq job function: run one task, touching the job so the sweep knows we live."""
        job: Job = ctx["job"]
        _, redis = self._conn
        assert self._runner is not None
        if await redis.exists(self._key("cancel", job.key)):
            return ""  # cancelled while its previous replica ran it
        task = self._task(job, cancelled=False)
        beat = asyncio.create_task(self._touch(job))
        try:
            with bound_contextvars(task_id=job.key):
                stored = result_to_json(await self._runner(task))
        except Exception as exc:
            error = runner_failure(exc, task_id=job.key, attempt=job.attempts)
            job.meta["error"] = {"code": error.code, "message": error.message}
            if retryable(exc) and job.retryable:
                self._count("task_retries")
            else:
                job.retries = job.attempts  # not worth another attempt: saq marks it failed
                self._count("task_outcomes", TaskStatus.FAILED.value)
            raise
        finally:
            beat.cancel()
        self._count("task_outcomes", TaskStatus.SUCCEEDED.value)
        return stored

    async def _touch(self, job: Job) -> None:
        while True:
            await asyncio.sleep(self._heartbeat / 3)
            try:
                await job.update()
            except _FAULTS as exc:
                log.warning("task_heartbeat_failed", task_id=job.key, error=type(exc).__name__)

    def _task(self, job: Job, *, cancelled: bool) -> Task:
        status = TaskStatus.CANCELLED if cancelled else _STATUSES[job.status]
        error = None
        if status is TaskStatus.CANCELLED:
            error = CANCELLED
        elif status is TaskStatus.FAILED:
            error = _failure(job)
        result = None
        if status is TaskStatus.SUCCEEDED and job.result:
            result = result_from_json(job.result)
        created = _time(job.queued) or datetime.now(UTC)
        finished = _time(job.completed) if status.is_terminal else None
        updated = max(filter(None, (created, _time(job.started), _time(job.touched), finished)))
        return Task(
            id=job.key,
            request=request_from_json((job.kwargs or {})["request"]),
            status=status,
            created_at=created,
            updated_at=updated,
            finished_at=finished or (updated if status.is_terminal else None),
            result=result,
            error=error,
            attempts=job.attempts,
        )

    def _count(self, metric: str, *labels: str) -> None:
        if self._metrics is not None:
            getattr(self._metrics, metric).labels(self.name, *labels).inc()

    @property
    def _conn(self) -> tuple[_Queue, aioredis.Redis]:
        if self._queue is None or self._redis is None:
            raise RuntimeError("RedisTaskBackend is not started, or already closed")
        return self._queue, self._redis

    def __repr__(self) -> str:
        return f"RedisTaskBackend(queue={self.queue_name!r}, workers={self.workers})"


def _failure(job: Job) -> ImageError:
    """Why a job failed, as recorded by _run_job; saq's own error text is a traceback."""
    stored = job.meta.get("error")
    if isinstance(stored, dict):
        return ImageError(str(stored.get("code", INTERNAL.code)), str(stored.get("message", "")))
    if job.status is Status.ABORTED:
        return ABANDONED
    return INTERNAL


async def _ping(redis: aioredis.Redis) -> bool:
    # redis-py types each command for its sync and async clients at once.
    return bool(await redis.ping())  # type: ignore[misc]


def _time(millis: int) -> datetime | None:
    return datetime.fromtimestamp(millis / 1000, UTC) if millis else None
