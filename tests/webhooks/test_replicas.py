"""Two dispatchers sharing one Redis queue, as two replicas do: each attempt is sent once."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from sia.webhooks import TASK_SUCCEEDED
from sia.webhooks.redis_store import RedisDeliveryStore
from tests.tasks.backend_helpers import REDIS_URL, require_redis
from tests.webhooks.conftest import MakeWebhooks, WebhookSettings
from tests.webhooks.helpers import (
    Receiver,
    delete_webhook_keys,
    make_task,
    outcome,
    wait_pending,
)

EVENTS = 30


@pytest.fixture
async def redis_stores() -> AsyncIterator[tuple[RedisDeliveryStore, RedisDeliveryStore]]:
    """Two open stores on one fresh queue (one per replica); the queue's keys deleted after."""
    await require_redis()
    queue = f"test-webhooks-{uuid.uuid4().hex[:12]}"
    async with (
        RedisDeliveryStore(REDIS_URL, queue) as one,
        RedisDeliveryStore(REDIS_URL, queue) as two,
    ):
        yield one, two
    await delete_webhook_keys(queue)


async def test_two_replicas_send_each_attempt_once(
    make_webhooks: MakeWebhooks,
    webhook_settings: WebhookSettings,
    redis_stores: tuple[RedisDeliveryStore, RedisDeliveryStore],
    receiver: Receiver,
) -> None:
    """Events enqueued on either replica, each failing once: every webhook-id arrives exactly
    twice (the failure and the retry), never twice at the same time, and both replicas work."""
    seen: Counter[str] = Counter()
    in_flight: set[str] = set()
    overlaps: list[str] = []

    async def first_fails(request: web.Request) -> web.Response:
        webhook_id = request.headers["webhook-id"]
        if webhook_id in in_flight:
            overlaps.append(webhook_id)
        in_flight.add(webhook_id)
        await asyncio.sleep(0.01)
        in_flight.discard(webhook_id)
        seen[webhook_id] += 1
        return web.Response(status=500 if seen[webhook_id] == 1 else 200)

    receiver.default = first_fails
    one, two = redis_stores
    registries = [CollectorRegistry(), CollectorRegistry()]
    replicas = [
        await make_webhooks(store, webhook_settings(), metrics=registry, concurrency=4)
        for store, registry in zip((one, two), registries, strict=True)
    ]
    for i in range(EVENTS):
        await replicas[i % 2].enqueue(make_task(receiver.url), TASK_SUCCEEDED)
    await receiver.wait_for(2 * EVENTS, timeout=20)
    await wait_pending(one, 0)
    await asyncio.sleep(0.2)  # time for a double send to show
    assert len(seen) == EVENTS
    assert set(seen.values()) == {2}
    assert overlaps == []
    assert len(receiver.received) == 2 * EVENTS
    delivered = [outcome(registry, "delivered") for registry in registries]
    assert sum(delivered) == EVENTS
    assert min(delivered) > 0
