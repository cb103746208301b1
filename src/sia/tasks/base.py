"""The task-backend seam: where async generations are stored and run."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeAlias

from sia.domain import GenerationResult, Task, TaskStatus

if TYPE_CHECKING:
    from datetime import datetime

    from sia.domain import GenerationRequest


@dataclass(frozen=True, slots=True)
class TaskStats:
    """What the metrics need from a backend: counts by status and the queue's age.

    A backend that cannot count finished tasks cheaply (Redis keeps them only
    as expiring keys) reports only the unfinished statuses.
    """

    counts: Mapping[TaskStatus, int]
    oldest_queued_seconds: float = 0.0


#: Runs one task to completion and returns its result, with every image already
#: in the blob store; raises sia.errors.SiaError for a failure the task reports.
Runner: TypeAlias = Callable[[Task], Awaitable[GenerationResult]]
#: Told of each task a backend fails ABANDONED itself, running no runner for it (so that
#: its webhook still hears how it ended).
Abandoned: TypeAlias = Callable[[Task], Awaitable[None]]


class TaskWatch(Protocol):
    """An open subscription to one task's changes; `async with` it, then await `changed()`.

    Changes are coalesced: one `changed()` may stand for several. A watch costs no
    polling: Redis delivers changes through one pub/sub connection per replica,
    SQLite through in-process notification.
    """

    async def __aenter__(self) -> TaskWatch: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def changed(self) -> None:
        """Return once the task has changed since the last call (or since opening)."""
        ...


class TaskBackend(Protocol):
    """Stores tasks, runs them with bounded concurrency, and answers for them.

    Life cycle: `start(runner)` begins running queued tasks (including those
    left QUEUED or RUNNING by a previous process); `drain(grace)` stops taking
    new ones and gives running ones `grace` seconds before they are put back
    in the queue for the next start; `aclose()` releases the store.
    """

    @property
    def name(self) -> str:
        """Short name shown in metrics, e.g. "sqlite"."""
        ...

    async def start(self, runner: Runner, *, on_abandoned: Abandoned | None = None) -> None:
        """Open the store and start the workers; `on_abandoned` hears of each task
        failed ABANDONED (interrupted TASK_MAX_ATTEMPTS times, by drains or crashes) once,
        from the replica that failed it, once it is stored FAILED."""
        ...

    async def submit(self, request: GenerationRequest, *, owner: str = "") -> Task:
        """Store a new QUEUED task of `owner` (an API key's name; "" when access control is
        off), or return the task `owner` already has for request.request_id, whatever its
        request (the service compares them). request_ids of different owners never meet.

        Raises sia.errors.QueueFull when the queue is at its limit.
        """
        ...

    async def list(
        self,
        owner: str,
        *,
        status: TaskStatus | None = None,
        limit: int = 20,
        after: str = "",
    ) -> tuple[list[Task], str]:
        """`owner`'s tasks (all statuses, or `status`), newest first, at most `limit`; and
        the cursor to pass as `after` for the next page ("" on the last page).

        Cursors are opaque strings of the backend's own; a bad one raises
        sia.errors.InvalidArgument naming "page_token".
        """
        ...

    async def get(self, task_id: str) -> Task:
        """The task; raises sia.errors.TaskNotFound."""
        ...

    async def cancel(self, task_id: str) -> Task:
        """Cancel a queued or running task and return it, now CANCELLED.

        Raises sia.errors.TaskNotFound, or sia.errors.TaskNotCancellable when
        the task has already finished.
        """
        ...

    async def progress(self, task_id: str, result: GenerationResult, *, attempt: int) -> None:
        """Store the images a RUNNING task has so far (GetImageTask shows them while it
        still runs) and tell its watchers; nothing when the task is no longer running,
        or runs as another attempt than `attempt` (the writer's: a stale run's images
        never show as a newer one's)."""
        ...

    def watch(self, task_id: str) -> TaskWatch:
        """A subscription to changes of `task_id` (any replica's): status, progress,
        the end. Open it before reading the task's state, so no change falls between."""
        ...

    async def stats(self) -> TaskStats:
        """Counts by status and the age of the oldest queued task."""
        ...

    async def purge(self, finished_before: datetime) -> int:
        """Delete tasks that finished before `finished_before`; return how many."""
        ...

    async def ready(self) -> bool:
        """True while the store answers."""
        ...

    async def drain(self, grace: float) -> None:
        """Stop taking tasks; wait up to `grace` s for running ones, then requeue them."""
        ...

    async def aclose(self) -> None:
        """Stop the workers and close the store; idempotent."""
        ...
