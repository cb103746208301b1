"""What only the SQLite backend does: its file survives a dead process, purge, full counts,
wake-ups that rouse one worker each, every sqlite3 error answered as Unavailable, and a
file of an older schema upgraded in place."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import NoReturn

import pytest

from sia.domain import TaskStatus, utcnow
from sia.errors import ConfigError, TaskNotFound, Unavailable
from sia.tasks.base import TaskBackend
from sia.tasks.codec import request_to_json, to_iso
from sia.tasks.sqlite import SqliteTaskBackend
from tests.tasks.backend_helpers import (
    GatedRunner,
    Make,
    make_request,
    quick,
    started,
    wait_status,
)
from tests.waiting import until


@pytest.fixture
async def backends(tmp_path: Path) -> AsyncIterator[Make]:
    """A factory of SQLite backends on one file under tmp_path."""
    made: list[TaskBackend] = []

    def make(**kwargs: int) -> TaskBackend:
        backend = SqliteTaskBackend(tmp_path / "db" / "tasks.sqlite3", **kwargs)  # type: ignore[arg-type]
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.aclose()


async def test_task_left_running_by_a_dead_process_runs_again(
    backends: Make, tmp_path: Path
) -> None:
    """A row still RUNNING when the file is reopened is queued again and run."""
    runner = GatedRunner()
    first = await started(backends, runner, workers=1)
    task = await first.submit(make_request())
    await runner.wait_started()
    await first.aclose()
    with sqlite3.connect(tmp_path / "db" / "tasks.sqlite3") as db:
        db.execute("UPDATE tasks SET status = 'running' WHERE id = ?", (task.id,))
    db.close()

    second = await started(backends, quick)
    done = await wait_status(second, task.id, TaskStatus.SUCCEEDED)
    assert done.attempts == 2


async def test_purge_removes_only_old_finished_tasks(
    backends: Make,
) -> None:
    """purge deletes finished tasks older than the cutoff and keeps everything else."""
    runner = GatedRunner()
    backend = await started(backends, runner, workers=1)
    old = await backend.submit(make_request())
    await backend.cancel(old.id)
    await asyncio.sleep(0.01)
    cutoff = utcnow()
    await asyncio.sleep(0.01)
    running = await backend.submit(make_request())
    await runner.wait_started()
    queued = await backend.submit(make_request())
    recent = await backend.submit(make_request())
    await backend.cancel(recent.id)

    assert await backend.purge(cutoff) == 1
    with pytest.raises(TaskNotFound):
        await backend.get(old.id)
    for task in (running, queued, recent):
        await backend.get(task.id)
    assert await backend.purge(cutoff) == 0


async def test_stats_count_every_status(backends: Make) -> None:
    """stats counts each status, with zeros for those no task is in, and the queue's age."""
    runner = GatedRunner()
    backend = await started(backends, runner, workers=1)
    assert (await backend.stats()).counts == dict.fromkeys(TaskStatus, 0)
    await backend.submit(make_request())
    await runner.wait_started()
    await backend.submit(make_request())
    cancelled = await backend.submit(make_request())
    await backend.cancel(cancelled.id)
    stats = await backend.stats()
    assert stats.oldest_queued_seconds > 0
    assert stats.counts == {
        TaskStatus.QUEUED: 1,
        TaskStatus.RUNNING: 1,
        TaskStatus.SUCCEEDED: 0,
        TaskStatus.FAILED: 0,
        TaskStatus.CANCELLED: 1,
    }


_CLAIM_PREFIX = "UPDATE tasks SET status = 'running'"


async def _claims(backend: TaskBackend) -> list[str]:
    """The claim statements the backend runs from now on (SQLite's trace callback)."""
    assert isinstance(backend, SqliteTaskBackend)
    assert backend._store is not None
    seen: list[str] = []

    def trace(sql: str) -> None:
        if sql.lstrip().startswith(_CLAIM_PREFIX):
            seen.append(sql)

    await backend._store._db.set_trace_callback(trace)
    return seen


