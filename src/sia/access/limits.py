"""Rate limits and concurrency slots, counted in memory or in the Redis replicas share.

Requests and images per minute (per key) and the account's images per
minute (per model) are sliding-window counters: this minute's count plus the
last minute's, weighted by how much of it is still within 60 s. Two counters
per window whatever the rate (a moving window keeps a timestamp per hit,
O(limit) memory and time per call). When replicas share Redis they count in
the `limits` package's Redis storage, so the first N calls pass across all of
them and call N+1 is refused whichever replica takes it. One replica counts
in `MemoryWindows`, the same algorithm as a dict of tuples: `limits`' memory
storage starts an asyncio task per hit to expire its entries, which cost a
keyed call about a fifth more CPU than an open one (bench/README.md).

Concurrency slots are counted here: a counter in memory, or a sorted set per
key in Redis whose members expire, so a replica that dies holding slots frees
them after `slot_ttl` seconds.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from math import floor
from typing import TYPE_CHECKING, Protocol

from limits import RateLimitItemPerMinute
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from redis.exceptions import RedisError

from sia.errors import Unavailable

if TYPE_CHECKING:
    from redis import asyncio as aioredis

#: Shortest RetryInfo a limit gives: a window's reset time can be a moment away.
MIN_RETRY = 0.05
#: Seconds in a window.
WINDOW = 60.0
_FAULTS = (RedisError, OSError, ConnectionError, TimeoutError)


class Slots(Protocol):
    """Concurrency slots per name: take one if fewer than `limit` are held."""

    async def take(self, name: str, limit: int) -> str | None:
        """A token for a slot of `name`, or None when `limit` are taken."""
        ...

    async def give_back(self, name: str, token: str) -> None:
        """Free the slot `token` holds."""
        ...

    async def aclose(self) -> None:
        """Release any connection."""
        ...


class MemorySlots:
    """Slots counted in this process."""

    def __init__(self) -> None:
        self._held: dict[str, int] = {}

    async def take(self, name: str, limit: int) -> str | None:
        held = self._held.get(name, 0)
        if held >= limit:
            return None
        self._held[name] = held + 1
        return name

    async def give_back(self, name: str, token: str) -> None:
        held = self._held.get(name, 0) - 1
        if held > 0:
            self._held[name] = held
        else:
            self._held.pop(name, None)

    async def aclose(self) -> None:
        pass


# KEYS[1] the set; ARGV: now, expiry of the new member, limit, member. 1 if taken.
_TAKE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('PEXPIRE', KEYS[1], math.ceil((tonumber(ARGV[2]) - tonumber(ARGV[1])) * 1000))
return 1
"""


class RedisSlots:
    """Slots counted in Redis: one sorted set per name, members scored by their expiry."""

    def __init__(self, redis: aioredis.Redis, prefix: str, slot_ttl: float) -> None:
        self._redis = redis
        self._prefix = prefix
        self._ttl = slot_ttl
        self._take = redis.register_script(_TAKE)

    async def take(self, name: str, limit: int) -> str | None:
        token = uuid.uuid4().hex
        now = time.time()
        try:
            taken = await self._take(
                keys=[self._prefix + name], args=[now, now + self._ttl, limit, token]
            )
        except _FAULTS as exc:
            raise _unavailable(exc) from exc
        return token if taken else None

    async def give_back(self, name: str, token: str) -> None:
        with contextlib.suppress(*_FAULTS):  # else the member expires after slot_ttl
            await self._redis.zrem(self._prefix + name, token)

    async def aclose(self) -> None:
        await self._redis.aclose()


class Windows(Protocol):
    """Sliding one-minute windows: `hit` takes `cost` from a window, or says when to retry."""

    async def hit(self, per_minute: int, cost: int, *names: str) -> float | None:
        """Take `cost` from the window of `names` (at most `per_minute` a minute): None
        when taken, else the seconds until `cost` may fit."""
        ...


class MemoryWindows:
    """Sliding-window counters in this process: (minute, last minute's count, this
    minute's count) per window. Windows are named by keys and models, so they are few."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, ...], tuple[int, int, int]] = {}

    async def hit(self, per_minute: int, cost: int, *names: str) -> float | None:
        now = time.time()
        minute, into = divmod(now, WINDOW)
        index = int(minute)
        seen, previous, current = self._counts.get(names, (index, 0, 0))
        if seen != index:  # a new minute: this one's count becomes the last one's
            previous, current = (current if seen == index - 1 else 0), 0
        room = per_minute - cost
        if floor(previous * (WINDOW - into) / WINDOW) + current <= room:
            self._counts[names] = (index, previous, current + cost)
            return None
        # The weighted count is floored: a share fits once it is below room + 1.
        if current <= room:  # the last minute's share decays enough within this one
            return max(MIN_RETRY, WINDOW * (1 - (room - current + 1) / previous) - into)
        # Not before this minute ends, and then until its own share has decayed enough.
        return WINDOW - into + max(MIN_RETRY, WINDOW * (1 - (max(room, 0) + 1) / current))


class RedisWindows:
    """Sliding-window counters in Redis, through the `limits` package."""

    def __init__(self, storage: RedisStorage) -> None:
        self._limiter = SlidingWindowCounterRateLimiter(storage)
        self._items: dict[int, RateLimitItemPerMinute] = {}

    async def hit(self, per_minute: int, cost: int, *names: str) -> float | None:
        """Take `cost` from the window of `names` (at most `per_minute` a minute): None
        when taken, else the seconds until `cost` fits."""
        item = self._items.get(per_minute)
        if item is None:
            item = self._items[per_minute] = RateLimitItemPerMinute(per_minute)
        try:
            if await self._limiter.hit(item, *names, cost=cost):
                return None
            reset = (await self._limiter.get_window_stats(item, *names)).reset_time
        except _FAULTS as exc:
            raise _unavailable(exc) from exc
        return max(MIN_RETRY, reset - time.time())


def redis_windows(client: aioredis.Redis, prefix: str) -> RedisWindows:
    """Windows in the Redis of `client` (sharing its connections), keys under `prefix`."""
    return RedisWindows(
        RedisStorage(
            "async+redis://",  # the connection pool below decides where
            implementation="redispy",
            key_prefix=prefix,
            connection_pool=client.connection_pool,  # type: ignore[arg-type]  # passed through
        )
    )


def _unavailable(exc: BaseException) -> Unavailable:
    return Unavailable(f"the rate-limit store is not answering ({type(exc).__name__}); retry")
