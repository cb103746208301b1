"""The retry policy of upstream calls: backoff with jitter, Retry-After, a deadline.

`call_with_retries` runs one attempt after another for retryable errors only
(`sia.errors.retryable`: rate limits and transient failures, never a 4xx the
caller caused), waits what the provider's `Retry-After` asks or else an
exponential backoff with full jitter, and gives up rather than wait past the
deadline. A library (tenacity, stamina) would spread these three rules over
its stop, wait and retry predicates; the loop states them in one place.

A task runs its generation once per task attempt, so a task backend that
re-runs an interrupted task lowers the calls that attempt may make through
`upstream_call_limit`: the calls billed for one task then stay under one cap
(`IMAGE_MAX_RETRIES + 1` for its first attempt, one for each later one),
whichever backend runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import random
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from sia.errors import ResourceExhausted, SiaError, retryable
from sia.logs import get_logger

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

log = get_logger("sia.providers")

T = TypeVar("T")

#: The most upstream calls the current task attempt may make; None: the policy's own.
_CALL_LIMIT: ContextVar[int | None] = ContextVar("sia_upstream_call_limit", default=None)


@contextlib.contextmanager
def upstream_call_limit(calls: int | None) -> Iterator[None]:
    """Within the block (and tasks it creates), make at most `calls` calls per generation."""
    token = _CALL_LIMIT.set(None if calls is None else max(1, calls))
    try:
        yield
    finally:
        _CALL_LIMIT.reset(token)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter: attempt n waits U(0, min(cap, base * 2**n))."""

    max_retries: int = 3
    base_delay: float = 0.5
    max_delay: float = 8.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt` (0-based)."""
        if retry_after is not None:
            return retry_after
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))  # noqa: S311 - jitter, not crypto


async def call_with_retries(
    attempt: Callable[..., Awaitable[T]], *args: Any, policy: RetryPolicy, deadline: float
) -> T:
    """Run `attempt(*args)` until it succeeds, fails for good, or the next wait passes `deadline`.

    `deadline` is on the `time.monotonic()` clock; `upstream_call_limit` may
    allow fewer attempts than the policy.
    """
    last = policy.max_retries
    if (limit := _CALL_LIMIT.get()) is not None:
        last = min(last, limit - 1)
    for number in range(last + 1):
        try:
            return await attempt(*args)
        except SiaError as exc:
            if not retryable(exc):
                raise
            delay = policy.delay(number, getattr(exc, "upstream_retry_after", None))
            if number == last or time.monotonic() + delay >= deadline:
                (log.warning if isinstance(exc, ResourceExhausted) else log.error)(
                    "upstream_retries_exhausted",
                    attempts=number + 1,
                    reason=exc.reason,
                    upstream_code=exc.metadata.get("upstream_code", ""),
                    upstream_request_id=exc.metadata.get("upstream_request_id", ""),
                )
                raise
            log.info(
                "upstream_retry",
                attempt=number + 1,
                delay_s=round(delay, 3),
                reason=exc.reason,
                upstream_code=exc.metadata.get("upstream_code", ""),
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover - the loop always returns or raises


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), if any."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
