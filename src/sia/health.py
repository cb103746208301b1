"""Readiness: one place that decides whether this instance should get traffic.

The HTTP `/ready` endpoint, the gRPC health service and the HealthCheck RPC
all read the one state kept here. It is serving once start-up has finished,
until shutdown begins, and while no component has a problem on record.

Components report problems in two ways. Some report as they go (a provider
whose credentials were refused). The others register a check (`add_check`:
the task store, the blob store), which `check()` runs and `monitor()` runs
every few seconds; each failing check reports its component's problem and a
passing one clears it, so listeners (gRPC health) hear every change and
`/ready` reads the same state. Each component takes the instance out while
it fails and brings it back when it recovers.

A problem may be reported with an expiry: the provider's is, because an
instance out of rotation gets no calls that could show the problem fixed
(every replica shares the key, so all of them would stay out for good). When
it expires the instance serves again and the next call tells: a refused key
takes it out again, a success keeps it in.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from sia.logs import get_logger

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

log = get_logger("sia.health")


#: How long one check may take before its component counts as failing.
CHECK_TIMEOUT = 5.0


class Readiness:
    """Start-up, shutdown and component problems folded into one serving flag."""

    def __init__(self) -> None:
        self.started = False
        self.shutting_down = False
        self.shutdown_begun = asyncio.Event()  # what long-lived streams wait on to end
        self.problems: dict[str, str] = {}
        self._listeners: list[Callable[[bool], None]] = []
        self._expiries: dict[str, asyncio.TimerHandle] = {}
        self._checks: dict[str, tuple[Callable[[], Awaitable[bool]], str]] = {}

    @property
    def serving(self) -> bool:
        """True when the instance should receive new work."""
        return self.started and not self.shutting_down and not self.problems

    def add_check(self, component: str, check: Callable[[], Awaitable[bool]], problem: str) -> None:
        """Let `check()` and `monitor()` ask `check`; False reports `problem` for `component`."""
        self._checks[component] = (check, problem)

    async def check(self, *, timeout: float = CHECK_TIMEOUT) -> None:
        """Run every registered check at once and report each outcome.

        A check that raises, or has not answered within `timeout` seconds,
        fails like one that returns False: a store that hangs is not ready.
        """
        components = list(self._checks)
        outcomes = await asyncio.gather(
            *(self._run_check(component, timeout) for component in components)
        )
        for component, problem in zip(components, outcomes, strict=True):
            before = self.problems.get(component)
            if problem == before:
                continue
            if problem is None:
                log.info("readiness_restored", component=component, problem=before)
            else:
                log.error("readiness_lost", component=component, problem=problem)
            self.report(component, problem)

    async def _run_check(self, component: str, timeout: float) -> str | None:
        check, problem = self._checks[component]
        try:
            async with asyncio.timeout(timeout):
                ok = await check()
        except TimeoutError:
            return f"{problem} (no answer within {timeout:g} s)"
        except Exception as exc:  # a broken check is a failing component, not a dead monitor
            log.warning("readiness_check_failed", component=component, error=type(exc).__name__)
            return problem
        return None if ok else problem

    async def monitor(self, interval: float) -> None:
        """Run `check()` every `interval` seconds, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check(timeout=min(CHECK_TIMEOUT, interval))
            except Exception:  # keep watching: the next round may tell
                log.exception("readiness_monitor_failed")

    async def reasons(self) -> dict[str, str]:
        """Why this instance should not get traffic now, by component; empty when it should.

        The state as reported; checks add to it through `check()`, not here,
        so `/ready` and gRPC health never disagree.
        """
        reasons = dict(self.problems)
        if not self.started:
            reasons["server"] = "starting"
        if self.shutting_down:
            reasons["server"] = "shutting down"
        return reasons

    async def ready(self) -> bool:
        """True when this instance should receive traffic (see `reasons`)."""
        return not await self.reasons()

    def on_change(self, listener: Callable[[bool], None]) -> None:
        """Call `listener(serving)` now and whenever the serving flag changes."""
        self._listeners.append(listener)
        listener(self.serving)

    def mark_started(self) -> None:
        """Start-up has finished."""
        self._update(lambda: setattr(self, "started", True))

    def begin_shutdown(self) -> None:
        """Shutdown has begun: stop receiving new work."""
        self.shutdown_begun.set()
        self._update(lambda: setattr(self, "shutting_down", True))

    def report(
        self, component: str, problem: str | None, *, expires_after: float | None = None
    ) -> None:
        """Record a component's problem, or clear it with None.

        With `expires_after` (seconds; needs a running event loop) the problem
        clears itself then, unless reported again meanwhile.
        """
        if problem is None and component not in self.problems:
            return  # the common case: a provider call succeeded, as before
        expiry = self._expiries.pop(component, None)
        if expiry is not None:
            expiry.cancel()
        if problem is None:
            self._update(lambda: self.problems.pop(component, None))
            return
        self._update(lambda: self.problems.__setitem__(component, problem))
        if expires_after is not None:
            loop = asyncio.get_running_loop()
            self._expiries[component] = loop.call_later(expires_after, self._expire, component)

    def _expire(self, component: str) -> None:
        log.info("readiness_recheck", component=component, problem=self.problems.get(component))
        self.report(component, None)

    def _update(self, change: Callable[[], object]) -> None:
        before = self.serving
        change()
        if self.serving != before:
            for listener in self._listeners:
                listener(self.serving)
