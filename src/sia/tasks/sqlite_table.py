"""The `tasks` table of the sqlite backend: its schema and the statements that move a task.

One aiosqlite connection in autocommit mode serves the table; every state
change is a single statement, so no transaction spans an `await`.

Each task belongs to an owner (an API key's name, "" without access control):
request_ids are unique per owner, and an owner's tasks are listed newest
first through the (owner, created_at, id) index. A file of an older schema
(`PRAGMA user_version`) is upgraded in place when opened.

sqlite3's exceptions never leave this module. A file that cannot be opened,
or that holds a newer schema, is a `ConfigError` at start-up; any fault after
that (locked, full, an I/O error, a corrupt page, a broken constraint) is
`Unavailable`.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

import aiosqlite

from sia.domain import ImageError, Task, TaskStatus, new_task_id, utcnow
from sia.errors import ConfigError
from sia.tasks.base import TaskStats
from sia.tasks.codec import (
    bad_cursor,
    cursor_from_text,
    cursor_to_text,
    from_iso,
    request_from_json,
    request_to_json,
    result_from_json,
    to_iso,
)
from sia.tasks.errors import ABANDONED_CODE, CANCELLED, store_errors

if TYPE_CHECKING:
    from collections.abc import Iterable
    from datetime import datetime
    from pathlib import Path

    from sia.domain import GenerationRequest

SCHEMA_VERSION = 2
# `owner` comes last: version 1 files gain it by ALTER TABLE, and both layouts stay alike.
_SCHEMA = (
    """
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
        finished_at   TEXT,
        owner         TEXT NOT NULL DEFAULT ''
    )
    """,
    "CREATE UNIQUE INDEX IF NOT EXISTS tasks_owner_request_id "
    "ON tasks (owner, request_id) WHERE request_id != ''",
    "CREATE INDEX IF NOT EXISTS tasks_owner_created ON tasks (owner, created_at, id)",
    "CREATE INDEX IF NOT EXISTS tasks_status_created ON tasks (status, created_at)",
    "CREATE INDEX IF NOT EXISTS tasks_finished ON tasks (finished_at)",
)
#: What brings a file of schema N up to N + 1 (then `_SCHEMA` adds any new index).
_UPGRADES = {
    1: (
        "ALTER TABLE tasks ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
        "DROP INDEX IF EXISTS tasks_request_id",  # unique per owner now
    ),
}
_INSERT = """
INSERT INTO tasks (id, owner, request_id, status, request, attempts, created_at, updated_at)
SELECT ?, ?, ?, 'queued', ?, 0, ?, ?
WHERE (SELECT count(*) FROM tasks WHERE status IN ('queued', 'running')) < ?
ON CONFLICT (owner, request_id) WHERE request_id != '' DO NOTHING
RETURNING *
"""
_CLAIM = """
UPDATE tasks SET status = 'running', attempts = attempts + 1, result = NULL, updated_at = ?
WHERE id = (SELECT id FROM tasks WHERE status = 'queued' ORDER BY created_at, rowid LIMIT 1)
RETURNING *
"""
_FINISH = """
UPDATE tasks SET status = ?, result = ?, error_code = ?, error_message = ?,
    updated_at = ?, finished_at = ?
WHERE id = ? AND status = 'running'
"""
# The images a running task has so far; the end (_FINISH, _CANCEL, a requeue) replaces them.
_PROGRESS = """
UPDATE tasks SET result = ?, updated_at = ? WHERE id = ? AND status = 'running' AND attempts = ?
"""
_CANCEL = """
UPDATE tasks SET status = 'cancelled', result = NULL, error_code = ?, error_message = ?,
    updated_at = ?, finished_at = ?
WHERE id = ? AND status IN ('queued', 'running')
RETURNING *
"""
_REQUEUE_ALL = """
UPDATE tasks SET status = 'queued', result = NULL, updated_at = ? WHERE status = 'running'
"""
_REQUEUE_ONE = f"{_REQUEUE_ALL} AND id = ?"
_UNCLAIM = """
UPDATE tasks SET status = 'queued', attempts = attempts - 1, result = NULL, updated_at = ?
WHERE status = 'running' AND id = ?
"""
# A RUNNING task whose attempts reached the limit fails instead of being queued again.
_ABANDON = """
UPDATE tasks SET status = 'failed', result = NULL, error_code = ?,
    error_message = 'the task was interrupted ' || attempts || ' times (TASK_MAX_ATTEMPTS)',
    updated_at = ?, finished_at = ?
