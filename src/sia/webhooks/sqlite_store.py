"""The SQLite delivery store: pending webhook deliveries in `<DATA_DIR>/webhooks.db`.

One table, one row per delivery, indexed by due time. The file is in WAL
mode like the task and access databases, and every change is one statement
on an autocommit connection: a claim is a single UPDATE ... RETURNING that
moves the due rows' time a lease ahead and counts the attempt, so no claim
can return a row another claim holds, and no transaction spans an `await`.

sqlite3's exceptions never leave this module: a file that cannot be opened,
or holds a newer schema, is a `ConfigError` at `open()`; any later fault is
`Unavailable`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sia.stores import SqliteFile
from sia.webhooks.store import Delivery

if TYPE_CHECKING:
    import sqlite3

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    id         TEXT PRIMARY KEY,
    task_id    TEXT NOT NULL,
    type       TEXT NOT NULL,
    url        TEXT NOT NULL,
    payload    TEXT NOT NULL,
    created_at REAL NOT NULL,
    next_at    REAL NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (next_at);
"""
_ADD = """
INSERT INTO deliveries (id, task_id, type, url, payload, created_at, next_at, attempts, last_error)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO NOTHING
"""
_CLAIM = """
UPDATE deliveries SET next_at = ?, attempts = attempts + 1
WHERE id IN (SELECT id FROM deliveries WHERE next_at <= ? ORDER BY next_at LIMIT ?)
RETURNING *
"""
_RESCHEDULE = """
UPDATE deliveries SET next_at = ?, last_error = ? WHERE id = ? AND attempts = ?
"""


class SqliteDeliveryStore(SqliteFile):
    """A DeliveryStore in one SQLite file; `open()` (or `async with`) before use."""

    STORE = "webhook"
    SCHEMA = _SCHEMA
    SCHEMA_VERSION = SCHEMA_VERSION

    async def add(self, delivery: Delivery) -> None:
        """Store a new delivery; adding an id again changes nothing."""
        d = delivery
        await self._execute(
            _ADD,
            (d.id, d.task_id, d.type, d.url, d.payload, d.created_at, d.next_at, d.attempts,
             d.last_error),
        )  # fmt: skip

    async def claim_due(self, now: float, limit: int, *, lease: float) -> list[Delivery]:
        """Up to `limit` due deliveries, each leased until `now + lease`, attempts counted."""
        if limit <= 0:
            return []
        rows = await self._fetch_all(_CLAIM, (now + lease, now, limit))
        return sorted((_delivery(row) for row in rows), key=lambda d: (d.created_at, d.id))

    async def reschedule(self, id: str, next_at: float, attempts: int, last_error: str) -> bool:
        """Due again at `next_at`, unless claimed again (or deleted) since."""
        return await self._execute(_RESCHEDULE, (next_at, last_error, id, attempts)) == 1

    async def done(self, id: str) -> None:
        """Delete the delivery; idempotent."""
        await self._execute("DELETE FROM deliveries WHERE id = ?", (id,))

    async def pending(self) -> int:
        """How many deliveries wait."""
        rows = await self._fetch_all("SELECT count(*) FROM deliveries", ())
        return int(next(iter(rows))[0])


def _delivery(row: sqlite3.Row) -> Delivery:
    return Delivery(
        id=row["id"],
        task_id=row["task_id"],
        type=row["type"],
        url=row["url"],
        payload=row["payload"],
        created_at=row["created_at"],
        next_at=row["next_at"],
        attempts=row["attempts"],
        last_error=row["last_error"],
    )
