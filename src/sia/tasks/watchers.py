"""This process's watchers of tasks: the in-process half of `TaskBackend.watch`.

A watch is one `asyncio.Event` in a set kept per task id while the watch is
open: a change of the task sets the events of its set, and `changed()` waits
for its own event and clears it. Nothing runs while nobody changes a task, so
an idle watch costs memory (the event and its set entry) but no CPU.

The backend calls `notify(task_id)` after each write that changes a task
(the SQLite backend itself; the Redis backend on each announcement that
reaches this replica) and `notify_all()` when changes may have been missed.
A notification carries no state: a watcher re-reads the task.
"""

from __future__ import annotations

import asyncio


class Watchers:
    """The open watches of this process, by task id."""

    def __init__(self) -> None:
        self._by_task: dict[str, set[asyncio.Event]] = {}

    def watch(self, task_id: str) -> Watch:
        """A watch of `task_id`, registered while it is open (`async with`)."""
        return Watch(self, task_id)

    def notify(self, task_id: str) -> None:
        """Wake every open watch of `task_id`."""
        for event in self._by_task.get(task_id, ()):
            event.set()

    def notify_all(self) -> None:
        """Wake every open watch, of any task (after changes may have gone unannounced)."""
        for events in self._by_task.values():
            for event in events:
                event.set()

    def __len__(self) -> int:
        """How many watches are open."""
        return sum(len(events) for events in self._by_task.values())

    def _add(self, task_id: str, event: asyncio.Event) -> None:
        self._by_task.setdefault(task_id, set()).add(event)

    def _remove(self, task_id: str, event: asyncio.Event) -> None:
        events = self._by_task.get(task_id)
        if events is not None:
            events.discard(event)
            if not events:
                del self._by_task[task_id]

    def __repr__(self) -> str:
        return f"Watchers(tasks={len(self._by_task)}, watches={len(self)})"


class Watch:
    """One open subscription to a task's changes (a `sia.tasks.base.TaskWatch`)."""

    __slots__ = ("_event", "_open", "_task_id", "_watchers")

    def __init__(self, watchers: Watchers, task_id: str) -> None:
        self._watchers = watchers
        self._task_id = task_id
        self._event = asyncio.Event()
        self._open = False

    async def __aenter__(self) -> Watch:
        if self._open:
            raise RuntimeError("this watch is already open")
        self._watchers._add(self._task_id, self._event)
        self._open = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._open = False
        self._watchers._remove(self._task_id, self._event)

    async def changed(self) -> None:
        """Return once the task has changed since the last call (or since opening)."""
        if not self._open:
            raise RuntimeError("open the watch (`async with`) before waiting on it")
        await self._event.wait()
        self._event.clear()

    def __repr__(self) -> str:
        return f"Watch(task_id={self._task_id!r}, open={self._open})"
