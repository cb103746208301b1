"""The `sqlite` task backend: tasks in one SQLite file, run by in-process workers.

This is the embedded default for a single process. It owns the `tasks` table
(schema, WAL settings, and the queries that move a task through its states)
and the asyncio workers that claim queued tasks and run them. Tasks survive a
restart: whatever was queued or running when the process stopped is queued
again by the next `start()`.

One aiosqlite connection in autocommit mode serves the whole backend; every
state change is a single statement, so no transaction spans an `await`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from typing import TYPE_CHECKING

import aiosqlite
from structlog.contextvars import bound_contextvars

from sia.domain import ImageError, Task, TaskStatus, new_task_id, utcnow
from sia.errors import (
    ConfigError,
    QueueFull,
    ShuttingDown,
    SiaError,
    TaskNotCancellable,
    TaskNotFound,
    Unavailable,
)
from sia.logs import get_logger
from sia.tasks.base import TaskStats
from sia.tasks.codec import (
    from_iso,
    request_from_json,
    request_to_json,
    result_from_json,
    result_to_json,
    to_iso,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from datetime import datetime
    from pathlib import Path

    from sia.domain import GenerationRequest
    from sia.metrics import Metrics
    from sia.tasks.base import Runner

log = get_logger(__name__)

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id            TEXT PRIMARY KEY,
    request_id    TEXT NOT NULL DEFAULT '',
    status        TEXT NOT NULL,
    request       TEXT NOT NULL,
    result        TEXT,
    error_code    TEXT,
    error_message TEXT,
    attempts      INTEGER NOT NULL DEFAULT 0,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    finished_at   TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS tasks_request_id ON tasks (request_id) WHERE request_id != '';
CREATE INDEX IF NOT EXISTS tasks_status_created ON tasks (status, created_at);
CREATE INDEX IF NOT EXISTS tasks_finished ON tasks (finished_at);
"""
_INSERT = """
INSERT INTO tasks (id, request_id, status, request, attempts, created_at, updated_at)
SELECT ?, ?, 'queued', ?, 0, ?, ?
WHERE (SELECT count(*) FROM tasks WHERE status IN ('queued', 'running')) < ?
RETURNING *
"""
_CLAIM = """
UPDATE tasks SET status = 'running', attempts = attempts + 1, updated_at = ?
WHERE id = (SELECT id FROM tasks WHERE status = 'queued' ORDER BY created_at, rowid LIMIT 1)
RETURNING *
"""
_FINISH = """
UPDATE tasks SET status = ?, result = ?, error_code = ?, error_message = ?,
    updated_at = ?, finished_at = ?
WHERE id = ? AND status = 'running'
"""
_CANCEL = """
UPDATE tasks SET status = 'cancelled', error_code = ?, error_message = ?,
    updated_at = ?, finished_at = ?
WHERE id = ? AND status IN ('queued', 'running')
RETURNING *
"""
_REQUEUE_ALL = "UPDATE tasks SET status = 'queued', updated_at = ? WHERE status = 'running'"
_REQUEUE_ONE = f"{_REQUEUE_ALL} AND id = ?"

