"""The `redis` task backend: tasks shared by every replica through saq on Redis.

Each replica runs a saq worker on its own event loop next to the gRPC server.
A task is one saq job whose key is the task id, so any replica can answer for
any task with one Redis round trip. The job carries the request; its result is
the stored result (image bytes live in the blob store, never in Redis);
`sia.tasks.redis_jobs` reads a job as a task.

- Owners: a job's `meta["owner"]` names who submitted it (an API key's name;
  "" without access control).
- Idempotency: saq de-duplicates a key only while its job is unfinished, so a
  `request_id` is claimed per owner with `SET NX` for twice the retention
  period (-> task id): `sia:<queue>:request:<request_id>` for owner "" (the
  key it had before owners), `sia:<queue>:owner-request:<len(owner)>:<owner>:<request_id>`
  for the others; the length prefix keeps any two pairs apart.
- Listing: see `sia.tasks.redis_index`; each submit adds the task to its
  owner's index, which a listing pages through newest first.
- Crashes: a running job is touched every `heartbeat / 3` seconds; the sweep
  of any live replica (every `heartbeat / 2` seconds) re-queues a job whose
  replica stopped touching it, up to `max_attempts` attempts in all, so a
  dead replica's task runs elsewhere within about 1.5 heartbeats. Delivery
  is therefore at least once: after a crash an upstream call may be repeated.
- Attempts: a task interrupted `max_attempts` times (its replica died, or
  drained) fails as ABANDONED, unrun: the replica that dequeues it next (after a
  drain) or whose sweep finds it (after a crash) stores it FAILED, then tells
  `on_abandoned` (see `sia.tasks.redis_queue`). A runner failure ends the task: the provider
  has already retried what another call may fix, and an attempt after the
  first makes a single upstream call (`upstream_call_limit`), so billed calls
  per task stay under one cap.
- Outages: see `sia.tasks.redis_queue`; calls fail fast (`Unavailable`)
  while Redis is down, and `start` checks that Redis persists its data.
- Cancellation: saq's abort, plus a marker key so that a cancelled task stays
  cancelled even if its replica died while running it.
- Retention: finished jobs expire after the retention period (saq's job TTL).
- Progress: a running task's images so far live in
  `sia:<queue>:progress:<task_id>` as "<attempt>:<time ms>:<result JSON>";
  a task shows them (and their time as its updated_at) only while RUNNING
  in that same attempt, so neither its end nor a re-run needs to delete
  them (they expire with the retention period).
- Watches: every change is announced to every replica, which wakes its own
  watchers of the task; see `sia.tasks.redis_events`.

redis-py's and saq's exceptions never leave this module: Redis being down
becomes `Unavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from saq import Job, Status
from structlog.contextvars import bound_contextvars

from sia.domain import Task, TaskStatus, new_task_id
from sia.errors import (
    ConfigError,
    QueueFull,
    ShuttingDown,
    TaskNotCancellable,
    TaskNotFound,
    Unavailable,
)
from sia.logs import get_logger
from sia.providers.retry import upstream_call_limit
from sia.tasks.base import TaskStats
from sia.tasks.codec import request_to_json, result_to_json
from sia.tasks.errors import (
    CANCELLED,
    abandoned,
    runner_failure,
    store_errors,
    tell_abandoned,
)
from sia.tasks.redis_events import TaskEvents
from sia.tasks.redis_index import OwnerIndex
from sia.tasks.redis_jobs import task_of
from sia.tasks.redis_queue import FAULTS as _FAULTS
from sia.tasks.redis_queue import JobQueue, JobWorker, check_persistence, ping
from sia.tasks.watchers import Watchers

if TYPE_CHECKING:
    from collections.abc import Sequence
    from datetime import datetime

    from sia.domain import GenerationRequest, GenerationResult
    from sia.metrics import Metrics
    from sia.tasks.base import Abandoned, Runner
    from sia.tasks.watchers import Watch

log = get_logger("sia.tasks.redis")

FUNCTION = "run_task"
#: How long `ready()` waits for PING before it answers False.
READY_TIMEOUT = 1.0
#: A call fails within about a second when Redis is down (redis-py's default retries
#: wait up to 7 s), so a submit answers UNAVAILABLE rather than hang.
_CLIENT_OPTIONS: dict[str, Any] = {
    "socket_connect_timeout": 1.0,
    "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.2), retries=2),
}


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
        require_persistence: bool = False,
        metrics: Metrics | None = None,
    ) -> None:
        self._url = url
        self._require_persistence = require_persistence
        self.queue_name = queue
        self.workers = workers
        self.queue_limit = queue_limit
        self._retention = max(1, int(retention))
        self._job_timeout = max(1, int(job_timeout))
        self._heartbeat = max(1.0, heartbeat)
        self._max_attempts = max_attempts
        self._metrics = metrics
        self._owners = OwnerIndex(queue, kept=self._retention * 2)
        self._redis: aioredis.Redis | None = None
        self._queue: JobQueue | None = None
        self._worker: JobWorker | None = None
        self._worker_task: asyncio.Task[None] | None = None
        self._runner: Runner | None = None
        self._on_abandoned: Abandoned | None = None
        self._watchers = Watchers()
        self._events: TaskEvents | None = None
        self._draining = False
        self._closed = False

    @property
    def name(self) -> str:
        """Short name shown in metrics."""
        return "redis"

    def _key(self, kind: str, name: str) -> str:
        return f"sia:{self.queue_name}:{kind}:{name}"

    async def start(self, runner: Runner, *, on_abandoned: Abandoned | None = None) -> None:
        """Connect, check persistence, subscribe to task changes, then start this
        replica's saq worker."""
        self._runner, self._on_abandoned = runner, on_abandoned
        self._redis = aioredis.from_url(self._url, **_CLIENT_OPTIONS)
        queue = JobQueue(self._redis, name=self.queue_name, on_abandoned=self._abandoned)
        events = TaskEvents(self._redis, queue.changes_channel, self._watchers)
        try:
            await ping(self._redis)
            await check_persistence(self._redis, required=self._require_persistence)
            await events.start()
        except (*_FAULTS, ConfigError) as exc:
            await self._redis.aclose()
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"REDIS_URL: cannot reach Redis ({type(exc).__name__})") from exc
        self._queue, self._events = queue, events
        await self._queue.connect()
        sweep = max(1, int(self._heartbeat / 2))
        self._worker = JobWorker(
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

    async def submit(self, request: GenerationRequest, *, owner: str = "") -> Task:
        """Enqueue a job of `owner`, or return the task `owner` claimed request.request_id for."""
        if self._draining:
            raise ShuttingDown
        queue, redis = self._conn
        task_id = new_task_id()
        claim = self._claim_key(owner, request.request_id) if request.request_id else ""
        with store_errors(*_FAULTS):
            if claim:
                claimed = await redis.set(claim, task_id, nx=True, ex=self._retention * 2)
                if not claimed and (existing := await self._claimed_task(claim)) is not None:
                    return existing
                if not claimed:  # the claim outlived its task: take it over
                    await redis.set(claim, task_id, ex=self._retention * 2)
            if await queue.count("incomplete") >= self.queue_limit:
                if claim:
                    await redis.delete(claim)
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
                meta={"owner": owner},
            )
            enqueued = await queue.enqueue(job)
            if enqueued is None:  # pragma: no cover - a fresh random key cannot collide
                raise Unavailable("the task could not be queued; retry")
            await self._owners.add(redis, owner, task_id, enqueued.queued)
        await queue.announce(task_id)
        return task_of(enqueued, cancelled=False)

    def _claim_key(self, owner: str, request_id: str) -> str:
        """The key claiming `request_id` for `owner` (see the module docstring)."""
        if not owner:
            return self._key("request", request_id)
        return self._key("owner-request", f"{len(owner)}:{owner}:{request_id}")

    async def _claimed_task(self, claim: str) -> Task | None:
        """The task a request_id claim points at; waits out a winner still enqueuing."""
        _, redis = self._conn
        for _ in range(50):
            task_id = await redis.get(claim)
            if task_id is None:
                return None
            with contextlib.suppress(TaskNotFound):
                return await self.get(task_id.decode())
            await asyncio.sleep(0.02)  # the claim's winner sets it just before enqueuing
        return None

    async def list(
        self,
        owner: str,
        *,
        status: TaskStatus | None = None,
        limit: int = 20,
        after: str = "",
    ) -> tuple[list[Task], str]:
        """`owner`'s tasks (or those in `status`) newest first, and the next page's cursor.

        Reads at most max(LIST_SCAN, limit) entries of the owner's index (see
        `sia.tasks.redis_index`): a page may hold fewer than `limit` tasks
        while the cursor is not "". The cursor holds the (score, id) of the
        last entry read.
        """
        _, redis = self._conn
        with store_errors(*_FAULTS):
            return await self._owners.page(
                redis, owner, self._listed, status=status, limit=limit, after=after
            )

    async def _listed(self, ids: Sequence[str]) -> Sequence[Task | None]:
        """The tasks of `ids`, in one MGET; None for each whose job has expired."""
        queue, redis = self._conn
        if not ids:
            return []
        n = len(ids)
        values = await redis.mget(
            *(queue.job_id(task_id) for task_id in ids),
            *(self._key("cancel", task_id) for task_id in ids),
            *(self._key("progress", task_id) for task_id in ids),
        )
        jobs = [queue.deserialize(raw) if raw else None for raw in values[:n]]
        return [
            None if job is None else task_of(job, cancelled=marker is not None, progress=partial)
            for job, marker, partial in zip(jobs, values[n : 2 * n], values[2 * n :], strict=True)
        ]

    async def get(self, task_id: str) -> Task:
        """The task as stored in Redis (any replica's)."""
        queue, redis = self._conn
        with store_errors(*_FAULTS):
            raw_job, marker, partial = await redis.mget(
                queue.job_id(task_id), self._key("cancel", task_id), self._key("progress", task_id)
            )
        job = queue.deserialize(raw_job) if raw_job else None
        if job is None:
            raise TaskNotFound(task_id)
        return task_of(job, cancelled=marker is not None, progress=partial)

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
        await queue.announce(task_id)
        self._count("task_outcomes", TaskStatus.CANCELLED.value)
        return await self.get(task_id)

    async def progress(self, task_id: str, result: GenerationResult, *, attempt: int) -> None:
        """Store a RUNNING task's images so far and announce the change; nothing otherwise.

        Best effort: a Redis fault is logged, not raised, so that it never
        fails the generation (the final result is written as usual).
        """
        queue, redis = self._conn
        stored = result_to_json(result)
        try:
            raw_job, marker = await redis.mget(queue.job_id(task_id), self._key("cancel", task_id))
            job = queue.deserialize(raw_job) if raw_job else None
            if job is None or marker is not None or job.status is not Status.ACTIVE:
                return
            if job.attempts != attempt:  # a stale run, the sweep having re-queued its job
                return
            # Tagged with the attempt: a later attempt of the task never shows this one's.
            value = f"{job.attempts}:{int(time.time() * 1000)}:{stored}"
            await redis.set(self._key("progress", task_id), value, ex=self._retention)
        except _FAULTS as exc:
            log.warning("task_progress_lost", task_id=task_id, error=type(exc).__name__)
            return
        await queue.announce(task_id)

    def watch(self, task_id: str) -> Watch:
        """A subscription to changes of `task_id` made by any replica (see redis_events)."""
        return self._watchers.watch(task_id)

    async def stats(self) -> TaskStats:
        """Queued and running counts (finished jobs only expire), and the queue's age."""
        queue, redis = self._conn
        with store_errors(*_FAULTS):
            queued = await queue.count("queued")
            running = await queue.count("active")
            oldest_id = await redis.lindex(queue.namespace("queued"), 0)  # type: ignore[misc]  # see redis_queue.ping
            oldest = queue.deserialize(await redis.get(oldest_id)) if oldest_id else None
        age = max(0.0, time.time() - oldest.queued / 1000) if oldest and oldest.queued else 0.0
        return TaskStats({TaskStatus.QUEUED: queued, TaskStatus.RUNNING: running}, age)

    async def purge(self, finished_before: datetime) -> int:
        """Nothing to do: finished jobs expire by themselves after the retention period."""
        return 0

    async def ready(self) -> bool:
        """True while Redis answers, within READY_TIMEOUT."""
        if self._redis is None:
            return False
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                return await ping(self._redis)
        except (*_FAULTS, TimeoutError):
            return False

    async def drain(self, grace: float) -> None:
        """Stop dequeuing; give running jobs `grace` s, then put them back in the queue."""
        if self._draining:
            return
        self._draining = True
        if self._queue is not None:
            self._queue.closing = True
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
        if self._events is not None:
            await self._events.aclose()
            self._events = None
        if self._queue is not None:
            with contextlib.suppress(*_FAULTS):
                await self._queue.disconnect()
        self._queue = self._redis = None

    async def _run_job(self, ctx: dict[str, Any], *, request: str) -> str:
        """saq job function: run one task, touching the job so the sweep knows we live."""
        job: Job = ctx["job"]
        queue, redis = self._conn
        assert self._runner is not None
        if await redis.exists(self._key("cancel", job.key)):
            return ""  # cancelled while its previous replica ran it
        if job.attempts > self._max_attempts:  # saq re-queues a drained job regardless
            job.retries = job.attempts  # saq marks it failed; the queue tells _abandoned
            error = abandoned(job.attempts - 1)
            job.meta["error"] = {"code": error.code, "message": error.message}
            raise _Abandoned(error.message)
        if job.attempts > 1:
            self._count("task_retries")
        await queue.announce(job.key)  # saq has stored it ACTIVE: RUNNING
        task = task_of(job, cancelled=False)
        beat = asyncio.create_task(self._touch(job))
        # A later attempt may follow a call that was billed: it gets one call, no retries.
        calls = None if job.attempts <= 1 else 1
        try:
            with bound_contextvars(task_id=job.key), upstream_call_limit(calls):
                stored = result_to_json(await self._runner(task))
        except Exception as exc:
            error = runner_failure(exc, task_id=job.key, attempt=job.attempts)
            job.meta["error"] = {"code": error.code, "message": error.message}
            job.retries = job.attempts  # the provider retried already: saq marks it failed
            self._count("task_outcomes", TaskStatus.FAILED.value)
            raise
        finally:
            beat.cancel()
        self._count("task_outcomes", TaskStatus.SUCCEEDED.value)
        return stored

    async def _abandoned(self, job: Job) -> None:
        """Told by the queue of a job it has just stored failed ABANDONED: this replica
        failed it, after drains (`_run_job`) or in its sweep (after a crash)."""
        cancelled = False
        if self._redis is not None:
            with contextlib.suppress(*_FAULTS):  # unknown: it was abandoned all the same
                cancelled = bool(await self._redis.exists(self._key("cancel", job.key)))
        task = task_of(job, cancelled=cancelled)
        if task.status is not TaskStatus.FAILED:  # cancelled as the sweep found it
            return
        message = task.error.message if task.error else ""
        log.error("task_abandoned", task_id=task.id, detail=message)
        self._count("task_outcomes", TaskStatus.FAILED.value)
        await tell_abandoned(self._on_abandoned, task)

    async def _touch(self, job: Job) -> None:
        while True:
            await asyncio.sleep(self._heartbeat / 3)
            try:
                await job.update()
            except _FAULTS as exc:
                log.warning("task_heartbeat_failed", task_id=job.key, error=type(exc).__name__)

    def _count(self, metric: str, *labels: str) -> None:
        if self._metrics is not None:
            getattr(self._metrics, metric).labels(self.name, *labels).inc()

    @property
    def _conn(self) -> tuple[JobQueue, aioredis.Redis]:
        if self._queue is None or self._redis is None:
            raise RuntimeError("RedisTaskBackend is not started, or already closed")
        return self._queue, self._redis

    def __repr__(self) -> str:
        return f"RedisTaskBackend(queue={self.queue_name!r}, workers={self.workers})"


class _Abandoned(Exception):
    """Raised to make saq fail a job that has used up its attempts."""
