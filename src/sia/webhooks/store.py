"""Pending webhook deliveries, kept where the tasks are so they survive a restart.

A `Delivery` is one event on its way to one URL. It is stored before the
dispatcher is woken and deleted only once it is delivered or given up, so a
crash or a restart at any point loses none (at-least-once). Claiming one for
an attempt moves its due time a lease ahead and counts the attempt in the
same atomic step: another dispatcher (another replica, or this one after a
restart) sees it again only if the lease runs out without an answer.

`attempts` doubles as the claim's token: `reschedule` only applies when the
stored count is the one the claim returned, so a dispatcher whose lease ran
out cannot overwrite the next claim's schedule.

Implementations: `SqliteDeliveryStore` (`<DATA_DIR>/webhooks.db`) and
`RedisDeliveryStore` (`sia:<REDIS_QUEUE>:webhooks:*`); `build_delivery_store`
picks the one beside the task backend. Their clients' exceptions never leave
them: `ConfigError` at `open()`, `Unavailable` after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Self

if TYPE_CHECKING:
    from types import TracebackType

    from sia.config import Settings


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event to POST to one URL, and where its attempts stand.

    Times are seconds since the epoch. `created_at` starts the retry period;
    `attempts` counts the attempts claimed so far (the one in flight included).
    """

    id: str  # the event's id: the webhook-id header on every attempt
    task_id: str
    type: str
    url: str
    payload: str  # the JSON body, exactly as signed and sent
    created_at: float
    next_at: float
    attempts: int = 0
    last_error: str = ""


class DeliveryStore(Protocol):
    """Where pending deliveries wait; every method but `open` and `aclose` may raise
    `Unavailable`."""

    async def open(self) -> None:
        """Connect (or create the file); ConfigError when the store cannot be used."""

    async def add(self, delivery: Delivery) -> None:
        """Store a new delivery, due at its `next_at`; adding an id again changes nothing."""

    async def claim_due(self, now: float, limit: int, *, lease: float) -> list[Delivery]:
        """Up to `limit` deliveries due at `now`, earliest first, each with `attempts` raised
        by one and hidden from other claims until `now + lease`."""

    async def reschedule(self, id: str, next_at: float, attempts: int, last_error: str) -> bool:
        """Make the delivery due again at `next_at`; False (and nothing changed) when it is
        gone or was claimed again since the claim that returned `attempts`."""

    async def done(self, id: str) -> None:
        """Forget the delivery: delivered, or given up. Idempotent."""

    async def pending(self) -> int:
        """How many deliveries wait (due or not)."""

    async def ping(self) -> bool:
        """True while the store answers."""

    async def aclose(self) -> None:
        """Release the connection; idempotent."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...


def build_delivery_store(settings: Settings) -> DeliveryStore:
    """The store beside the tasks: Redis with TASK_BACKEND=redis, else SQLite in DATA_DIR."""
    if settings.task_backend == "redis":
        from sia.webhooks.redis_store import RedisDeliveryStore  # noqa: PLC0415 - Redis when used

        return RedisDeliveryStore(settings.redis_url.get_secret_value(), settings.redis_queue)
    from sia.webhooks.sqlite_store import SqliteDeliveryStore  # noqa: PLC0415

    return SqliteDeliveryStore(settings.data_dir / "webhooks.db")
