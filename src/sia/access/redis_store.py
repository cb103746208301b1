"""The Redis access store: API keys and the usage ledger every replica shares.

Layout, for a namespace NS:

- `sia:NS:keys`, a hash: field = key name, value = the key's JSON
  (`sia.access.codec.key_to_json`: its hash and prefix, never the key).
  `add_key` is one HSETNX, so two concurrent adds of one name cannot both
  win; `revoke_key` rewrites the field under WATCH.
- `sia:NS:usage:YYYY-MM-DD`, a hash per UTC day: field = the JSON array
  `[key, model, counter]` (unambiguous whatever a model is called), value =
  the running total. One `record_usage` is one MULTI/EXEC of HINCRBYs, and
  each day hash it touches expires `RETENTION_DAYS` after its last write.
- `sia:NS:usage-days`, a sorted set of the days that have a usage hash
  (score: the day's ordinal), so `usage()` finds the days of any range in
  one command and reads them in one pipeline, however long the range.

redis-py's exceptions never leave this module: Redis unreachable at `open()`
is a `ConfigError`, any fault after that is `Unavailable`.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import date
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import urlsplit

from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import WatchError

from sia.access.base import ApiKey, UsageEntry
from sia.access.codec import COUNTERS, key_from_json, key_to_json, merge_usage
from sia.errors import AlreadyExists, ConfigError, NotFound, Unavailable
from sia.logs import get_logger
from sia.stores import store_faults
from sia.tasks.redis_queue import FAULTS, ping

if TYPE_CHECKING:
    from collections.abc import Sequence
    from datetime import datetime
    from types import TracebackType

log = get_logger("sia.access")

#: How long a day's usage is kept after its last write.
RETENTION_DAYS = 400
_RETENTION_SECONDS = RETENTION_DAYS * 86400
#: How often revoke_key tries again when another client changes the keys meanwhile.
_REVOKE_TRIES = 10
#: A call fails within about a second when Redis is down rather than hang.
_CLIENT_OPTIONS: dict[str, Any] = {
    "socket_connect_timeout": 1.0,
    "socket_timeout": 5.0,
    "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.2), retries=2),
    "decode_responses": True,
}


class RedisAccessStore:
    """An AccessStore on Redis under `sia:<namespace>:`; `open()` (or `async with`) first."""

    def __init__(self, url: str, namespace: str) -> None:
        if not namespace:
            raise ValueError("the access store's namespace must not be empty")
        self._url = url
        self.namespace = namespace
        self._redis: aioredis.Redis | None = None

    def _key(self, kind: str) -> str:
        return f"sia:{self.namespace}:{kind}"

    def _day_key(self, day: str) -> str:
        return self._key(f"usage:{day}")

    async def open(self) -> None:
        """Connect and check that Redis answers; ConfigError when it does not."""
        if self._redis is not None:
            raise RuntimeError("RedisAccessStore.open() may be called once")
        try:
            redis = aioredis.from_url(self._url, **_CLIENT_OPTIONS)
        except ValueError as exc:
            raise ConfigError(f"REDIS_URL is not a Redis URL: {exc}") from exc
        try:
            await ping(redis)
        except FAULTS as exc:
            await redis.aclose()
            raise ConfigError(
                f"cannot reach Redis at {_masked(self._url)} for the access store "
                f"({type(exc).__name__})"
            ) from exc
        self._redis = redis

    async def add_key(self, key: ApiKey) -> None:
        """Store a new key; AlreadyExists when its name is taken (revoked too)."""
        redis = self._conn
        with store_faults("access", "redis", *FAULTS):
            added = await redis.hsetnx(self._key("keys"), key.name, key_to_json(key))  # type: ignore[misc]
        if not added:
            raise AlreadyExists(f"an API key named {key.name!r} exists")

    async def revoke_key(self, name: str, at: datetime) -> ApiKey:
        """Mark the key revoked; NotFound when no key has that name."""
        redis, keys = self._conn, self._key("keys")
        with store_faults("access", "redis", *FAULTS):
            async with redis.pipeline(transaction=True) as pipe:
                for _ in range(_REVOKE_TRIES):
                    try:
                        await pipe.watch(keys)
                        stored = await pipe.hget(keys, name)  # type: ignore[misc]
                        if stored is None:
                            raise NotFound(f"no API key named {name!r}")
                        key = key_from_json(stored)
                        if key.revoked:
                            return key
                        revoked = dataclasses.replace(key, revoked_at=at)
                        pipe.multi()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
                        pipe.hset(keys, name, key_to_json(revoked))
                        await pipe.execute()
                    except WatchError:
                        continue  # another client changed a key meanwhile: read again
                    return revoked
        raise Unavailable("the API keys kept changing while revoking one; retry")

    async def keys(self) -> list[ApiKey]:
        """Every key, revoked ones included, oldest first."""
        redis = self._conn
        with store_faults("access", "redis", *FAULTS):
            stored: dict[str, str] = await redis.hgetall(self._key("keys"))  # type: ignore[misc]
        keys = []
        for name, text in stored.items():
            try:
                keys.append(key_from_json(text))
            except ValueError as exc:  # a damaged record must not hide every other key
                log.error("api_key_unreadable", key_name=name, error=str(exc)[:200])
        return sorted(keys, key=lambda key: (key.created_at, key.name))

    async def record_usage(self, entries: Sequence[UsageEntry]) -> None:
        """Add each entry's counts to its (key, model, day) totals, in one MULTI/EXEC."""
        merged = merge_usage(entries)
        if not merged:
            return
        redis, index = self._conn, self._key("usage-days")
        days: set[date] = set()
        with store_faults("access", "redis", *FAULTS):
            async with redis.pipeline(transaction=True) as pipe:
                for (key, model, day), counts in merged.items():
                    for counter, count in zip(COUNTERS, counts, strict=True):
                        if count:
                            field = _field(key, model, counter)
                            pipe.hincrby(self._day_key(day.isoformat()), field, count)
                    days.add(day)
                for day in days:
                    pipe.expire(self._day_key(day.isoformat()), _RETENTION_SECONDS)
                pipe.zadd(index, {day.isoformat(): day.toordinal() for day in days})
                pipe.expire(index, _RETENTION_SECONDS)
                await pipe.execute()

    async def usage(self, key: str | None, first: date, last: date) -> list[UsageEntry]:
        """Totals per (key, model, day) for days in [first, last]; every key when None."""
        redis = self._conn
        with store_faults("access", "redis", *FAULTS):
            index = self._key("usage-days")
            days: list[str] = await redis.zrangebyscore(index, first.toordinal(), last.toordinal())
            if not days:
                return []
            async with redis.pipeline(transaction=False) as pipe:
                for day in days:
                    pipe.hgetall(self._day_key(day))
                hashes: list[dict[str, str]] = await pipe.execute()
        totals: dict[tuple[date, str, str], dict[str, int]] = {}
        for day, fields in zip(days, hashes, strict=True):
            for field, value in fields.items():
                parsed = _parse_field(field)
                if parsed is None or (key is not None and parsed[0] != key):
                    continue
                name, model, counter = parsed
                totals.setdefault((date.fromisoformat(day), name, model), {})[counter] = int(value)
        return [
            UsageEntry(key=name, model=model, day=day, **counts)
            for (day, name, model), counts in sorted(totals.items())
        ]

    async def ping(self) -> bool:
        """True when Redis answers PING."""
        try:
            return await ping(self._conn)
        except FAULTS:
            return False

    async def aclose(self) -> None:
        """Close the connection pool; idempotent."""
        redis, self._redis = self._redis, None
        if redis is not None:
            await redis.aclose()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"RedisAccessStore(url={_masked(self._url)!r}, namespace={self.namespace!r})"

    @property
    def _conn(self) -> aioredis.Redis:
        if self._redis is None:
            raise RuntimeError("RedisAccessStore is not open, or already closed")
        return self._redis


def _field(key: str, model: str, counter: str) -> str:
    """The usage field of one counter: a JSON array, so no name can be mistaken for another."""
    return json.dumps([key, model, counter], ensure_ascii=False, separators=(",", ":"))


def _parse_field(field: str) -> tuple[str, str, str] | None:
    """(key, model, counter) of a field `_field` wrote; None for anything else."""
    try:
        parsed = json.loads(field)
    except ValueError:
        return None
    if (
        not isinstance(parsed, list)
        or len(parsed) != 3  # key, model, counter
        or not all(isinstance(part, str) for part in parsed)
        or parsed[2] not in COUNTERS
    ):
        return None
    return parsed[0], parsed[1], parsed[2]


def _masked(url: str) -> str:
    """`url` without its user, password or query (a password may hide in either)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}"
