"""The `sqlite` task backend: tasks in one SQLite file, run by in-process workers.

This is the embedded default for a single process. The table and the
statements that move a task through its states live in
`sia.tasks.sqlite_table`; this module owns the asyncio workers that claim
queued tasks and run them, and the drain that stops them. Tasks survive a
restart: whatever was queued or running when the process stopped is queued
again by the next `start()`, unless it has had `max_attempts` attempts: a
task that crashes its process, or is interrupted that often, fails as
ABANDONED rather than run (and be billed) again. An attempt after the first
makes a single upstream call (see `sia.providers.retry.upstream_call_limit`).

A running task's `progress` (the images it has so far) is its result until
its end replaces it. Watches are in-process (`sia.tasks.watchers`): every
write here that changes a task wakes its watchers, so watching costs no polling.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from structlog.contextvars import bound_contextvars

from sia.domain import Task, TaskStatus
from sia.errors import QueueFull, ShuttingDown, TaskNotCancellable, TaskNotFound, Unavailable
from sia.logs import get_logger
from sia.providers.retry import upstream_call_limit
from sia.tasks.codec import result_to_json
from sia.tasks.errors import INTERNAL, runner_failure, tell_abandoned
from sia.tasks.sqlite_table import TaskTable
from sia.tasks.watchers import Watchers

if TYPE_CHECKING:
    from datetime import datetime
    from pathlib import Path

    from sia.domain import GenerationRequest, GenerationResult, ImageError
    from sia.metrics import Metrics
    from sia.tasks.base import Abandoned, Runner, TaskStats
    from sia.tasks.watchers import Watch

log = get_logger(__name__)

#: An idle worker is woken to look for work this often even when no submit wakes one
#: (a safety net: every task this process queues wakes a worker itself).
_POLL_SECONDS = 1.0
#: How long drain() waits for runners to unwind after it cancels them.
_UNWIND_SECONDS = 5.0


class SqliteTaskBackend:
    """A TaskBackend on one SQLite file, with `workers` tasks running at once."""

    def __init__(
        self,
        path: Path,
        *,
        workers: int = 4,
        queue_limit: int = 1000,
        max_attempts: int = 3,
        metrics: Metrics | None = None,
    ) -> None:
        if workers < 1 or queue_limit < 1 or max_attempts < 1:
            raise ValueError("workers, queue_limit and max_attempts must be at least 1")
        self.path = path
        self.max_attempts = max_attempts
        self._metrics = metrics
        self.workers = workers
        self.queue_limit = queue_limit
        self._store: TaskTable | None = None
        # Wake-ups, one per queued task: each wakes one idle worker; those given while
        # every worker is busy wait for the next to go idle (more than one per worker
        # would only add claims that find nothing). A worker that finishes a task
        # claims the next without one.
        self._nudges: asyncio.Queue[None] = asyncio.Queue(maxsize=workers)
        self._worker_tasks: list[asyncio.Task[None]] = []
        self._idle = 0  # workers waiting for a wake-up
        self._poller: asyncio.Task[None] | None = None
        self._running: dict[str, asyncio.Task[str]] = {}
        self._client_cancelled: set[str] = set()
        self._draining = False
        self._drained = asyncio.Event()
        self._closed = False
        self._watchers = Watchers()
        self._on_abandoned: Abandoned | None = None

    @property
    def name(self) -> str:
        """Short name shown in metrics."""
        return "sqlite"

    async def start(self, runner: Runner, *, on_abandoned: Abandoned | None = None) -> None:
        """Open the file, queue again what a previous process left running, start workers."""
        if self._store is not None or self._closed:
            raise RuntimeError("SqliteTaskBackend.start() may be called once")
        self._on_abandoned = on_abandoned
        self._store = await TaskTable.open(self.path)
        await self._requeue(None)
        self._worker_tasks = [
            asyncio.create_task(self._work(runner), name=f"sia-task-worker-{i}")
            for i in range(self.workers)
        ]
        self._poller = asyncio.create_task(self._poll(), name="sia-task-poller")

    async def submit(self, request: GenerationRequest, *, owner: str = "") -> Task:
        """Queue a new task of `owner`, or return the one `owner` stored for request.request_id."""
        if self._draining:
            raise ShuttingDown
        table, request_id = self._table, request.request_id
        if request_id and (existing := await table.by_request_id(request_id, owner=owner)):
            return existing
        task = await table.insert(request, owner=owner, limit=self.queue_limit)
        if task is None:
            # A concurrent submit with the same request_id may have won its unique index.
            if request_id and (winner := await table.by_request_id(request_id, owner=owner)):
                return winner
            raise QueueFull(self.queue_limit)
        self._watchers.notify(task.id)
        self._nudge()
        return task

    async def list(
        self,
        owner: str,
        *,
        status: TaskStatus | None = None,
        limit: int = 20,
        after: str = "",
    ) -> tuple[list[Task], str]:
        """`owner`'s tasks (or those in `status`) newest first, and the next page's cursor.

        A full page of `limit` is returned whenever that many tasks follow
        `after`; the cursor is "" on the last page.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        return await self._table.list(owner, status=status, limit=limit, after=after)

    async def get(self, task_id: str) -> Task:
        """The stored task; raises TaskNotFound."""
        task = await self._table.get(task_id)
        if task is None:
            raise TaskNotFound(task_id)
        return task

    async def cancel(self, task_id: str) -> Task:
        """Mark a queued or running task CANCELLED, stopping its runner if it is ours."""
        task = await self._table.cancel(task_id)
        if task is None:
            current = await self.get(task_id)
            raise TaskNotCancellable(task_id, current.status.value)
        self._count_outcome(TaskStatus.CANCELLED)
        self._watchers.notify(task_id)
        if job := self._running.get(task_id):
            self._client_cancelled.add(task_id)
            job.cancel()
        return task

    async def progress(self, task_id: str, result: GenerationResult, *, attempt: int) -> None:
        """Store a RUNNING task's images so far and wake its watchers; nothing otherwise.

        Best effort: a store fault is logged, not raised, so that it never
        fails the generation (the final result is written as usual).
        """
        stored = result_to_json(result)
        try:
            changed = await self._table.progress(task_id, stored, attempt)
        except Unavailable:
            log.warning("task_progress_lost", task_id=task_id)
            return
        if changed:
            self._watchers.notify(task_id)

    def watch(self, task_id: str) -> Watch:
        """A subscription to changes of `task_id`, woken in-process by every write here."""
        return self._watchers.watch(task_id)

    async def stats(self) -> TaskStats:
        """How many tasks are in each status (zeros included) and the oldest queued one's age."""
        return await self._table.stats()

    async def purge(self, finished_before: datetime) -> int:
        """Delete finished tasks whose finished_at is before `finished_before`."""
        return await self._table.purge(finished_before)

    async def ready(self) -> bool:
        """True while the database answers a trivial query."""
        return self._store is not None and await self._store.ping()

    async def drain(self, grace: float) -> None:
        """Stop claiming; give running tasks `grace` s, then cancel and requeue them."""
        if self._draining:  # a second caller waits for the first drain to end
            await self._drained.wait()
            return
        self._draining = True
        for _ in range(self.workers):
            self._nudge()  # idle workers wake, see the flag and leave
        try:
            await self._drain(grace)
        finally:
            self._drained.set()

    async def _drain(self, grace: float) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        workers = self._worker_tasks
        if workers:
            await asyncio.wait(workers, timeout=grace)  # busy ones leave after their task
        for job in self._running.values():
            job.cancel()  # their workers see `_draining` and requeue them
        if workers:
            _, stuck = await asyncio.wait(workers, timeout=_UNWIND_SECONDS)
            for worker in stuck:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        for task_id in list(self._running):  # left by workers cancelled before they could requeue
            log.warning("task_abandoned", task_id=task_id)
            # Still RUNNING in the file if this fails: the next start() requeues it then.
            with contextlib.suppress(Unavailable):
                await self._requeue(task_id)
            del self._running[task_id]
        self._client_cancelled.clear()

    async def aclose(self) -> None:
        """Drain without grace if nobody drained, then close the database."""
        if self._closed:
            return
        self._closed = True
        await self.drain(0)
        if self._store is not None:
            await self._store.close()
            self._store = None

    def _nudge(self) -> None:
        """Wake one idle worker to look for work (or the next worker to go idle)."""
        with contextlib.suppress(asyncio.QueueFull):
            self._nudges.put_nowait(None)

    async def _poll(self) -> None:
        """Every _POLL_SECONDS, give idle workers one look for work (see `_poke`)."""
        while True:
            await asyncio.sleep(_POLL_SECONDS)
            self._poke()

    def _poke(self) -> None:
        """Wake one idle worker, unless a wake-up is already on its way.

        A safety net for rows no submit of ours announced (another process's,
        or a previous one's): one look per interval in all, because idle
        workers that each polled would cost the event loop a claim apiece.
        """
        if self._idle and self._nudges.empty():
            self._nudge()

    async def _work(self, runner: Runner) -> None:
        """Claim and run tasks one at a time until drain() begins."""
        while not self._draining:
            try:
                task = await self._table.claim()
                if task is None:
                    self._idle += 1
                    try:
                        await self._nudges.get()  # a submit, the poller, or drain()
                    finally:
                        self._idle -= 1
                    continue
                if self._draining:
                    await self._table.unclaim(task.id)
                    self._watchers.notify(task.id)
                    return
                self._watchers.notify(task.id)
                await self._run(task, runner)
            except Exception:
                log.exception("task_worker_error")
                await asyncio.sleep(_POLL_SECONDS)

    async def _requeue(self, task_id: str | None) -> None:
        """Queue a RUNNING task (all, for None) again, or fail it once out of attempts."""
        requeued, abandoned = await self._table.requeue(task_id, max_attempts=self.max_attempts)
        if task_id is None:
            self._watchers.notify_all()
        else:
            self._watchers.notify(task_id)
        if requeued and task_id is None:
            log.info("tasks_requeued", count=requeued)
        if abandoned:
            log.error("tasks_abandoned", count=len(abandoned), max_attempts=self.max_attempts)
            for task in abandoned:
                self._count_outcome(TaskStatus.FAILED)
                await tell_abandoned(self._on_abandoned, task)

    async def _run(self, task: Task, runner: Runner) -> None:
        # A later attempt may follow a call that was billed: it gets one call, no retries.
        calls = None if task.attempts <= 1 else 1
        with bound_contextvars(task_id=task.id), upstream_call_limit(calls):
            job = asyncio.create_task(_run_to_json(runner, task), name=f"sia-{task.id}")
            self._running[task.id] = job
            try:
                await asyncio.wait({job})
            except asyncio.CancelledError:
                job.cancel()
                raise  # drain() requeues what is left in self._running
            del self._running[task.id]
            await self._settle(task, job)

    async def _settle(self, task: Task, job: asyncio.Task[str]) -> None:
        """Store how `job` ended; a no-op unless the task is still RUNNING."""
        if task.id in self._client_cancelled:
            self._client_cancelled.discard(task.id)  # cancel() already stored CANCELLED
            return
        if job.cancelled():
            if self._draining:
                await self._requeue(task.id)
                return
            log.error("task_failed", code=INTERNAL.code, reason="runner cancelled")
            await self._finish(task.id, TaskStatus.FAILED, None, INTERNAL)
            return
        exc = job.exception()
        if exc is None:
            await self._finish(task.id, TaskStatus.SUCCEEDED, job.result(), None)
        else:
            await self._finish(task.id, TaskStatus.FAILED, None, runner_failure(exc))

    async def _finish(
        self, task_id: str, status: TaskStatus, result: str | None, error: ImageError | None
    ) -> None:
        if await self._table.finish(task_id, status, result, error):
            self._count_outcome(status)
            self._watchers.notify(task_id)

    def _count_outcome(self, status: TaskStatus) -> None:
        if self._metrics is not None:
            self._metrics.task_outcomes.labels(self.name, status.value).inc()

    @property
    def _table(self) -> TaskTable:
        if self._store is None:
            raise RuntimeError("SqliteTaskBackend is not started, or already closed")
        return self._store

    def __repr__(self) -> str:
        return f"SqliteTaskBackend(path={str(self.path)!r}, workers={self.workers})"


async def _run_to_json(runner: Runner, task: Task) -> str:
    """Run `task` and return its result in stored form."""
    return result_to_json(await runner(task))
