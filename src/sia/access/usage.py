"""The usage ledger: what each key used, counted as it happens, stored in batches.

`record` adds a generation's figures to the Prometheus counters at once and
to a pending batch that `flush` writes to the access store (every second
while the app runs, and once more at shutdown): no store round trip on a
call's path. Quotas read `Totals`, a mirror of today's and this month's
totals per key: the store's figures (every replica's, when they share Redis)
as of the last `load`, plus what this replica recorded since.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING

from sia.access.base import UsageEntry
from sia.errors import SiaError
from sia.logs import get_logger

if TYPE_CHECKING:
    from sia.access.base import AccessStore
    from sia.access.prices import PriceTable
    from sia.metrics import Metrics

log = get_logger("sia.access")


def today() -> date:
    """The current day in UTC: quotas and usage days turn at midnight UTC."""
    return datetime.now(UTC).date()


def seconds_to_midnight() -> float:
    """Seconds until the next UTC day begins."""
    now = datetime.now(UTC)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
    return (midnight - now).total_seconds()


def seconds_to_next_month() -> float:
    """Seconds until the next UTC calendar month begins."""
    now = datetime.now(UTC)
    first = now.date().replace(day=1) + timedelta(days=32)
    start = datetime.combine(first.replace(day=1), datetime.min.time(), UTC)
    return (start - now).total_seconds()


@dataclasses.dataclass(slots=True)
class Totals:
    """A key's usage so far today and this month, as quotas see it."""

    day: date
    images_today: int = 0
    cost_today_micros: int = 0
    cost_month_micros: int = 0


class Ledger:
    """Usage per (key, model, day): counted now, stored in batches, mirrored for quotas."""

    def __init__(self, store: AccessStore, prices: PriceTable, metrics: Metrics) -> None:
        self.store = store
        self.prices = prices
        self.metrics = metrics
        self._pending: dict[tuple[str, str, date], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        self._totals: dict[str, Totals] = {}
        self._reserved: dict[str, tuple[int, int]] = {}
        # A flush and a load must not overlap: a batch in flight is in neither's view.
        self._lock = asyncio.Lock()

    def reserve(self, key: str, images: int, cost_micros: int) -> None:
        """Hold (or, negative, release) images and cost a call in flight may still use."""
        held_images, held_cost = self._reserved.get(key, (0, 0))
        held = (held_images + images, held_cost + cost_micros)
        if held == (0, 0):
            self._reserved.pop(key, None)
        else:
            self._reserved[key] = held

    def reserved(self, key: str) -> tuple[int, int]:
        """The images and cost `key`'s calls in flight here may still use."""
        return self._reserved.get(key, (0, 0))

    def totals(self, key: str) -> Totals:
        """`key`'s totals for today and this month."""
        day = today()
        found = self._totals.get(key)
        if found is None or found.day != day:
            month = found.cost_month_micros if found and found.day.month == day.month else 0
            found = self._totals[key] = Totals(day, cost_month_micros=month)
        return found

    def record(self, key: str, model: str, *, images: int, output_tokens: int) -> int:
        """Count one generation that reached the provider; return its cost in micros."""
        cost = self.prices.cost_micros(model, images)
        day = today()
        pending = self._pending[key, model, day]
        pending[0] += 1
        pending[1] += images
        pending[2] += output_tokens
        pending[3] += cost
        totals = self.totals(key)
        totals.images_today += images
        totals.cost_today_micros += cost
        totals.cost_month_micros += cost
        self.metrics.count_usage(key, model, images, output_tokens, cost)
        return cost

    async def flush(self) -> None:
        """Write the pending batch to the store; on failure keep it for the next flush."""
        if not self._pending:
            return
        async with self._lock:
            await self._flush()

    async def _flush(self) -> None:
        batch, self._pending = self._pending, defaultdict(lambda: [0, 0, 0, 0])
        entries = [
            UsageEntry(key, model, day, *counts) for (key, model, day), counts in batch.items()
        ]
        try:
            await self.store.record_usage(entries)
        except SiaError as exc:
            log.warning("usage_flush_failed", error=exc.message, entries=len(entries))
            self._keep(batch)
        except BaseException:
            self._keep(batch)  # cancelled mid-write (shutdown): the final flush writes it
            raise

    def _keep(self, batch: dict[tuple[str, str, date], list[int]]) -> None:
        """Put a batch that was not written back with the pending counts."""
        for (key, model, day), counts in batch.items():
            merged = self._pending[key, model, day]
            for index, count in enumerate(counts):
                merged[index] += count

    async def load(self) -> None:
        """Refresh the mirror from the store: this month's totals per key, plus what is
        recorded here but not yet stored."""
        day = today()
        async with self._lock:
            rows = await self.store.usage(None, day.replace(day=1), day)
        totals: dict[str, Totals] = {}
        for key, model, row_day, images, cost in _with_pending(rows, self._pending, day):
            del model
            found = totals.setdefault(key, Totals(day))
            found.cost_month_micros += cost
            if row_day == day:
                found.images_today += images
                found.cost_today_micros += cost
        self._totals = totals


def _with_pending(
    rows: list[UsageEntry], pending: dict[tuple[str, str, date], list[int]], day: date
) -> list[tuple[str, str, date, int, int]]:
    """Stored rows and pending counts of this month as (key, model, day, images, cost)."""
    merged = [(r.key, r.model, r.day, r.images, r.cost_micros) for r in rows]
    merged += [
        (key, model, row_day, counts[1], counts[3])
        for (key, model, row_day), counts in pending.items()
        if row_day.month == day.month and row_day.year == day.year
    ]
    return merged
