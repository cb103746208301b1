"""What the access and webhook stores share: their faults as `Unavailable`, and the
SQLite file each keeps its tables in.

`SqliteFile` is one file in WAL mode (readers never wait for a writer; another
process's write is waited for up to `busy_timeout`) with one aiosqlite
connection in autocommit mode: every change is a single statement, so no
transaction spans an `await`. A file that cannot be opened, or holds a newer
schema, is a `ConfigError` at `open()`; any later fault is `Unavailable`.
"""

from __future__ import annotations

import contextlib
import sqlite3
from typing import TYPE_CHECKING, ClassVar, Self

import aiosqlite

from sia.errors import ConfigError, Unavailable
from sia.logs import get_logger

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from pathlib import Path
    from types import TracebackType

log = get_logger("sia.stores")


@contextlib.contextmanager
def store_faults(store: str, backend: str, *foreign: type[BaseException]) -> Iterator[None]:
    """Raise `Unavailable` from any of the `foreign` exceptions the `store`'s client
    (`backend`) raises, logged as `<store>_store_error`."""
    try:
        yield
    except foreign as exc:
        log.warning(
            f"{store}_store_error", backend=backend, error=type(exc).__name__, detail=str(exc)[:200]
        )
        raise Unavailable(
            f"the {store} store ({backend}) is unavailable: {type(exc).__name__}; retry later"
        ) from exc


class SqliteFile:
    """A store's SQLite file; `open()` (or `async with`) before use.

    Subclasses name their `STORE` ("access", "webhook") and give their `SCHEMA`
    (idempotent CREATE statements) and its `SCHEMA_VERSION`.
    """

    STORE: ClassVar[str]
    SCHEMA: ClassVar[str]
    SCHEMA_VERSION: ClassVar[int]

    def __init__(self, path: Path, *, busy_timeout: float = 5.0) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._db: aiosqlite.Connection | None = None

    async def open(self) -> None:
        """Open (or create) the file, in WAL mode, with the current schema."""
        if self._db is not None:
            raise RuntimeError(f"{type(self).__name__}.open() may be called once")
        what = f"the {self.STORE} database {self.path}"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(self.path, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open {what}: {exc}") from exc
        try:
            db.row_factory = aiosqlite.Row
            await db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = NORMAL")
            (version,) = next(iter(await db.execute_fetchall("PRAGMA user_version")))
            if version > self.SCHEMA_VERSION:
                raise ConfigError(
                    f"{what} has schema {version}; "
                    f"this version of sia knows only up to {self.SCHEMA_VERSION}"
                )
            # IMMEDIATE: a process opening the file at the same time waits its turn.
            await db.executescript(
                f"BEGIN IMMEDIATE; {self.SCHEMA} "
                f"PRAGMA user_version = {self.SCHEMA_VERSION}; COMMIT;"
            )
        except BaseException as exc:
            await db.close()
            if isinstance(exc, sqlite3.Error):
                raise ConfigError(f"cannot use {what}: {exc}") from exc
            raise
        self._db = db

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
        return f"{type(self).__name__}(path={str(self.path)!r})"

    @property
    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError(f"{type(self).__name__} is not open, or already closed")
        return self._db

    async def _fetch_all(self, sql: str, params: Iterable[object]) -> Iterable[sqlite3.Row]:
        db = self._conn
        with store_faults(self.STORE, "sqlite", sqlite3.Error):
            return await db.execute_fetchall(sql, params)

    async def _execute(self, sql: str, params: Iterable[object]) -> int:
        db = self._conn
        with store_faults(self.STORE, "sqlite", sqlite3.Error):
            async with db.execute(sql, params) as cursor:
                return cursor.rowcount
