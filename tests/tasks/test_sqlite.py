"""What only the SQLite backend does: its file survives a dead process, purge, full counts."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sia.domain import TaskStatus, utcnow
from sia.errors import TaskNotFound
from sia.tasks.base import TaskBackend
from sia.tasks.codec import request_to_json, to_iso
from sia.tasks.sqlite import SqliteTaskBackend
from tests.tasks.backend_helpers import GatedRunner, Make, make_request, quick, started, wait_status


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
    await runner.started.wait()
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
    await runner.started.wait()
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
    await runner.started.wait()
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
    assert backend._db is not None
    seen: list[str] = []

    def trace(sql: str) -> None:
        if sql.lstrip().startswith(_CLAIM_PREFIX):
            seen.append(sql)

    await backend._db.set_trace_callback(trace)
    return seen


async def test_a_submit_wakes_one_idle_worker(
    backends: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight idle workers, one submit: one claim runs the task, and the worker that ran it
    claims once more and finds nothing; the seven others stay asleep."""
    monkeypatch.setattr("sia.tasks.sqlite._POLL_SECONDS", 60.0)
    backend = await started(backends, quick, workers=8)
    await asyncio.sleep(0.2)  # every worker has looked once and waits
    claims = await _claims(backend)
    task = await backend.submit(make_request())
    await wait_status(backend, task.id, TaskStatus.SUCCEEDED)
    await asyncio.sleep(0.2)
    assert len(claims) == 2


async def test_idle_workers_look_once_per_interval_in_all(
    backends: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing queued, eight workers make one claim per poll interval between them."""
    monkeypatch.setattr("sia.tasks.sqlite._POLL_SECONDS", 0.05)
    backend = await started(backends, quick, workers=8)
    await asyncio.sleep(0.2)
    claims = await _claims(backend)
    await asyncio.sleep(0.5)
    assert 3 <= len(claims) <= 12  # about 10; one per worker per interval would be 80


async def test_a_task_queued_without_a_wake_up_is_found_by_the_poll(
    backends: Make, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A queued row no submit announced (written by another connection) still runs."""
    monkeypatch.setattr("sia.tasks.sqlite._POLL_SECONDS", 0.05)
    backend = await started(backends, quick, workers=2)
    await asyncio.sleep(0.1)
    now = to_iso(utcnow())
    with sqlite3.connect(tmp_path / "db" / "tasks.sqlite3") as db:
        db.execute(
            "INSERT INTO tasks (id, status, request, created_at, updated_at) "
            "VALUES ('task_unannounced', 'queued', ?, ?, ?)",
            (request_to_json(make_request()), now, now),
        )
    db.close()
    await wait_status(backend, "task_unannounced", TaskStatus.SUCCEEDED, timeout=5)
