"""The usage ledger: counts kept through a failing store, mirrored totals for quotas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from sia.access.base import UsageEntry
from sia.access.prices import PriceTable
from sia.access.sqlite_store import SqliteAccessStore
from sia.access.usage import Ledger, today
from sia.errors import Unavailable
from sia.metrics import Metrics


class FlakyStore(SqliteAccessStore):
    """A real SQLite store whose writes fail, or hang, while told to."""

    failing = False
    hanging = False

    async def record_usage(self, entries: Sequence[UsageEntry]) -> None:
        if self.failing:
            raise Unavailable("the access store is unavailable")
        if self.hanging:
            await asyncio.Event().wait()
        await super().record_usage(entries)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[FlakyStore]:
    store = FlakyStore(tmp_path / "access.db")
    await store.open()
    yield store
    await store.aclose()


def _ledger(store: FlakyStore) -> Ledger:
    return Ledger(store, PriceTable({"m": 0.5}), Metrics())


async def _stored(store: FlakyStore) -> list[tuple[str, int, int, int]]:
    rows = await store.usage(None, today(), today())
    return [(r.key, r.requests, r.images, r.cost_micros) for r in rows]


async def test_counts_survive_a_failing_store_and_a_cancelled_flush(store: FlakyStore) -> None:
    """Nothing counted is lost: a failed write and a write cancelled by shutdown both keep
    their batch for the next flush."""
    ledger = _ledger(store)
    ledger.record("a", "m", images=2, output_tokens=10)
    store.failing = True
    await ledger.flush()
    assert await _stored(store) == []

    store.failing, store.hanging = False, True
    ledger.record("a", "m", images=1, output_tokens=5)
    flush = asyncio.create_task(ledger.flush())
    await asyncio.sleep(0.05)
    flush.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flush

    store.hanging = False
    await ledger.flush()
    assert await _stored(store) == [("a", 2, 3, 1_500_000)]


async def test_totals_are_the_store_plus_what_is_not_yet_written(store: FlakyStore) -> None:
    """Another replica's stored usage and this one's unwritten counts both count."""
    await store.record_usage([UsageEntry("a", "m", today(), 1, 4, 0, 2_000_000)])
    ledger = _ledger(store)
    ledger.record("a", "m", images=1, output_tokens=0)
    await ledger.load()
    totals = ledger.totals("a")
    assert (totals.images_today, totals.cost_today_micros) == (5, 2_500_000)
    assert totals.cost_month_micros == 2_500_000
    await ledger.flush()
    await ledger.load()
    assert ledger.totals("a").images_today == 5  # written once, counted once
