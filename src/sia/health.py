"""Readiness: one place that decides whether this instance should get traffic.

The HTTP `/ready` endpoint, the gRPC health service and the HealthCheck RPC
all read it. It is serving once start-up has finished, until shutdown begins,
and while no component has reported itself unfit (for example a provider
whose credentials were refused). `reasons()` also asks the components that
are checked on demand (the task store) whether they answer.

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


class Readiness:
    """Start-up, shutdown and component problems folded into one serving flag."""

    def __init__(self) -> None:
        self.started = False
        self.shutting_down = False
        self.problems: dict[str, str] = {}
        self._listeners: list[Callable[[bool], None]] = []
        self._expiries: dict[str, asyncio.TimerHandle] = {}
        self._checks: dict[str, tuple[Callable[[], Awaitable[bool]], str]] = {}

    @property
    def serving(self) -> bool:
        """True when the instance should receive new work."""
        return self.started and not self.shutting_down and not self.problems

    def add_check(self, component: str, check: Callable[[], Awaitable[bool]], problem: str) -> None:
        """Ask `check()` on every readiness query; False reports `problem` for `component`."""
        self._checks[component] = (check, problem)

    async def reasons(self) -> dict[str, str]:
        """Why this instance should not get traffic now, by component; empty when it should."""
        reasons = dict(self.problems)
        if not self.started:
            reasons["server"] = "starting"
        if self.shutting_down:
            reasons["server"] = "shutting down"
        if not reasons:
            for component, (check, problem) in self._checks.items():
                if not await check():
                    reasons[component] = problem
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
