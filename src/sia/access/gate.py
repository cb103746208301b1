"""The access gate: who is calling, whether they may, and what they have used.

`AccessControl` is what the service and the edges use; it puts together the
key ring, the per-key and account-wide limits and the usage ledger. Checks
run cheapest first and only for what the key has configured: a key with no
limits costs a hash and a dict lookup per call.

Daily quotas and budgets count what is used plus what calls in flight on
this replica may still use (`Ledger.reserve`); a task is checked when it is
submitted and again when it runs, so a queue of tasks cannot spend past them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import TYPE_CHECKING, NoReturn

from sia.access.base import MICROS
from sia.access.keys import KeyRing
from sia.access.prices import PriceTable
from sia.access.usage import Ledger, seconds_to_midnight, seconds_to_next_month
from sia.errors import (
    ConfigError,
    KeyRevoked,
    ModelNotAllowed,
    QuotaExceeded,
    Unauthenticated,
)
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
#: Longest a task waits between tries for the account's images.
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
                    "with `sia keys create --name NAME`, or set AUTH_MODE=keys (closed until "
                    "one exists) or AUTH_MODE=none (open)"
                )
            log.warning(
                "access_open",
                message="no API keys: every caller may use the service "
                "(create one with `sia keys create --name NAME`)",
            )

    async def sync_forever(self) -> None:
        """Write usage every FLUSH_INTERVAL s; reload keys and totals every
        KEYS_REFRESH_INTERVAL s. Nothing ends the loop but cancellation: a revoke must
        keep reaching this replica whatever a round met."""
        every = max(1, round(self.settings.keys_refresh_interval / FLUSH_INTERVAL))
        rounds = 0
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            rounds += 1
            try:
                await self.ledger.flush()
                if rounds % every == 0:
                    await self.keys.refresh()
                    await self.ledger.load()
            except Exception as exc:
                log.warning("access_refresh_failed", error=getattr(exc, "message", repr(exc)))

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
        """Check the key's model list, quotas, budgets and per-minute limits for a task
        submission (or the start of a call); raise ModelNotAllowed or QuotaExceeded."""
        if caller is None:
            return
        if caller.models and request.model not in caller.models:
            raise ModelNotAllowed(request.model)
        limits, images = caller.limits, images_asked(request)
        self._check_quotas(caller, request.model, images)
        if limits.requests_per_minute is not None:
            await self._hit(caller, "requests_per_minute", limits.requests_per_minute, 1)
        if limits.images_per_minute is not None:
            await self._hit(caller, "images_per_minute", limits.images_per_minute, images)

    def calling(self, caller: ApiKey | None, request: GenerationRequest) -> Calling:
        """A synchronous generation, as `async with`: admitted, a concurrency slot held,
        its most images and cost reserved against the key's quotas and the account's
        images taken, or refused with QuotaExceeded."""
        return Calling(self, caller, request)

    @contextlib.asynccontextmanager
    async def running(self, owner: str, request: GenerationRequest) -> AsyncIterator[None]:
        """A task about to call the provider: its key still valid and within its quotas
        (they are checked again: a queue must not spend past them), the account's images
        waited for. A task never waits for its key's concurrency slot, which would hold a
        worker every other key's tasks need."""
        caller = self.keys.by_name(owner) if owner else None
        if owner and caller is None:
            raise KeyRevoked(owner)
        if caller is not None:
            self._check_quotas(caller, request.model, images_asked(request))
        if self.account_ipm:
            await self._account(request, wait=True)
        if caller is None or not caller.limits.quotas:
            yield
            return
        images, cost = self._reservation(request)
        self.ledger.reserve(caller.name, images, cost)
        try:
            yield
        finally:
            self.ledger.reserve(caller.name, -images, -cost)

    def record(self, owner: str, result: GenerationResult) -> None:
        """Count a generation that reached the provider against `owner`'s usage."""
        usage = result.usage
        images = usage.generated_images or sum(1 for image in result.images if image.ok)
        self.ledger.record(owner, result.model, images=images, output_tokens=usage.output_tokens)

    async def publish_budgets(self) -> None:
        """Set each budgeted key's share of its budget used (called on each scrape)."""
        gauge = self.metrics.budget_used
        gauge.clear()  # revoked keys' series go
        for key in self.keys.active:
            totals = self.ledger.totals(key.name)
            for period, budget, spent in (
                ("day", key.limits.budget_per_day_micros, totals.cost_today_micros),
                ("month", key.limits.budget_per_month_micros, totals.cost_month_micros),
            ):
                if budget:
                    gauge.labels(key.name, period).set(spent / budget)

    def _reservation(self, request: GenerationRequest) -> tuple[int, int]:
        images = images_asked(request)
        return images, self.prices.cost_micros(request.model, images)

    def _check_quotas(self, caller: ApiKey, model: str, images: int) -> None:
        limits = caller.limits
        if not limits.quotas:
            return
        totals = self.ledger.totals(caller.name)
        held_images, held_cost = self.ledger.reserved(caller.name)
        used_today = totals.images_today + held_images
        quota = limits.images_per_day
        if quota is not None and used_today + images > quota:
            self._refuse(
                caller.name,
                "images_per_day",
                f"{used_today} of {quota} images used or in progress today (UTC)",
                seconds_to_midnight() if images <= quota else math.inf,
                quota,
            )
        cost = self.prices.cost_micros(model, images)
        for limit, budget, spent, reset in (
            ("budget_per_day", limits.budget_per_day_micros, totals.cost_today_micros, "today"),
            (
                "budget_per_month",
                limits.budget_per_month_micros,
                totals.cost_month_micros,
                "this month",
            ),
        ):
            if budget is not None and spent + held_cost + cost > budget:
                wait = seconds_to_midnight() if reset == "today" else seconds_to_next_month()
                self._refuse(
                    caller.name,
                    limit,
                    f"{self._money(spent + held_cost)} of {self._money(budget)} spent or in "
                    f"progress {reset} (UTC); this call may cost {self._money(cost)}",
                    wait if cost <= budget else math.inf,
                )

    async def _hit(self, caller: ApiKey, limit: str, per_minute: int, cost: int) -> None:
        unit = "requests" if limit == "requests_per_minute" else "images"
        if cost > per_minute:
            self._refuse(caller.name, limit, f"{cost} {unit} never fit {per_minute} a minute",
                         math.inf, per_minute)  # fmt: skip
        retry = await self.windows.hit(per_minute, cost, limit, caller.name)
        if retry is not None:
            self._refuse(caller.name, limit, f"{per_minute} {unit} a minute", retry, per_minute)

    async def _slot(self, caller: ApiKey) -> str | None:
        limit = caller.limits.concurrency
        if limit is None:
            return None
        token = await self.slots.take(caller.name, limit)
        if token is None:
            self._refuse(caller.name, "concurrency", f"{limit} generations at a time", 1.0, limit)
        return token

    async def _account(self, request: GenerationRequest, *, wait: bool) -> None:
        per_minute, images = self.account_ipm, images_asked(request)
        if images > per_minute:
            self._refuse("", "upstream_images_per_minute",
                         f"{images} images never fit the account's {per_minute} a minute",
                         math.inf, per_minute)  # fmt: skip
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

    def _refuse(
        self, key: str, limit: str, description: str, retry_after: float, value: int = 0
    ) -> NoReturn:
        self.metrics.quota_rejections.labels(key, limit).inc()
        subject = f"key:{key}" if key else ACCOUNT
        raise QuotaExceeded(subject, limit, description, retry_after, value)

    def _money(self, micros: int) -> str:
        return f"{micros / MICROS:.2f} {self.settings.price_currency}"


class Calling:
    """What a synchronous generation holds while it runs (see `AccessControl.calling`).

    A class rather than an @asynccontextmanager generator: it runs on every keyed
    call, and a class is the cheaper of the two.
    """

    __slots__ = ("_access", "_caller", "_request", "_reserved", "_slot")

    def __init__(
        self, access: AccessControl, caller: ApiKey | None, request: GenerationRequest
    ) -> None:
        self._access = access
        self._caller = caller
        self._request = request
        self._reserved = (0, 0)
        self._slot: str | None = None

    async def __aenter__(self) -> None:
        access, caller, request = self._access, self._caller, self._request
        if caller is not None:
            await access.admit(caller, request)
        if access.account_ipm:
            await access._account(request, wait=False)
        if caller is None:
            return
        self._slot = await access._slot(caller)
        if caller.limits.quotas:
            self._reserved = access._reservation(request)
            access.ledger.reserve(caller.name, *self._reserved)

    async def __aexit__(self, *_: object) -> None:
        caller = self._caller
        if caller is None:
            return
        if self._reserved != (0, 0):
            images, cost = self._reserved
            self._access.ledger.reserve(caller.name, -images, -cost)
        if self._slot is not None:
            await self._access.slots.give_back(caller.name, self._slot)
