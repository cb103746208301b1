"""`sia.providers.retry`: which errors are retried, how long it waits, and the deadline."""

from __future__ import annotations

import email.utils
import time

import pytest

from sia.errors import SiaError, UpstreamRejected, UpstreamUnavailable
from sia.providers.retry import RetryPolicy, call_with_retries, parse_retry_after


class Script:
    """An attempt that raises the scripted errors in turn, then returns "ok"."""

    def __init__(self, *errors: SiaError) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def unavailable(retry_after: float | None = 0.0, *, final: bool = False) -> UpstreamUnavailable:
    exc = UpstreamUnavailable("down")
    exc.upstream_retry_after = retry_after
    exc.final = final
    return exc


FAR = float("inf")


async def test_transient_errors_are_retried_until_success() -> None:
    """Retryable errors are tried again, up to max_retries times."""
    attempt = Script(unavailable(), unavailable())
    assert await call_with_retries(attempt, policy=RetryPolicy(max_retries=2), deadline=FAR) == "ok"
    assert attempt.calls == 3


async def test_retries_stop_at_max_retries() -> None:
    """After max_retries retries the last error is raised."""
    attempt = Script(*[unavailable() for _ in range(5)])
    with pytest.raises(UpstreamUnavailable):
        await call_with_retries(attempt, policy=RetryPolicy(max_retries=2), deadline=FAR)
    assert attempt.calls == 3


@pytest.mark.parametrize(
    "error", [UpstreamRejected("prompt", "no"), unavailable(final=True)], ids=["4xx", "final"]
)
async def test_caller_errors_and_final_errors_are_not_retried(error: SiaError) -> None:
    """A rejected request, or an error marked final, costs one attempt."""
    attempt = Script(error)
    with pytest.raises(type(error)):
        await call_with_retries(attempt, policy=RetryPolicy(max_retries=3), deadline=FAR)
    assert attempt.calls == 1


async def test_no_wait_past_the_deadline() -> None:
    """A Retry-After that ends past the deadline gives up at once instead of waiting."""
    attempt = Script(unavailable(retry_after=3600), unavailable())
    with pytest.raises(UpstreamUnavailable):
        await call_with_retries(
            attempt, policy=RetryPolicy(max_retries=3), deadline=time.monotonic() + 60
        )
    assert attempt.calls == 1


def test_delay_honours_retry_after_else_capped_jitter() -> None:
    """Retry-After wins; otherwise the wait is at most min(cap, base * 2**n)."""
    policy = RetryPolicy(base_delay=0.5, max_delay=2.0)
    assert policy.delay(0, retry_after=7.0) == 7.0
    assert all(0 <= policy.delay(0) <= 0.5 for _ in range(100))
    assert all(0 <= policy.delay(10) <= 2.0 for _ in range(100))


def test_parse_retry_after() -> None:
    """Delta-seconds and HTTP dates are read; anything else is None."""
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("-5") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    later = email.utils.formatdate(time.time() + 120, usegmt=True)
    seconds = parse_retry_after(later)
    assert seconds is not None
    assert 100 < seconds <= 120
    assert parse_retry_after(email.utils.formatdate(time.time() - 60, usegmt=True)) == 0.0
