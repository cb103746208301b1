"""The access gate: who is calling, whether they may, and what they have used.

`AccessControl` is what the service and the edges use; it puts together the
key ring, the per-key and account-wide limits and the usage ledger. Checks
run cheapest first and only for what the key has configured: a key with no
limits costs a hash and a dict lookup per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import TYPE_CHECKING, NoReturn

from sia.access.keys import KeyRing
from sia.access.prices import PriceTable
from sia.access.usage import Ledger, seconds_to_midnight, seconds_to_next_month
from sia.errors import ConfigError, ModelNotAllowed, QuotaExceeded, SiaError, Unauthenticated
from sia.logs import get_logger

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from sia.access.base import AccessStore, ApiKey
    from sia.access.limits import Slots, Windows
    from sia.config import Settings
    from sia.domain import GenerationRequest, GenerationResult
    from sia.metrics import Metrics

log = get_logger("sia.access")

#: Seconds between writes of the usage batch to the store.
FLUSH_INTERVAL = 1.0
#: Longest a task waits between tries for a slot or the account's images.
MAX_WAIT = 5.0
ACCOUNT = "account"


def images_asked(request: GenerationRequest) -> int:
    """The most images `request` can produce: what limits and budgets reserve."""
    return request.max_images or 1


class AccessControl:
    """Authentication, limits and usage for one app; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        store: AccessStore,
        metrics: Metrics,
        *,
        windows: Windows,
        slots: Slots,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.keys = KeyRing(store, settings.auth_mode)
        self.prices = PriceTable(settings.model_prices)
        self.ledger = Ledger(store, self.prices, metrics)
        self.windows = windows
        self.slots = slots
        self.account_ipm = settings.upstream_images_per_minute

    async def start(self) -> None:
        """Open the store, load keys and usage; refuse an open production server nobody
        chose."""
        await self.store.open()
        await self.keys.refresh()
        await self.ledger.load()
        if not self.keys.enforcing:
            if self.settings.app_environment == "production" and self.settings.auth_mode != "none":
                raise ConfigError(
                    "AUTH_MODE: no API keys exist and APP_ENVIRONMENT=production: create one "
                    "with `sia keys create --name NAME`, or set AUTH_MODE=none to serve "
                    "without keys"
                )
            log.warning(
                "access_open",
                message="no API keys: every caller may use the service "
                "(create one with `sia keys create --name NAME`)",
            )

    async def sync_forever(self) -> None:
        """Write usage every FLUSH_INTERVAL s; reload keys and totals every
        KEYS_REFRESH_INTERVAL s (one loop, so a load never misses a batch in flight)."""
        every = max(1, round(self.settings.keys_refresh_interval / FLUSH_INTERVAL))
        rounds = 0
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            await self.ledger.flush()
            rounds += 1
            if rounds % every == 0:
                try:
                    await self.keys.refresh()
                    await self.ledger.load()
                except SiaError as exc:
                    log.warning("access_refresh_failed", error=exc.message)

    async def aclose(self) -> None:
        """Write what usage is left; close the limits' and the store's connections."""
        try:
            await self.ledger.flush()
        finally:
            await self.slots.aclose()
            await self.store.aclose()

    def authenticate(self, authorization: str | None) -> ApiKey | None:
        """The caller's key (None when keys are not enforced and none was given)."""
        try:
            return self.keys.authenticate(authorization)
        except Unauthenticated:
            reason = "missing" if authorization is None else "invalid"
            self.metrics.auth_failures.labels(reason).inc()
            raise

    async def admit(self, caller: ApiKey | None, request: GenerationRequest) -> None:
        """Check the key's model list, quotas, budgets and per-minute limits for a
        generation or a task submission; raise ModelNotAllowed or QuotaExceeded."""
        if caller is None:
            return
        if caller.models and request.model not in caller.models:
            raise ModelNotAllowed(request.model)
        limits = caller.limits
        images = images_asked(request)
        if (
            limits.images_per_day is not None
            or limits.budget_per_day_micros is not None
            or limits.budget_per_month_micros is not None
        ):
            self._check_quotas(caller, request.model, images)
        if limits.requests_per_minute is not None:
            await self._hit(caller, "requests_per_minute", limits.requests_per_minute, 1)
        if limits.images_per_minute is not None:
            await self._hit(caller, "images_per_minute", limits.images_per_minute, images)

    def _check_quotas(self, caller: ApiKey, model: str, images: int) -> None:
        limits, totals = caller.limits, self.ledger.totals(caller.name)
        cost = self.prices.cost_micros(model, images)
        quota = limits.images_per_day
        if quota is not None and totals.images_today + images > quota:
            self._refuse(
                caller.name,
                "images_per_day",
                f"{totals.images_today} of {quota} images used today (UTC)",
                seconds_to_midnight(),
                quota,
            )
        budget = limits.budget_per_day_micros
        if budget is not None and totals.cost_today_micros + cost > budget:
            self._refuse(
                caller.name,
                "budget_per_day",
                f"{self._money(totals.cost_today_micros)} of {self._money(budget)} spent "
                f"today (UTC); this call may cost {self._money(cost)}",
                seconds_to_midnight(),
            )
        budget = limits.budget_per_month_micros
        if budget is not None and totals.cost_month_micros + cost > budget:
            self._refuse(
                caller.name,
                "budget_per_month",
                f"{self._money(totals.cost_month_micros)} of {self._money(budget)} spent "
                f"this month (UTC); this call may cost {self._money(cost)}",
                seconds_to_next_month(),
            )

    async def _hit(self, caller: ApiKey, limit: str, per_minute: int, cost: int) -> None:
        retry = await self.windows.hit(per_minute, cost, limit, caller.name)
        if retry is not None:
            unit = "requests" if limit == "requests_per_minute" else "images"
            self._refuse(caller.name, limit, f"{per_minute} {unit} a minute", retry, per_minute)

    @contextlib.asynccontextmanager
    async def generating(
        self, caller: ApiKey | None, request: GenerationRequest, *, wait: bool
    ) -> AsyncIterator[None]:
        """Hold a concurrency slot of the key and the account's images for the block.

        `wait=False` (a call): refuse with QuotaExceeded when either is full.
        `wait=True` (a task): wait until both are free, as a queued task would.
        """
        slot = await self._slot(caller, wait=wait) if caller is not None else None
        try:
            if self.account_ipm:
                await self._account(request, wait=wait)
            yield
        finally:
            if slot is not None and caller is not None:
                await self.slots.give_back(caller.name, slot)

    async def _slot(self, caller: ApiKey, *, wait: bool) -> str | None:
        limit = caller.limits.concurrency
        if limit is None:
            return None
        delay = 0.1
        while (token := await self.slots.take(caller.name, limit)) is None:
            if not wait:
                self._refuse(
                    caller.name, "concurrency", f"{limit} generations at a time", 1.0, limit
                )
            await asyncio.sleep(random.uniform(delay / 2, delay))  # noqa: S311 - jitter
            delay = min(MAX_WAIT, delay * 2)
        return token

    async def _account(self, request: GenerationRequest, *, wait: bool) -> None:
        per_minute, images = self.account_ipm, images_asked(request)
        while (
            retry := await self.windows.hit(per_minute, images, ACCOUNT, request.model)
        ) is not None:
            if not wait:
                self._refuse(
                    "",
                    "upstream_images_per_minute",
                    f"the provider account's {per_minute} images a minute for {request.model} "
                    "are in use",
                    retry,
                    per_minute,
                )
            await asyncio.sleep(min(retry, MAX_WAIT))

    def record(self, owner: str, result: GenerationResult) -> None:
        """Count a generation that reached the provider against `owner`'s usage."""
        usage = result.usage
        images = usage.generated_images or sum(1 for image in result.images if image.ok)
        self.ledger.record(owner, result.model, images=images, output_tokens=usage.output_tokens)

    def _refuse(
        self, key: str, limit: str, description: str, retry_after: float, value: int = 0
    ) -> NoReturn:
        self.metrics.quota_rejections.labels(key, limit).inc()
        subject = f"key:{key}" if key else ACCOUNT
        raise QuotaExceeded(subject, limit, description, retry_after, value)

    async def publish_budgets(self) -> None:
        """Set each budgeted key's share of its budget used (called on each scrape)."""
        gauge = self.metrics.budget_used
        for key in self.keys.active:
            totals = self.ledger.totals(key.name)
            for period, budget, spent in (
                ("day", key.limits.budget_per_day_micros, totals.cost_today_micros),
                ("month", key.limits.budget_per_month_micros, totals.cost_month_micros),
            ):
                if budget:
                    gauge.labels(key.name, period).set(spent / budget)

    def _money(self, micros: int) -> str:
        return f"{micros / 1_000_000:.2f} {self.settings.price_currency}"
