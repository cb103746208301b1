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


async def test_a_problem_with_an_expiry_clears_itself() -> None:
    readiness, changes = started()
    readiness.report("provider", "key refused", expires_after=0.05)
    assert not readiness.serving
    await asyncio.sleep(0.15)
    assert readiness.serving
    assert changes == [False, True, False, True]


async def test_a_new_report_restarts_the_expiry_and_a_clear_cancels_it() -> None:
    readiness, _ = started()
    readiness.report("provider", "key refused", expires_after=0.1)
    await asyncio.sleep(0.06)
    readiness.report("provider", "still refused", expires_after=0.1)  # the call failed again
    await asyncio.sleep(0.06)
    assert readiness.problems == {"provider": "still refused"}  # 0.12 s after the first
    await asyncio.sleep(0.1)
    assert readiness.serving

    readiness.report("provider", "refused", expires_after=0.05)
    readiness.report("provider", None)  # a call succeeded
    readiness.report("tasks", "down")  # another component's problem, no expiry
    await asyncio.sleep(0.1)
    assert readiness.problems == {"tasks": "down"}
