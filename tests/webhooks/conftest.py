"""Fixtures of the webhook tests: a loopback receiver, a delivery store, fast dispatchers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from sia.config import Settings
from sia.webhooks import Webhooks
from sia.webhooks.sqlite_store import SqliteDeliveryStore
from sia.webhooks.store import DeliveryStore
from tests.helpers import MakeSettings
from tests.webhooks.helpers import SECRET, Receiver

#: `await make_webhooks(store, settings=None, metrics=None, **options)`: a started dispatcher
#: (on the test's registry unless `metrics` is given), closed after.
MakeWebhooks = Callable[..., Awaitable[Webhooks]]
#: `webhook_settings(**overrides)`: settings with a secret and private addresses allowed.
WebhookSettings = Callable[..., Settings]

#: Retries in tens of milliseconds rather than minutes.
FAST: dict[str, Any] = {"retry_delays": (0.05,), "jitter": 0.0, "poll_interval": 0.02}


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A started loopback receiver that verifies signatures with SECRET."""
    running = Receiver()
    await running.start()
    yield running
    await running.stop()
    assert running.bad == [], "a request reached the receiver without a valid signature"


@pytest.fixture
def registry() -> CollectorRegistry:
    """A registry of the test's own for the dispatcher's metrics."""
    return CollectorRegistry()


@pytest.fixture
def webhook_settings(make_settings: MakeSettings) -> WebhookSettings:
    """Settings with WEBHOOK_SECRET and WEBHOOK_ALLOW_PRIVATE (to reach the loopback receiver)."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "webhook_secret": SECRET,
            "webhook_allow_private": True,
            "webhook_timeout": 2.0,
        }
        values.update(overrides)
        return make_settings(**values)

    return make


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteDeliveryStore]:
    """An open SQLite delivery store in the test's directory."""
    async with SqliteDeliveryStore(tmp_path / "webhooks.db") as opened:
        yield opened


@pytest.fixture
async def make_webhooks(
    webhook_settings: WebhookSettings, registry: CollectorRegistry
) -> AsyncIterator[MakeWebhooks]:
    """Builds started dispatchers with fast retries on the test's registry; closes them after."""
    made: list[Webhooks] = []

    async def make(
        store: DeliveryStore,
        settings: Settings | None = None,
        metrics: CollectorRegistry | None = None,
        **options: Any,
    ) -> Webhooks:
        options = {**FAST, **options}
        webhooks = Webhooks(settings or webhook_settings(), store, metrics or registry, **options)
        await webhooks.start()
        made.append(webhooks)
        return webhooks

    yield make
    for webhooks in reversed(made):
        await webhooks.aclose()
