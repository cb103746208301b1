"""The Redis delivery store: pending webhook deliveries every replica shares.

Layout, for a queue Q (REDIS_QUEUE):

- `sia:Q:webhooks:due`, a sorted set: member = delivery id, score = when it
  is next due (seconds since the epoch); a claimed delivery's score is the
  end of its lease;
- `sia:Q:webhooks:records`, a hash: id -> the delivery's fixed part as JSON
  (task_id, type, url, payload, created_at);
- `sia:Q:webhooks:attempts`, a hash: id -> attempts claimed so far;
- `sia:Q:webhooks:errors`, a hash: id -> the last attempt's error.

A claim is one Lua script (`_CLAIM`): it takes the earliest due ids, moves
each one's score to the end of the lease and counts the attempt, all in one
atomic step, so two replicas never claim the same attempt. `reschedule` is a
script too: it applies only while the attempt count is the claim's own.

redis-py's exceptions never leave this module: Redis unreachable at `open()`
is a `ConfigError`, any fault after that is `Unavailable`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import urlsplit

from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from sia.errors import ConfigError
from sia.logs import get_logger
from sia.stores import store_faults
from sia.tasks.redis_queue import FAULTS, ping
from sia.webhooks.store import Delivery

if TYPE_CHECKING:
    from types import TracebackType

log = get_logger("sia.webhooks")

#: A call fails within about a second when Redis is down rather than hang.
_CLIENT_OPTIONS: dict[str, Any] = {
    "socket_connect_timeout": 1.0,
    "socket_timeout": 5.0,
    "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.2), retries=2),
    "decode_responses": True,
}
# KEYS: due, records, attempts, errors. ARGV: now, limit, lease end.
# Returns [id, record, attempts, last_error, ...]; an id without a record is dropped.
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(ids) do
  local record = redis.call('HGET', KEYS[2], id)
  if record then
    local attempts = redis.call('HINCRBY', KEYS[3], id, 1)
    redis.call('ZADD', KEYS[1], ARGV[3], id)
    local err = redis.call('HGET', KEYS[4], id) or ''
    table.insert(out, id)
    table.insert(out, record)
    table.insert(out, tostring(attempts))
    table.insert(out, err)
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
"""
# KEYS: due, attempts, errors. ARGV: id, next_at, attempts, last_error.
_RESCHEDULE = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[3] then return 0 end
redis.call('ZADD', KEYS[1], 'XX', ARGV[2], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
return 1
"""
_FIELDS = 4  # per delivery in _CLAIM's answer


class RedisDeliveryStore:
    """A DeliveryStore on Redis under `sia:<queue>:webhooks:`; `open()` (or `async with`) first."""

    def __init__(self, url: str, queue: str) -> None:
        if not queue:
            raise ValueError("the delivery store's queue name must not be empty")
        self._url = url
        self.queue = queue
        prefix = f"sia:{queue}:webhooks:"
        self._due = prefix + "due"
        self._records = prefix + "records"
        self._attempts = prefix + "attempts"
        self._errors = prefix + "errors"
        self._redis: aioredis.Redis | None = None
        self._claim: Any = None
        self._reschedule: Any = None

    async def open(self) -> None:
        """Connect and check that Redis answers; ConfigError when it does not."""
        if self._redis is not None:
            raise RuntimeError("RedisDeliveryStore.open() may be called once")
        try:
            redis = aioredis.from_url(self._url, **_CLIENT_OPTIONS)
        except ValueError as exc:
            raise ConfigError(f"REDIS_URL is not a Redis URL: {exc}") from exc
        try:
            await ping(redis)
        except FAULTS as exc:
            await redis.aclose()
            raise ConfigError(
                f"cannot reach Redis at {_masked(self._url)} for webhook deliveries "
                f"({type(exc).__name__})"
            ) from exc
        self._claim = redis.register_script(_CLAIM)
        self._reschedule = redis.register_script(_RESCHEDULE)
        self._redis = redis

    async def add(self, delivery: Delivery) -> None:
        """Store a new delivery; adding an id again changes nothing."""
        d = delivery
        record = json.dumps(
            {
                "task_id": d.task_id,
                "type": d.type,
                "url": d.url,
                "payload": d.payload,
                "created_at": d.created_at,
            },
            ensure_ascii=False,
        )
        redis = self._conn
        with store_faults("webhook", "redis", *FAULTS):
            async with redis.pipeline(transaction=True) as pipe:
                pipe.hsetnx(self._records, d.id, record)
                pipe.hsetnx(self._attempts, d.id, str(d.attempts))
                pipe.hsetnx(self._errors, d.id, d.last_error)
                pipe.zadd(self._due, {d.id: d.next_at}, nx=True)
                await pipe.execute()

    async def claim_due(self, now: float, limit: int, *, lease: float) -> list[Delivery]:
        """Up to `limit` due deliveries, each leased until `now + lease`, attempts counted."""
        if limit <= 0:
            return []
        self._check_open()
        keys = [self._due, self._records, self._attempts, self._errors]
        with store_faults("webhook", "redis", *FAULTS):
            flat: list[str] = await self._claim(keys=keys, args=[now, limit, now + lease])
        claimed = []
        for i in range(0, len(flat), _FIELDS):
            id, record, attempts, last_error = flat[i : i + _FIELDS]
            try:
                fixed = json.loads(record)
                delivery = Delivery(
                    id=id,
                    task_id=str(fixed["task_id"]),
                    type=str(fixed["type"]),
                    url=str(fixed["url"]),
                    payload=str(fixed["payload"]),
                    created_at=float(fixed["created_at"]),
                    next_at=now + lease,
                    attempts=int(attempts),
                    last_error=last_error,
                )
            except (ValueError, TypeError, KeyError) as exc:
                # A damaged record can never be sent: drop it rather than claim it forever.
                log.error("webhook_delivery_unreadable", webhook_id=id, error=str(exc)[:200])
                await self.done(id)
                continue
            claimed.append(delivery)
        return claimed

    async def reschedule(self, id: str, next_at: float, attempts: int, last_error: str) -> bool:
        """Due again at `next_at`, unless claimed again (or deleted) since."""
        self._check_open()
        keys = [self._due, self._attempts, self._errors]
        with store_faults("webhook", "redis", *FAULTS):
            applied = await self._reschedule(keys=keys, args=[id, next_at, attempts, last_error])
        return bool(applied)

    async def done(self, id: str) -> None:
        """Delete the delivery; idempotent."""
        redis = self._conn
        with store_faults("webhook", "redis", *FAULTS):
            async with redis.pipeline(transaction=True) as pipe:
                pipe.zrem(self._due, id)
                pipe.hdel(self._records, id)
                pipe.hdel(self._attempts, id)
                pipe.hdel(self._errors, id)
                await pipe.execute()

    async def pending(self) -> int:
        """How many deliveries wait."""
        redis = self._conn
        with store_faults("webhook", "redis", *FAULTS):
            return int(await redis.zcard(self._due))

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
        return f"RedisDeliveryStore(url={_masked(self._url)!r}, queue={self.queue!r})"

    @property
    def _conn(self) -> aioredis.Redis:
        if self._redis is None:
            raise RuntimeError("RedisDeliveryStore is not open, or already closed")
        return self._redis

    def _check_open(self) -> None:
        _ = self._conn  # raises when closed


def _masked(url: str) -> str:
    """`url` without its user, password or query (a password may hide in either)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}"
