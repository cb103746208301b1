"""Access control's plain data and its storage seam.

An `AccessStore` keeps the API keys (as hashes) and the usage ledger, next to
the tasks: in the SQLite file of one replica, or in the Redis the replicas
share. Nothing here knows about gRPC or HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Sequence
    from datetime import date, datetime

#: Costs are counted in millionths of the currency unit: integers add exactly.
MICROS = 1_000_000


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """A key's limits; None means no limit of that kind.

    Budgets are in the price table's currency (PRICE_CURRENCY), in micros.
    """

    requests_per_minute: int | None = None
    images_per_minute: int | None = None
    concurrency: int | None = None
    images_per_day: int | None = None
    budget_per_day_micros: int | None = None
    budget_per_month_micros: int | None = None

    @property
    def quotas(self) -> bool:
        """True when a daily images quota or a budget is set (they count usage)."""
        return (
            self.images_per_day is not None
            or self.budget_per_day_micros is not None
            or self.budget_per_month_micros is not None
        )


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One API key as stored: never the key itself, only its SHA-256.

    `prefix` is the key's first characters ("sia_AbC1"), shown in listings so an
    operator can tell keys apart. `models` empty: every model.
    """

    name: str
    key_hash: str
    prefix: str
    created_at: datetime
    limits: KeyLimits = field(default_factory=KeyLimits)
    models: frozenset[str] = frozenset()
    revoked_at: datetime | None = None

    @property
    def revoked(self) -> bool:
        """True once the key has been revoked."""
        return self.revoked_at is not None


@dataclass(frozen=True, slots=True)
class UsageEntry:
    """What one key used of one model on one day (UTC): counts to add, or totals."""

    key: str
    model: str
    day: date
    requests: int = 0
    images: int = 0
    output_tokens: int = 0
    cost_micros: int = 0


class AccessStore(Protocol):
    """Where keys and the usage ledger live; shared by every replica that shares it.

    Every method raises sia.errors.Unavailable when the store cannot answer;
    the backend's own exceptions never leave it.
    """

    async def open(self) -> None:
        """Connect, creating the schema where needed (ConfigError when it cannot)."""
        ...

    async def add_key(self, key: ApiKey) -> None:
        """Store a new key; sia.errors.AlreadyExists when its name is taken (revoked too)."""
        ...

    async def revoke_key(self, name: str, at: datetime) -> ApiKey:
        """Mark the key revoked (kept, so its name and usage stay); sia.errors.NotFound when
        no key has that name. Revoking a revoked key returns it unchanged."""
        ...

    async def keys(self) -> list[ApiKey]:
        """Every key, revoked ones included, oldest first."""
        ...

    async def record_usage(self, entries: Sequence[UsageEntry]) -> None:
        """Add each entry's counts to its (key, model, day) totals."""
        ...

    async def usage(self, key: str | None, first: date, last: date) -> list[UsageEntry]:
        """Totals per (key, model, day) for days in [first, last]; every key when None."""
        ...

    async def aclose(self) -> None:
        """Release the connection; idempotent."""
        ...
