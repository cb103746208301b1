"""Readiness: one place that decides whether this instance should get traffic.

The HTTP `/ready` endpoint, the gRPC health service and the HealthCheck RPC
all read it. It is serving once start-up has finished, until shutdown begins,
and while no component has reported itself unfit (for example a provider
whose credentials were refused).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable


class Readiness:
    """Start-up, shutdown and component problems folded into one serving flag."""

    def __init__(self) -> None:
        self.started = False
        self.shutting_down = False
        self.problems: dict[str, str] = {}
        self._listeners: list[Callable[[bool], None]] = []

    @property
    def serving(self) -> bool:
        """True when the instance should receive new work."""
        return self.started and not self.shutting_down and not self.problems

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

    def report(self, component: str, problem: str | None) -> None:
        """Record a component's problem, or clear it with None."""
        if problem is None:
            self._update(lambda: self.problems.pop(component, None))
        else:
            self._update(lambda: self.problems.__setitem__(component, problem))

    def _update(self, change: Callable[[], object]) -> None:
        before = self.serving
        change()
        if self.serving != before:
            for listener in self._listeners:
                listener(self.serving)
