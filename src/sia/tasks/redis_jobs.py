"""saq jobs as SIA tasks: a job's status, result, progress and failure read as a `Task`.

The Redis backend (`sia.tasks.redis`) stores each task as a saq job: the request in its
kwargs, the owner and a failure's code and message in its meta, a group's images so far
under a progress key written by the attempt that made them.
"""

from __future__ import annotations

from datetime import UTC, datetime

from saq import Job, Status

from sia.domain import ImageError, Task, TaskStatus
from sia.tasks.codec import request_from_json, result_from_json
from sia.tasks.errors import ABANDONED_CODE, CANCELLED, INTERNAL, abandoned

_STATUSES = {
    Status.NEW: TaskStatus.QUEUED,
    Status.QUEUED: TaskStatus.QUEUED,
    Status.ACTIVE: TaskStatus.RUNNING,
    Status.ABORTING: TaskStatus.RUNNING,  # the sweep's abort before a retry
    Status.ABORTED: TaskStatus.FAILED,
    Status.FAILED: TaskStatus.FAILED,
    Status.COMPLETE: TaskStatus.SUCCEEDED,
}


def task_of(job: Job, *, cancelled: bool, progress: bytes | None = None) -> Task:
    """The task of saq `job`; `progress` is the value of its progress key, if any."""
    status = TaskStatus.CANCELLED if cancelled else _STATUSES[job.status]
    error = None
    if status is TaskStatus.CANCELLED:
        error = CANCELLED
    elif status is TaskStatus.FAILED:
        error = _failure(job)
    result, progressed = None, 0
    if status is TaskStatus.SUCCEEDED and job.result:
        result = result_from_json(job.result)
    elif status is TaskStatus.RUNNING and progress:
        attempt, _, rest = progress.decode().partition(":")
        if attempt == str(job.attempts):
            millis, _, partial = rest.partition(":")
            result, progressed = result_from_json(partial), int(millis)
    created = _time(job.queued) or datetime.now(UTC)
    finished = _time(job.completed) if status.is_terminal else None
    moments = (created, _time(job.started), _time(job.touched), _time(progressed), finished)
    updated = max(filter(None, moments))
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
        owner=str(job.meta.get("owner", "")),
    )


def failed_abandoned(job: Job) -> bool:
    """Whether `job` is FAILED as ABANDONED by _run_job (out of attempts after drains)."""
    return job.status is Status.FAILED and _failure(job).code == ABANDONED_CODE


def _failure(job: Job) -> ImageError:
    """Why a job failed, as recorded by _run_job; saq's own error text is a traceback."""
    stored = job.meta.get("error")
    if isinstance(stored, dict):
        return ImageError(str(stored.get("code", INTERNAL.code)), str(stored.get("message", "")))
    if job.status is Status.ABORTED:
        return abandoned(job.attempts)
    return INTERNAL


def _time(millis: int) -> datetime | None:
    return datetime.fromtimestamp(millis / 1000, UTC) if millis else None
