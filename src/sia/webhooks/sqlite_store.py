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

import sqlite3
from typing import TYPE_CHECKING, Self

import aiosqlite

from sia.errors import ConfigError
from sia.webhooks.store import Delivery, store_faults

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path
    from types import TracebackType

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


class SqliteDeliveryStore:
    """A DeliveryStore in one SQLite file; `open()` (or `async with`) before use."""

    def __init__(self, path: Path, *, busy_timeout: float = 5.0) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._db: aiosqlite.Connection | None = None

    async def open(self) -> None:
        """Open (or create) the file, in WAL mode, with the current schema."""
        if self._db is not None:
            raise RuntimeError("SqliteDeliveryStore.open() may be called once")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(self.path, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the webhook database {self.path}: {exc}") from exc
        try:
            db.row_factory = aiosqlite.Row
            await db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = NORMAL")
            (version,) = next(iter(await db.execute_fetchall("PRAGMA user_version")))
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"the webhook database {self.path} has schema {version}; "
                    f"this version of sia knows only up to {SCHEMA_VERSION}"
                )
            await db.executescript(
                f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            )
        except BaseException as exc:
            await db.close()
            if isinstance(exc, sqlite3.Error):
                raise ConfigError(f"cannot use the webhook database {self.path}: {exc}") from exc
            raise
        self._db = db

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

    async def ping(self) -> bool:
        """True while the file answers a trivial query."""
        try:
            await self._conn.execute_fetchall("SELECT 1")
        except sqlite3.Error:
            return False
        return True

    async def aclose(self) -> None:
        """Close the connection; idempotent."""
        db, self._db = self._db, None
        if db is not None:
            await db.close()

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
        return f"SqliteDeliveryStore(path={str(self.path)!r})"

    @property
    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("SqliteDeliveryStore is not open, or already closed")
        return self._db

    async def _fetch_all(self, sql: str, params: Iterable[object]) -> Iterable[sqlite3.Row]:
        db = self._conn
        with store_faults("sqlite", sqlite3.Error):
            return await db.execute_fetchall(sql, params)

    async def _execute(self, sql: str, params: Iterable[object]) -> int:
        db = self._conn
        with store_faults("sqlite", sqlite3.Error):
            async with db.execute(sql, params) as cursor:
                return cursor.rowcount


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
