"""Readiness: the serving flag, its listeners, and problems that expire."""

from __future__ import annotations

import asyncio

from sia.health import Readiness


def started() -> tuple[Readiness, list[bool]]:
    readiness = Readiness()
    changes: list[bool] = []
    readiness.on_change(changes.append)
    readiness.mark_started()
    return readiness, changes


def test_serving_from_start_until_shutdown_or_a_problem() -> None:
    readiness, changes = started()
    assert readiness.serving
    readiness.report("provider", "key refused")
    assert not readiness.serving
    readiness.report("provider", None)
    assert readiness.serving
    readiness.begin_shutdown()
    assert not readiness.serving
    assert changes == [False, True, False, True, False]  # listeners hear each flip once


async def serving_again(readiness: Readiness) -> None:
    """Wait, within a few seconds, until `readiness` serves again."""
    back = asyncio.Event()
    readiness.on_change(lambda serving: back.set() if serving else None)
    async with asyncio.timeout(5):
        await back.wait()


async def test_a_problem_with_an_expiry_clears_itself() -> None:
    """A problem reported with an expiry goes away by itself, and listeners hear it."""
    readiness, changes = started()
    readiness.report("provider", "key refused", expires_after=0.01)
    assert not readiness.serving
    await serving_again(readiness)
    assert readiness.problems == {}
    assert changes == [False, True, False, True]


async def test_a_new_report_restarts_the_expiry_and_a_clear_cancels_it() -> None:
    """Reporting again moves the expiry later; clearing cancels it; others are untouched."""
    readiness, _ = started()
    loop = asyncio.get_running_loop()
    readiness.report("provider", "key refused", expires_after=100)
    first = readiness._expiries["provider"]
    readiness.report("provider", "still refused", expires_after=200)  # the call failed again
    second = readiness._expiries["provider"]
    assert first.cancelled() and not second.cancelled()
    assert second.when() >= loop.time() + 199
    assert readiness.problems == {"provider": "still refused"}

    readiness.report("provider", None)  # a call succeeded
    assert second.cancelled() and "provider" not in readiness._expiries
    readiness.report("tasks", "down")  # another component's problem, no expiry
    assert readiness.problems == {"tasks": "down"}
    assert readiness._expiries == {}


async def test_checks_run_on_demand_only_when_nothing_else_is_wrong() -> None:
    """A component checked on demand adds its problem; while starting it is not asked."""
    readiness = Readiness()
    answers: list[bool] = []

    async def tasks_answer() -> bool:
        answers.append(True)
        return healthy

    healthy = False
    readiness.add_check("tasks", tasks_answer, "task store is not answering")
    assert await readiness.reasons() == {"server": "starting"}
    assert answers == []
    readiness.mark_started()
    assert await readiness.reasons() == {"tasks": "task store is not answering"}
    healthy = True
    assert await readiness.ready()
    readiness.begin_shutdown()
    assert await readiness.reasons() == {"server": "shutting down"}