async def _all_idle(backend: TaskBackend) -> None:
    """Wait until every worker waits for a wake-up and none is on its way."""
    assert isinstance(backend, SqliteTaskBackend)
    await until(
        lambda: backend._idle == backend.workers and backend._nudges.empty(),
        f"{backend.workers - backend._idle} of {backend.workers} workers never went idle",
    )


async def test_a_submit_wakes_one_idle_worker(
    backends: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight idle workers, one submit: one claim runs the task, and the worker that ran it
    claims once more and finds nothing; the seven others stay asleep."""
    monkeypatch.setattr("sia.tasks.sqlite._POLL_SECONDS", 60.0)  # no poll during the test
    backend = await started(backends, quick, workers=8)
    await _all_idle(backend)
    claims = await _claims(backend)
    task = await backend.submit(make_request())
    await wait_status(backend, task.id, TaskStatus.SUCCEEDED)
    await _all_idle(backend)
    assert len(claims) == 2


async def test_a_poll_wakes_one_idle_worker(
    backends: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing queued, each poll makes one claim between eight idle workers, and a
    poll while a wake-up is still on its way adds none."""
    monkeypatch.setattr("sia.tasks.sqlite._POLL_SECONDS", 60.0)  # the test polls by hand
    backend = await started(backends, quick, workers=8)
    assert isinstance(backend, SqliteTaskBackend)
    await _all_idle(backend)
    claims = await _claims(backend)
    for _ in range(5):
        backend._poke()
        backend._poke()
        await _all_idle(backend)
    assert len(claims) == 5


async def test_a_task_queued_without_a_wake_up_is_found_by_the_poll(
    backends: Make, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A queued row no submit announced (written by another connection) still runs."""
    monkeypatch.setattr("sia.tasks.sqlite._POLL_SECONDS", 0.05)
    backend = await started(backends, quick, workers=2)
    await _all_idle(backend)
    now = to_iso(utcnow())
    with sqlite3.connect(tmp_path / "db" / "tasks.sqlite3") as db:
        db.execute(
            "INSERT INTO tasks (id, status, request, created_at, updated_at) "
            "VALUES ('task_unannounced', 'queued', ?, ?, ?)",
            (request_to_json(make_request()), now, now),
        )
    db.close()
    await wait_status(backend, "task_unannounced", TaskStatus.SUCCEEDED, timeout=5)


_FAULTS = [
    sqlite3.DatabaseError("database disk image is malformed"),
    sqlite3.IntegrityError("CHECK constraint failed"),
    sqlite3.OperationalError("database is locked"),
    sqlite3.InterfaceError("bad parameter or other API misuse"),
    sqlite3.InternalError("internal logic error"),
]


@pytest.mark.parametrize("fault", _FAULTS, ids=lambda fault: type(fault).__name__)
async def test_every_sqlite_error_is_unavailable(
    backends: Make, monkeypatch: pytest.MonkeyPatch, fault: sqlite3.Error
) -> None:
    """Whatever sqlite3 raises (a corrupt page, a broken constraint, a locked file), every
    call answers Unavailable raised from it, never an INTERNAL bug; ready turns False."""
    runner = GatedRunner()
    backend = await started(backends, runner, workers=1)
    assert isinstance(backend, SqliteTaskBackend)
    assert backend._store is not None
    task = await backend.submit(make_request())
    await runner.wait_started()  # the only worker is busy and queries nothing meanwhile
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "submit": lambda: backend.submit(make_request(request_id="r-1")),
        "get": lambda: backend.get(task.id),
        "cancel": lambda: backend.cancel(task.id),
        "stats": backend.stats,
        "purge": lambda: backend.purge(utcnow()),
        "list": lambda: backend.list(""),
    }

    def fail(*args: object) -> NoReturn:
        raise fault

    with monkeypatch.context() as patch:
        patch.setattr(backend._store._db, "execute", fail)
        patch.setattr(backend._store._db, "execute_fetchall", fail)
        for name, call in calls.items():
            with pytest.raises(Unavailable) as caught:
                await call()
            assert caught.value.__cause__ is fault, name
        assert not await backend.ready()
    assert await backend.ready()
    assert (await backend.get(task.id)).status is TaskStatus.RUNNING


async def test_a_constraint_the_file_enforces_is_unavailable(
    backends: Make, tmp_path: Path
) -> None:
    """A real IntegrityError from the file (a trigger refusing the change) is Unavailable."""
    backend = await started(backends, GatedRunner(), workers=1)
    task = await backend.submit(make_request())
    with sqlite3.connect(tmp_path / "db" / "tasks.sqlite3") as db:
        db.execute(
            "CREATE TRIGGER refuse BEFORE UPDATE OF status ON tasks "
            "WHEN NEW.status = 'cancelled' BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
    db.close()
    with pytest.raises(Unavailable) as caught:
        await backend.cancel(task.id)
    assert isinstance(caught.value.__cause__, sqlite3.IntegrityError)


# The schema of version 1 files (before owners), as sia wrote it.
_SCHEMA_1 = """
CREATE TABLE tasks (
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
CREATE UNIQUE INDEX tasks_request_id ON tasks (request_id) WHERE request_id != '';
CREATE INDEX tasks_status_created ON tasks (status, created_at);
CREATE INDEX tasks_finished ON tasks (finished_at);
PRAGMA user_version = 1;
"""


async def test_a_version_1_file_is_upgraded_and_keeps_its_tasks(
    backends: Make, tmp_path: Path
) -> None:
    """A file from before owners gains the owner column (its tasks owned by ""), request_ids
    unique per owner, and the listing index; its tasks stay and its queued one runs."""
    path = tmp_path / "db" / "tasks.sqlite3"
    path.parent.mkdir()
    old, new = to_iso(utcnow()), to_iso(utcnow())
    with sqlite3.connect(path) as db:
        db.executescript(_SCHEMA_1)
        db.executemany(
            "INSERT INTO tasks (id, request_id, status, request, attempts, created_at, "
            "updated_at, finished_at, error_code, error_message) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                ("task_done", "r-1", "cancelled", request_to_json(make_request(request_id="r-1")),
                 0, old, old, old, "CANCELLED", "cancelled by the client"),
                ("task_waiting", "", "queued", request_to_json(make_request()),
                 0, new, new, None, None, None),
            ],
        )  # fmt: skip
    db.close()

    backend = await started(backends, quick)
    done = await backend.get("task_done")
    assert (done.status, done.owner, done.request.request_id) == (TaskStatus.CANCELLED, "", "r-1")
    ran = await wait_status(backend, "task_waiting", TaskStatus.SUCCEEDED)
    assert ran.owner == ""
    assert (await backend.submit(make_request(request_id="r-1"))).id == "task_done"
    mine = await backend.submit(make_request(request_id="r-1"), owner="alice")
    assert mine.id != "task_done"
    tasks, cursor = await backend.list("")
    assert ([t.id for t in tasks], cursor) == (["task_waiting", "task_done"], "")
    await backend.aclose()

    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (2,)
        indexes = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    db.close()
    assert {"tasks_owner_request_id", "tasks_owner_created"} <= indexes
    assert "tasks_request_id" not in indexes
    reopened = await started(backends, quick)  # a current file opens as it is
    assert (await reopened.get("task_done")).owner == ""


async def test_a_file_of_a_newer_schema_is_refused(backends: Make, tmp_path: Path) -> None:
    """A file written by a later sia (a higher user_version) is a ConfigError, left as it is."""
    path = tmp_path / "db" / "tasks.sqlite3"
    path.parent.mkdir()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 3")
    db.close()
    with pytest.raises(ConfigError, match="has schema 3"):
        await started(backends, quick)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (3,)
        assert db.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)
    db.close()
