"""The SQLite access store: API keys and the usage ledger in `<DATA_DIR>/access.db`.

Two processes share the file: the server (reading keys every few seconds
and adding usage) and the `sia keys` / `sia usage` commands run beside it.
The file is in WAL mode, so readers never wait for a writer, and every
connection waits up to `busy_timeout` for another's write to end.

One aiosqlite connection in autocommit mode serves the store; every change
is a single statement (a batch of usage is one upsert over a JSON array), so
no transaction spans an `await` and coroutines sharing the connection never
see each other's half-done work.

sqlite3's exceptions never leave this module: a file that cannot be opened,
or that holds a newer schema, is a `ConfigError` at `open()`; any fault after
that (locked past the busy timeout, full, an I/O error) is `Unavailable`.
"""

from __future__ import annotations

import json
from datetime import date
from typing import TYPE_CHECKING

from sia.access.base import ApiKey, UsageEntry
from sia.access.codec import (
    limits_from_json,
    limits_to_json,
    merge_usage,
    models_from_json,
    models_to_json,
)
from sia.errors import AlreadyExists, NotFound
from sia.stores import SqliteFile
from sia.tasks.codec import from_iso, to_iso

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Sequence
    from datetime import datetime

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    name       TEXT PRIMARY KEY,
    key_hash   TEXT NOT NULL UNIQUE,
    prefix     TEXT NOT NULL,
    created_at TEXT NOT NULL,
    revoked_at TEXT,
    limits     TEXT NOT NULL DEFAULT '{}',
    models     TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS usage (
    key           TEXT NOT NULL,
    model         TEXT NOT NULL,
    day           TEXT NOT NULL,
    requests      INTEGER NOT NULL DEFAULT 0,
    images        INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    cost_micros   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key, model, day)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_day ON usage (day);
"""
_INSERT_KEY = """
INSERT INTO keys (name, key_hash, prefix, created_at, revoked_at, limits, models)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT DO NOTHING
"""
# A revoked key keeps the moment it was first revoked.
_REVOKE = """
UPDATE keys SET revoked_at = coalesce(revoked_at, ?) WHERE name = ? RETURNING *
"""
_KEYS = "SELECT * FROM keys ORDER BY created_at, name"
# One statement for the whole batch: `?` is a JSON array of [key, model, day, counts...].
_RECORD = """
INSERT INTO usage (key, model, day, requests, images, output_tokens, cost_micros)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),
    json_extract(value, '$[3]'), json_extract(value, '$[4]'), json_extract(value, '$[5]'),
    json_extract(value, '$[6]')
FROM json_each(?) WHERE true  -- WHERE: the upsert's ON would otherwise parse as a join's
ON CONFLICT (key, model, day) DO UPDATE SET
    requests = requests + excluded.requests,
    images = images + excluded.images,
    output_tokens = output_tokens + excluded.output_tokens,
    cost_micros = cost_micros + excluded.cost_micros
"""
_USAGE = """
SELECT * FROM usage WHERE day BETWEEN ? AND ? {where} ORDER BY day, key, model
"""


class SqliteAccessStore(SqliteFile):
    """An AccessStore in one SQLite file; `open()` (or `async with`) before use."""

    STORE = "access"
    SCHEMA = _SCHEMA
    SCHEMA_VERSION = SCHEMA_VERSION

    async def add_key(self, key: ApiKey) -> None:
        """Store a new key; AlreadyExists when its name (or its hash) is taken."""
        params = (
            key.name,
            key.key_hash,
            key.prefix,
            to_iso(key.created_at),
            None if key.revoked_at is None else to_iso(key.revoked_at),
            limits_to_json(key.limits),
            models_to_json(key.models),
        )
        if await self._execute(_INSERT_KEY, params):
            return
        if await self._fetch_all("SELECT 1 FROM keys WHERE name = ?", (key.name,)):
            raise AlreadyExists(f"an API key named {key.name!r} exists")
        raise AlreadyExists("an API key with the same secret exists")  # key_hash is unique

    async def revoke_key(self, name: str, at: datetime) -> ApiKey:
        """Mark the key revoked; NotFound when no key has that name."""
        rows = await self._fetch_all(_REVOKE, (to_iso(at), name))
        row = next(iter(rows), None)
        if row is None:
            raise NotFound(f"no API key named {name!r}")
        return _key(row)

    async def keys(self) -> list[ApiKey]:
        """Every key, revoked ones included, oldest first."""
        return [_key(row) for row in await self._fetch_all(_KEYS, ())]

    async def record_usage(self, entries: Sequence[UsageEntry]) -> None:
        """Add each entry's counts to its (key, model, day) totals, all in one transaction."""
        merged = merge_usage(entries)
        if not merged:
            return
        rows = [
            [key, model, day.isoformat(), *counts] for (key, model, day), counts in merged.items()
        ]
        await self._execute(_RECORD, (json.dumps(rows, ensure_ascii=False),))

    async def usage(self, key: str | None, first: date, last: date) -> list[UsageEntry]:
        """Totals per (key, model, day) for days in [first, last]; every key when None."""
        params: list[object] = [first.isoformat(), last.isoformat()]
        where = ""
        if key is not None:
            where = "AND key = ?"
            params.append(key)
        rows = await self._fetch_all(_USAGE.format(where=where), params)
        return [_entry(row) for row in rows]


def _key(row: sqlite3.Row) -> ApiKey:
    revoked_at = row["revoked_at"]
    return ApiKey(
        name=row["name"],
        key_hash=row["key_hash"],
        prefix=row["prefix"],
        created_at=from_iso(row["created_at"]),
        limits=limits_from_json(row["limits"]),
        models=models_from_json(row["models"]),
        revoked_at=None if revoked_at is None else from_iso(revoked_at),
    )


def _entry(row: sqlite3.Row) -> UsageEntry:
    return UsageEntry(
        key=row["key"],
        model=row["model"],
        day=date.fromisoformat(row["day"]),
        requests=row["requests"],
        images=row["images"],
        output_tokens=row["output_tokens"],
        cost_micros=row["cost_micros"],
    )
