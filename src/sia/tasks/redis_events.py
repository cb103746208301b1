"""Task changes across replicas for the `redis` backend: one pub/sub subscription each.

- Channel: `sia:<queue>:task-changed`; a message is the id of a task that
  changed, PUBLISHed by the replica that changed it once its write succeeded
  (`JobQueue.announce`): submit, claim, each progress, finish, cancel and
  the re-queues. The message carries no state: a watcher re-reads the task.
- Subscription: one per replica (`TaskEvents`), opened by `start()` and
  closed by `aclose()`, whatever the number of watches. It hands each id to
  the local watchers of that task (`sia.tasks.watchers`); an idle watch
  costs nothing, and the listener blocks on its socket, sending a PING only
  after `KEEPALIVE` seconds of silence so a dead connection is found.
- Outages: announcements published while the subscription is down are lost,
  so each (re)subscription wakes every local watcher once. That covers both
  paths back: the listener's own, which subscribes again after the outage
  back-off (`Outage`), and redis-py's silent reconnect, which re-subscribes
  and so also delivers a `subscribe` confirmation.

redis-py's exceptions never leave this module: the listener absorbs them.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from sia.logs import get_logger
from sia.tasks.redis_queue import FAULTS, Outage

if TYPE_CHECKING:
    from redis import asyncio as aioredis
    from redis.asyncio.client import PubSub

    from sia.tasks.watchers import Watchers

log = get_logger("sia.tasks.redis")

#: Seconds of silence after which the listener PINGs, to find a connection that died quietly.
KEEPALIVE = 30.0
#: How long subscribing (and its confirmation) may take before it counts as a failure.
SUBSCRIBE_TIMEOUT = 5.0


class TaskEvents:
    """This replica's subscription to task changes, dispatched to its `watchers`."""

    def __init__(self, redis: aioredis.Redis, channel: str, watchers: Watchers) -> None:
        self.channel = channel
        self._redis = redis
        self._watchers = watchers
        self._listener: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe, then listen in the background; raises what Redis raises if it cannot."""
        if self._listener is not None:
            raise RuntimeError("TaskEvents.start() may be called once")
        pubsub = await self._subscribed()
        self._listener = asyncio.create_task(self._listen(pubsub), name="sia-task-events")

    async def aclose(self) -> None:
        """Stop listening and close the subscription; idempotent."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)

    async def _subscribed(self) -> PubSub:
        """A new subscription to the channel, confirmed; every watcher is woken once."""
        pubsub = self._redis.pubsub()
        try:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                await pubsub.subscribe(self.channel)
                while not _confirms(await pubsub.get_message(timeout=None)):
                    pass
        except BaseException:
            await _close(pubsub)
            raise
        self._watchers.notify_all()  # whatever was announced before now was missed
        return pubsub

    async def _listen(self, pubsub: PubSub | None) -> None:
        """Dispatch announcements until cancelled, subscribing again after each failure."""
        outage = Outage()
        try:
            while True:
                try:
                    if pubsub is None:
                        pubsub = await self._subscribed()
                        outage.over()
                    await self._dispatch(pubsub)
                except Exception as exc:
                    if not isinstance(exc, FAULTS):
                        log.exception("task_events_error")
                    if pubsub is not None:
                        await _close(pubsub)
                        pubsub = None
                    await outage.wait(exc)
        finally:
            if pubsub is not None:
                await _close(pubsub)

    async def _dispatch(self, pubsub: PubSub) -> None:
        """Hand each announced id to its watchers; returns only by raising."""
        while True:
            message = await pubsub.get_message(timeout=KEEPALIVE)
            if message is None:
                await pubsub.ping()  # answered as a "pong" message on this connection
            elif message["type"] == "message":
                self._watchers.notify(message["data"].decode())
            elif _confirms(message):  # redis-py reconnected and subscribed again by itself
                log.info("task_events_resubscribed")
                self._watchers.notify_all()

    def __repr__(self) -> str:
        return f"TaskEvents(channel={self.channel!r}, listening={self._listener is not None})"


def _confirms(message: dict[str, Any] | None) -> bool:
    """Whether `message` is Redis's confirmation of a SUBSCRIBE."""
    return message is not None and message["type"] == "subscribe"


async def _close(pubsub: PubSub) -> None:
    with contextlib.suppress(*FAULTS):
        await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
