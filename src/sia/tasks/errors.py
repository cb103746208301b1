"""How every task backend fails: the errors a task stores, and store faults translated.

A store that cannot answer (Redis down; an SQLite file locked, full or
corrupt) is `Unavailable`, never INTERNAL: the fault is the store's, and the
caller's retry may well succeed. Each backend names its own client library's
exceptions; the translation, its log line and its message live here once.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from sia.domain import ImageError
from sia.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ProviderMisconfigured,
    ResourceExhausted,
    SiaError,
    Unavailable,
)
from sia.logs import get_logger

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sia.domain import Task
    from sia.tasks.base import Abandoned

log = get_logger("sia.tasks")

#: What a task cancelled by its client stores.
CANCELLED = ImageError("CANCELLED", "cancelled by the client")
#: The code of a task that was interrupted (a crash, a drain) TASK_MAX_ATTEMPTS times.
ABANDONED_CODE = "ABANDONED"


def abandoned(attempts: int) -> ImageError:
    """What a task interrupted `attempts` times stores instead of running again."""
    return ImageError(
        ABANDONED_CODE, f"the task was interrupted {attempts} times (TASK_MAX_ATTEMPTS)"
    )


async def tell_abandoned(on_abandoned: Abandoned | None, task: Task) -> None:
    """Call `on_abandoned` with `task`; its failure is logged, never raised (the task's
    outcome is stored already)."""
    if on_abandoned is None:
        return
    try:
        await on_abandoned(task)
    except Exception:
        log.exception("task_abandoned_hook_failed", task_id=task.id)


#: What a task stores when its runner failed with a bug; the traceback goes to the log only.
INTERNAL = ImageError("INTERNAL", "internal error")


@contextlib.contextmanager
def store_errors(*foreign: type[BaseException]) -> Iterator[None]:
    """Raise `Unavailable` from any of the `foreign` exceptions the store's client raises."""
    try:
        yield
    except foreign as exc:
        log.warning("task_store_error", error=type(exc).__name__, detail=str(exc))
        raise Unavailable("the task store is unavailable; retry later") from exc


def runner_failure(exc: BaseException, **context: object) -> ImageError:
    """The error a task stores when its runner raised `exc`, logged as `task_failed`.

    A SiaError is the task's own answer and keeps its reason and message;
    anything else is a bug, logged with its traceback and stored as INTERNAL.
    """
    if isinstance(exc, SiaError):
        level = _failure_level(exc)
        getattr(log, level)("task_failed", code=exc.reason, message=exc.message, **context)
        return ImageError(exc.reason, exc.message)
    log.error("task_failed", code=INTERNAL.code, exc_info=exc, **context)
    return INTERNAL


def _failure_level(exc: SiaError) -> str:
    """error for the service's or upstream's fault, warning for a limit, info for the client's."""
    if isinstance(exc, ProviderMisconfigured):
        return "error"  # a FailedPrecondition, but of the service's own key or account
    if isinstance(exc, ResourceExhausted):
        return "warning"
    if isinstance(exc, InvalidArgument | NotFound | FailedPrecondition | PermissionDenied):
        return "info"
    return "error"  # Unavailable (the image store's too), DeadlineExceeded, a bare SiaError
