"""Readiness: the serving flag, its listeners, problems that expire, and checked components."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from sia.health import Readiness
from tests.waiting import until


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


async def test_checks_report_into_the_one_state_and_listeners_hear_them() -> None:
    """A failing check takes the instance out, its recovery brings it back: `reasons()` and
    the listeners (gRPC health) both follow, and each component speaks for itself."""
    readiness, changes = started()
    healthy = {"tasks": True, "images": True}

    def answer(component: str) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return healthy[component]

        return check

    readiness.add_check("tasks", answer("tasks"), "task store is not answering")
    readiness.add_check("images", answer("images"), "image store cannot write")
    await readiness.check()
    assert await readiness.reasons() == {}

    healthy["images"] = False
    await readiness.check()
    assert await readiness.reasons() == {"images": "image store cannot write"}
    healthy["tasks"] = False
    await readiness.check()
    assert set(await readiness.reasons()) == {"images", "tasks"}
    healthy["images"] = True
    await readiness.check()
    assert await readiness.reasons() == {"tasks": "task store is not answering"}
    assert not readiness.serving
    healthy["tasks"] = True
    await readiness.check()
    assert await readiness.ready()
    assert changes == [False, True, False, True]  # out once, back once

    readiness.begin_shutdown()
    assert await readiness.reasons() == {"server": "shutting down"}


async def test_a_check_that_raises_or_hangs_is_a_failing_component() -> None:
    """An exception or no answer within the timeout counts as the component failing."""
    readiness, _ = started()
    never = asyncio.Event()

    async def raises() -> bool:
        raise OSError("disk gone")

    async def hangs() -> bool:
        await never.wait()
        return True

    readiness.add_check("images", raises, "image store cannot write")
    readiness.add_check("tasks", hangs, "task store is not answering")
    await readiness.check(timeout=0.01)
    reasons = await readiness.reasons()
    assert reasons["images"] == "image store cannot write"
    assert reasons["tasks"].startswith("task store is not answering (no answer within")


async def test_monitor_runs_the_checks_until_cancelled() -> None:
    """The monitor notices a failure and a recovery by itself."""
    readiness, _ = started()
    healthy = False

    async def check() -> bool:
        return healthy

    readiness.add_check("tasks", check, "task store is not answering")
    monitor = asyncio.create_task(readiness.monitor(0.01))
    try:
        await until(lambda: not readiness.serving, "the monitor never saw the failure")
        healthy = True
        await until(lambda: readiness.serving, "the monitor never saw the recovery")
    finally:
        monitor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await monitor