_CANCELLED = ImageError("CANCELLED", "cancelled by the client")
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
        metrics: Metrics | None = None,
    ) -> None:
        if workers < 1 or queue_limit < 1:
            raise ValueError("workers and queue_limit must be at least 1")
        self.path = path
        self._metrics = metrics
        self.workers = workers
        self.queue_limit = queue_limit
        self._db: aiosqlite.Connection | None = None
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

    @property
    def name(self) -> str:
        """Short name shown in metrics."""
        return "sqlite"

    async def start(self, runner: Runner) -> None:
        """Open the file, queue again what a previous process left running, start workers."""
        if self._db is not None or self._closed:
            raise RuntimeError("SqliteTaskBackend.start() may be called once")
        self._db = await self._open()
        requeued = await self._execute(_REQUEUE_ALL, (to_iso(utcnow()),))
        if requeued:
            log.info("tasks_requeued", count=requeued)
        self._worker_tasks = [
            asyncio.create_task(self._work(runner), name=f"sia-task-worker-{i}")
            for i in range(self.workers)
        ]
        self._poller = asyncio.create_task(self._poll(), name="sia-task-poller")

    async def _open(self) -> aiosqlite.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(self.path, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the task database {self.path}: {exc}") from exc
        try:
            db.row_factory = aiosqlite.Row
            await db.execute("PRAGMA busy_timeout = 5000")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = NORMAL")
            (version,) = next(iter(await db.execute_fetchall("PRAGMA user_version")))
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"the task database {self.path} has schema {version}; "
                    f"this version of sia knows only up to {SCHEMA_VERSION}"
                )
            await db.executescript(
                f"BEGIN; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            )
        except BaseException as exc:
            await db.close()
            if isinstance(exc, sqlite3.Error):
                raise ConfigError(f"cannot use the task database {self.path}: {exc}") from exc
            raise
        return db

    async def submit(self, request: GenerationRequest) -> Task:
        """Queue a new task, or return the one already stored for request.request_id."""
        if self._draining:
            raise ShuttingDown
        with _store_errors():
            if request.request_id and (existing := await self._by_request_id(request.request_id)):
                return existing
            now = to_iso(utcnow())
            params = (
                new_task_id(),
                request.request_id,
                request_to_json(request),
                now,
                now,
                self.queue_limit,
            )
            try:
                row = await self._fetch_one(_INSERT, params)
            except sqlite3.IntegrityError:
                # A concurrent submit with the same request_id won the unique index.
                if winner := await self._by_request_id(request.request_id):
                    return winner
                raise
        if row is None:
            raise QueueFull(self.queue_limit)
        self._nudge()
        return _task_from_row(row)

    async def get(self, task_id: str) -> Task:
        """The stored task; raises TaskNotFound."""
        with _store_errors():
            row = await self._fetch_one("SELECT * FROM tasks WHERE id = ?", (task_id,))
        if row is None:
            raise TaskNotFound(task_id)
        return _task_from_row(row)

    async def cancel(self, task_id: str) -> Task:
        """Mark a queued or running task CANCELLED, stopping its runner if it is ours."""
        now = to_iso(utcnow())
        with _store_errors():
            row = await self._fetch_one(
                _CANCEL, (_CANCELLED.code, _CANCELLED.message, now, now, task_id)
            )
        if row is None:
            task = await self.get(task_id)
            raise TaskNotCancellable(task_id, task.status.value)
        self._count_outcome(TaskStatus.CANCELLED)
        if job := self._running.get(task_id):
            self._client_cancelled.add(task_id)
            job.cancel()
        return _task_from_row(row)

    async def stats(self) -> TaskStats:
        """How many tasks are in each status (zeros included) and the oldest queued one's age."""
        counts = dict.fromkeys(TaskStatus, 0)
        with _store_errors():
            rows = await self._conn.execute_fetchall(
                "SELECT status, count(*) FROM tasks GROUP BY status"
            )
            oldest = await self._fetch_one(
                "SELECT min(created_at) FROM tasks WHERE status = 'queued'", ()
            )
        for status, count in rows:
            counts[TaskStatus(status)] = count
        age = 0.0
        if oldest is not None and oldest[0] is not None:
            age = max(0.0, (utcnow() - from_iso(oldest[0])).total_seconds())
        return TaskStats(counts, age)

    async def purge(self, finished_before: datetime) -> int:
        """Delete finished tasks whose finished_at is before `finished_before`."""
        with _store_errors():
            return await self._execute(
                "DELETE FROM tasks WHERE finished_at < ? "
                "AND status IN ('succeeded', 'failed', 'cancelled')",
                (to_iso(finished_before),),
            )

    async def ready(self) -> bool:
        """True while the database answers a trivial query."""
        if self._db is None:
            return False
        try:
            await self._db.execute_fetchall("SELECT 1")
        except sqlite3.Error:
            return False
        return True

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
            await self._requeue(task_id)
            del self._running[task_id]
        self._client_cancelled.clear()

    async def aclose(self) -> None:
        """Drain without grace if nobody drained, then close the database."""
        if self._closed:
            return
        self._closed = True
        await self.drain(0)
        if self._db is not None:
            await self._db.close()
            self._db = None

    def _nudge(self) -> None:
        """Wake one idle worker to look for work (or the next worker to go idle)."""
        with contextlib.suppress(asyncio.QueueFull):
            self._nudges.put_nowait(None)

    async def _poll(self) -> None:
        """Wake one idle worker every _POLL_SECONDS, unless a wake-up is already on its way.

        A safety net, one look per interval in all: every task this process
        queues wakes a worker itself, and a worker that finds nothing waits
        for a wake-up instead of polling (sixteen idle workers polling each
        second were in 1.7 % of a busy server's event-loop samples, and every
        submit woke all of them).
        """
        while True:
            await asyncio.sleep(_POLL_SECONDS)
            if self._idle and self._nudges.empty():
                self._nudge()

    async def _work(self, runner: Runner) -> None:
        """Claim and run tasks one at a time until drain() begins."""
        while not self._draining:
            try:
                row = await self._fetch_one(_CLAIM, (to_iso(utcnow()),))
                if row is None:
                    self._idle += 1
                    try:
                        await self._nudges.get()  # a submit, the poller, or drain()
                    finally:
                        self._idle -= 1
                    continue
                task = _task_from_row(row)
                if self._draining:
                    await self._requeue(task.id)
                    return
                await self._run(task, runner)
            except Exception:
                log.exception("task_worker_error")
                await asyncio.sleep(_POLL_SECONDS)

    async def _run(self, task: Task, runner: Runner) -> None:
        with bound_contextvars(task_id=task.id):
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
            error = ImageError("INTERNAL", "internal error")
            log.error("task_failed", code=error.code, reason="runner cancelled")
            await self._finish(task.id, TaskStatus.FAILED, None, error)
            return
        exc = job.exception()
        if exc is None:
            await self._finish(task.id, TaskStatus.SUCCEEDED, job.result(), None)
        elif isinstance(exc, SiaError):
            log.info("task_failed", code=exc.reason, message=exc.message)
            await self._finish(
                task.id, TaskStatus.FAILED, None, ImageError(exc.reason, exc.message)
            )
        else:
            log.error("task_failed", code="INTERNAL", exc_info=exc)
            error = ImageError("INTERNAL", "internal error")
            await self._finish(task.id, TaskStatus.FAILED, None, error)

    async def _finish(
        self, task_id: str, status: TaskStatus, result: str | None, error: ImageError | None
    ) -> None:
        now = to_iso(utcnow())
        code, message = (error.code, error.message) if error else (None, None)
        if await self._execute(_FINISH, (status.value, result, code, message, now, now, task_id)):
            self._count_outcome(status)

    def _count_outcome(self, status: TaskStatus) -> None:
        if self._metrics is not None:
            self._metrics.task_outcomes.labels(self.name, status.value).inc()

    async def _requeue(self, task_id: str) -> None:
        await self._execute(_REQUEUE_ONE, (to_iso(utcnow()), task_id))

    async def _by_request_id(self, request_id: str) -> Task | None:
        row = await self._fetch_one("SELECT * FROM tasks WHERE request_id = ?", (request_id,))
        return None if row is None else _task_from_row(row)

    async def _fetch_one(self, sql: str, params: Iterable[object]) -> sqlite3.Row | None:
        rows = await self._conn.execute_fetchall(sql, params)
        return next(iter(rows), None)

    async def _execute(self, sql: str, params: Iterable[object]) -> int:
        async with self._conn.execute(sql, params) as cursor:
            return cursor.rowcount

    @property
    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("SqliteTaskBackend is not started, or already closed")
        return self._db

    def __repr__(self) -> str:
        return f"SqliteTaskBackend(path={str(self.path)!r}, workers={self.workers})"


async def _run_to_json(runner: Runner, task: Task) -> str:
    """Run `task` and return its result in stored form."""
    return result_to_json(await runner(task))


@contextlib.contextmanager
def _store_errors() -> Iterator[None]:
    """Turn a database that cannot answer (locked, I/O error, full) into Unavailable."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        log.warning("task_store_error", error=str(exc))
        raise Unavailable("the task store is unavailable; retry later") from exc


def _task_from_row(row: sqlite3.Row) -> Task:
    code = row["error_code"]
    finished_at = row["finished_at"]
    return Task(
        id=row["id"],
        request=request_from_json(row["request"]),
        status=TaskStatus(row["status"]),
        created_at=from_iso(row["created_at"]),
        updated_at=from_iso(row["updated_at"]),
        finished_at=None if finished_at is None else from_iso(finished_at),
        result=None if row["result"] is None else result_from_json(row["result"]),
        error=None if code is None else ImageError(code, row["error_message"] or ""),
        attempts=row["attempts"],
    )
