"""Builds the access gate the settings describe: its store and where limits count.

The `sia keys` and `sia usage` commands use `build_access_store` too, so run beside
`sia serve` with the same settings they reach the keys that server reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sia.access.gate import AccessControl
from sia.access.limits import (
    MemorySlots,
    MemoryWindows,
    RedisSlots,
    Slots,
    Windows,
    redis_windows,
)

#: Fail fast when Redis hangs: a limit that cannot be counted is UNAVAILABLE, not a wait.
LIMITS_CLIENT: dict[str, Any] = {"socket_connect_timeout": 1.0, "socket_timeout": 2.0}

if TYPE_CHECKING:
    from sia.access.base import AccessStore
    from sia.config import Settings
    from sia.metrics import Metrics


def build_access_store(settings: Settings) -> AccessStore:
    """The access store beside the tasks: Redis with TASK_BACKEND=redis, else SQLite."""
    if settings.task_backend == "redis":
        from sia.access.redis_store import RedisAccessStore  # noqa: PLC0415 - Redis only when used

        return RedisAccessStore(settings.redis_url.get_secret_value(), settings.redis_queue)
    from sia.access.sqlite_store import SqliteAccessStore  # noqa: PLC0415

    return SqliteAccessStore(settings.data_dir / "access.db")


def build_access(settings: Settings, metrics: Metrics) -> AccessControl:
    """The gate with its store, and its limits in memory or in Redis (LIMITS_STORAGE)."""
    store = build_access_store(settings)
    if settings.limits_backend == "redis":
        from redis import asyncio as aioredis  # noqa: PLC0415

        client = aioredis.from_url(settings.redis_url.get_secret_value(), **LIMITS_CLIENT)
        prefix = f"sia:{settings.redis_queue}:limits:"
        windows: Windows = redis_windows(client, prefix)
        slot_ttl = settings.image_timeout + 60  # a dead replica's slots free themselves
        slots: Slots = RedisSlots(client, prefix + "slots:", slot_ttl)  # closes the client
    else:
        windows, slots = MemoryWindows(), MemorySlots()
    return AccessControl(settings, store, metrics, windows=windows, slots=slots)