WHERE status = 'running' AND attempts >= ?
"""
_ABANDON_ALL = f"{_ABANDON} RETURNING *"
_ABANDON_ONE = f"{_ABANDON} AND id = ? RETURNING *"
# Newest first, resuming strictly after the (created_at, id) of the last task seen: a range
# on tasks_owner_created, so a deep page costs no more than the first.
_LIST = """
SELECT * FROM tasks WHERE owner = ? AND (created_at, id) < (?, ?) AND (? IS NULL OR status = ?)
ORDER BY created_at DESC, id DESC LIMIT ?
"""
#: A position after every stored created_at (they start with a digit): the first page's.
_NEWEST = "~"
_PURGE = """
DELETE FROM tasks WHERE finished_at < ? AND status IN ('succeeded', 'failed', 'cancelled')
"""


class TaskTable:
    """The tasks table in one SQLite file; `await TaskTable.open(path)` makes one."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    @classmethod
    async def open(cls, path: Path) -> TaskTable:
        """Open (or create) the file, in WAL mode, upgraded to the current schema."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(path, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the task database {path}: {exc}") from exc
        try:
            db.row_factory = aiosqlite.Row
            await db.execute("PRAGMA busy_timeout = 5000")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = NORMAL")
            await _upgrade(db, path)
        except BaseException as exc:
            await db.close()  # rolls back an upgrade left half done
            if isinstance(exc, sqlite3.Error):
                raise ConfigError(f"cannot use the task database {path}: {exc}") from exc
            raise
        return cls(db)

    async def insert(
        self, request: GenerationRequest, *, owner: str = "", limit: int
    ) -> Task | None:
        """Store `request` as a new QUEUED task of `owner`.

        None when `limit` tasks are already queued or running, or when another
        task of `owner` holds the request's request_id.
        """
        now = to_iso(utcnow())
        request_json = request_to_json(request)
        params = (new_task_id(), owner, request.request_id, request_json, now, now, limit)
        return _task(await self._fetch_one(_INSERT, params))

    async def get(self, task_id: str) -> Task | None:
        """The task with id `task_id`, if there is one."""
        return _task(await self._fetch_one("SELECT * FROM tasks WHERE id = ?", (task_id,)))

    async def by_request_id(self, request_id: str, *, owner: str = "") -> Task | None:
        """The task `owner` submitted with `request_id`, if there is one."""
        sql = "SELECT * FROM tasks WHERE owner = ? AND request_id = ?"
        return _task(await self._fetch_one(sql, (owner, request_id)))

    async def list(
        self, owner: str, *, status: TaskStatus | None, limit: int, after: str
    ) -> tuple[list[Task], str]:
        """`owner`'s tasks newest first, at most `limit`, and the cursor of the next page.

        The cursor holds the (created_at, id) of the page's last task; "" when
        no task follows it. A bad `after` raises InvalidArgument (page_token).
        """
        created, task_id = _NEWEST, ""
        if after:
            created, task_id = cursor_from_text(after)
            try:
                from_iso(created)
            except ValueError as exc:
                raise bad_cursor() from exc
        value = None if status is None else status.value
        params = (owner, created, task_id, value, value, limit + 1)  # one more: is there a next?
        rows = list(await self._fetch_all(_LIST, params))
        tasks = [_task_of(row) for row in rows[:limit]]
        if len(rows) <= limit:
            return tasks, ""
        last = rows[limit - 1]
        return tasks, cursor_to_text(last["created_at"], last["id"])

    async def claim(self) -> Task | None:
        """Mark the oldest QUEUED task RUNNING, counting an attempt, and return it."""
        return _task(await self._fetch_one(_CLAIM, (to_iso(utcnow()),)))

    async def finish(
        self, task_id: str, status: TaskStatus, result: str | None, error: ImageError | None
    ) -> bool:
        """Store how a RUNNING task ended; False if it was no longer RUNNING."""
        now = to_iso(utcnow())
        code, message = (error.code, error.message) if error else (None, None)
        params = (status.value, result, code, message, now, now, task_id)
        return bool(await self._execute(_FINISH, params))

    async def progress(self, task_id: str, result: str, attempt: int) -> bool:
        """Store the partial `result` of a task RUNNING as `attempt`; False otherwise."""
        return bool(await self._execute(_PROGRESS, (result, to_iso(utcnow()), task_id, attempt)))

    async def cancel(self, task_id: str) -> Task | None:
        """Mark a QUEUED or RUNNING task CANCELLED; None if it is in neither status."""
        now = to_iso(utcnow())
        params = (CANCELLED.code, CANCELLED.message, now, now, task_id)
        return _task(await self._fetch_one(_CANCEL, params))

    async def requeue(
        self, task_id: str | None = None, *, max_attempts: int
    ) -> tuple[int, tuple[Task, ...]]:
        """Put a RUNNING task (every one, without `task_id`) back in the queue.

        One that has had `max_attempts` attempts fails as ABANDONED instead.
        Returns how many were queued again, and the tasks failed.
        """
        now = to_iso(utcnow())
        if task_id is None:
            rows = await self._fetch_all(_ABANDON_ALL, (ABANDONED_CODE, now, now, max_attempts))
            requeued = await self._execute(_REQUEUE_ALL, (now,))
        else:
            params = (ABANDONED_CODE, now, now, max_attempts, task_id)
            rows = await self._fetch_all(_ABANDON_ONE, params)
            requeued = await self._execute(_REQUEUE_ONE, (now, task_id))
        return requeued, tuple(_task_of(row) for row in rows)

    async def unclaim(self, task_id: str) -> None:
        """Queue a task claimed but never run again, taking back the attempt its claim counted."""
        await self._execute(_UNCLAIM, (to_iso(utcnow()), task_id))

    async def stats(self) -> TaskStats:
        """How many tasks are in each status (zeros included) and the oldest queued one's age."""
        counts = dict.fromkeys(TaskStatus, 0)
        rows = await self._fetch_all("SELECT status, count(*) FROM tasks GROUP BY status", ())
        for status, count in rows:
            counts[TaskStatus(status)] = count
        sql = "SELECT min(created_at) FROM tasks WHERE status = 'queued'"
        oldest = await self._fetch_one(sql, ())
        age = 0.0
        if oldest is not None and oldest[0] is not None:
            age = max(0.0, (utcnow() - from_iso(oldest[0])).total_seconds())
        return TaskStats(counts, age)

    async def purge(self, finished_before: datetime) -> int:
        """Delete finished tasks whose finished_at is before `finished_before`."""
        return await self._execute(_PURGE, (to_iso(finished_before),))

    async def ping(self) -> bool:
        """True while the file answers a trivial query."""
        try:
            await self._db.execute_fetchall("SELECT 1")
        except sqlite3.Error:
            return False
        return True

    async def close(self) -> None:
        """Close the connection."""
        await self._db.close()

    async def _fetch_all(self, sql: str, params: Iterable[object]) -> Iterable[sqlite3.Row]:
        with store_errors(sqlite3.Error):
            return await self._db.execute_fetchall(sql, params)

    async def _fetch_one(self, sql: str, params: Iterable[object]) -> sqlite3.Row | None:
        return next(iter(await self._fetch_all(sql, params)), None)

    async def _execute(self, sql: str, params: Iterable[object]) -> int:
        with store_errors(sqlite3.Error):
            async with self._db.execute(sql, params) as cursor:
                return cursor.rowcount


async def _upgrade(db: aiosqlite.Connection, path: Path) -> None:
    """Create the schema, or bring an older file's up to SCHEMA_VERSION, in one transaction.

    A newer file is a ConfigError. The write lock is taken before the version
    is read, so two processes opening one old file upgrade it once.
    """
    await db.execute("BEGIN IMMEDIATE")
    (version,) = next(iter(await db.execute_fetchall("PRAGMA user_version")))
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"the task database {path} has schema {version}; "
            f"this version of sia knows only up to {SCHEMA_VERSION}"
        )
    if version:  # 0: a new file, created from `_SCHEMA` alone
        for step in range(version, SCHEMA_VERSION):
            for statement in _UPGRADES[step]:
                await db.execute(statement)
    for statement in _SCHEMA:
        await db.execute(statement)
    await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    await db.execute("COMMIT")


def _task(row: sqlite3.Row | None) -> Task | None:
    return None if row is None else _task_of(row)


def _task_of(row: sqlite3.Row) -> Task:
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
        owner=row["owner"],
    )
