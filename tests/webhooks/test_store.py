"""The DeliveryStore contract, run against the SQLite store and the Redis store alike,
then each store's own failures."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from redis import asyncio as aioredis

from sia.errors import ConfigError
from sia.webhooks.redis_store import RedisDeliveryStore
from sia.webhooks.sqlite_store import SCHEMA_VERSION, SqliteDeliveryStore
from sia.webhooks.store import DeliveryStore, build_delivery_store
from tests.helpers import MakeSettings
from tests.tasks.backend_helpers import REDIS_URL, require_redis
from tests.webhooks.helpers import delete_webhook_keys, make_delivery

#: Opens a new store object on the test's own backend (the same file, the same queue).
MakeStore = Callable[[], Awaitable[DeliveryStore]]

NOW = 1_750_000_000.0
LEASE = 30.0


@pytest.fixture(params=["sqlite", "redis"])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MakeStore]:
    """`await make_store()` opens a store on this test's file or queue; all are closed (and
    the queue's keys deleted) afterwards."""
    opened: list[DeliveryStore] = []
    queue = f"test-webhooks-{uuid.uuid4().hex[:12]}"
    if request.param == "redis":
        await require_redis()

    async def make() -> DeliveryStore:
        store: DeliveryStore
        if request.param == "redis":
            store = RedisDeliveryStore(REDIS_URL, queue)
        else:
            store = SqliteDeliveryStore(tmp_path / "webhooks.db")
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.aclose()
    if request.param == "redis":
        await delete_webhook_keys(queue)


async def test_a_claim_counts_the_attempt_and_hides_the_delivery(make_store: MakeStore) -> None:
    """A claimed delivery is not claimed again until its lease ends, then it is: attempt 2."""
    store = await make_store()
    delivery = make_delivery("msg_a", next_at=NOW)
    await store.add(delivery)
    [claimed] = await store.claim_due(NOW, 10, lease=LEASE)
    assert claimed == make_delivery("msg_a", next_at=NOW + LEASE, attempts=1, created_at=NOW)
    assert await store.claim_due(NOW + LEASE - 1, 10, lease=LEASE) == []
    [again] = await store.claim_due(NOW + LEASE, 10, lease=LEASE)
    assert (again.id, again.attempts) == ("msg_a", 2)
    assert await store.pending() == 1


async def test_only_due_deliveries_are_claimed_up_to_the_limit(make_store: MakeStore) -> None:
    """A delivery due later waits; a claim returns at most `limit`, the earliest first."""
    store = await make_store()
    for i, due in enumerate([NOW + 60, NOW - 3, NOW - 2, NOW - 1]):
        await store.add(make_delivery(f"msg_{i}", next_at=due))
    first = await store.claim_due(NOW, 2, lease=LEASE)
    assert [d.id for d in first] == ["msg_1", "msg_2"]
    assert [d.id for d in await store.claim_due(NOW, 2, lease=LEASE)] == ["msg_3"]
    assert await store.claim_due(NOW, 0, lease=LEASE) == []
    assert await store.pending() == 4


async def test_reschedule_applies_only_to_the_latest_claim(make_store: MakeStore) -> None:
    """A dispatcher whose lease ran out (another claimed it since) changes nothing."""
    store = await make_store()
    await store.add(make_delivery("msg_a", next_at=NOW))
    [first] = await store.claim_due(NOW, 1, lease=LEASE)
    [second] = await store.claim_due(NOW + LEASE, 1, lease=LEASE)
    assert not await store.reschedule("msg_a", NOW, first.attempts, "HTTP 500")
    assert await store.reschedule("msg_a", NOW + 100, second.attempts, "HTTP 503")
    assert await store.claim_due(NOW + 99, 1, lease=LEASE) == []
    [third] = await store.claim_due(NOW + 100, 1, lease=LEASE)
    assert (third.attempts, third.last_error) == (3, "HTTP 503")
    assert not await store.reschedule("msg_gone", NOW, 1, "HTTP 500")


async def test_done_forgets_the_delivery(make_store: MakeStore) -> None:
    """A delivered (or abandoned) delivery is never claimed again; done() twice is fine."""
    store = await make_store()
    await store.add(make_delivery("msg_a", next_at=NOW))
    await store.add(make_delivery("msg_b", next_at=NOW))
    await store.done("msg_a")
    await store.done("msg_a")
    assert [d.id for d in await store.claim_due(NOW, 10, lease=LEASE)] == ["msg_b"]
    assert await store.pending() == 1
    assert not await store.reschedule("msg_a", NOW, 1, "")


async def test_adding_an_id_again_changes_nothing(make_store: MakeStore) -> None:
    """The first add wins: an id is one delivery, whatever is added under it later."""
    store = await make_store()
    await store.add(make_delivery("msg_a", next_at=NOW, url="https://first.example/"))
    await store.add(make_delivery("msg_a", next_at=NOW - 100, url="https://second.example/"))
    [claimed] = await store.claim_due(NOW, 10, lease=LEASE)
    assert claimed.url == "https://first.example/"
    assert await store.pending() == 1


async def test_deliveries_survive_reopening(make_store: MakeStore) -> None:
    """What one store object added, a new one on the same file or queue claims (a restart)."""
    store = await make_store()
    await store.add(make_delivery("msg_a", next_at=NOW))
    await store.aclose()
    reopened = await make_store()
    [claimed] = await reopened.claim_due(NOW, 10, lease=LEASE)
    assert claimed == make_delivery("msg_a", next_at=NOW + LEASE, attempts=1, created_at=NOW)
    assert await reopened.ping()


async def test_concurrent_claims_never_share_a_delivery(make_store: MakeStore) -> None:
    """Claims from two store objects at once (two replicas) split the due deliveries."""
    one, two = await make_store(), await make_store()
    ids = {f"msg_{i}" for i in range(40)}
    for id in ids:
        await one.add(make_delivery(id, next_at=NOW))
    batches = await asyncio.gather(
        *(store.claim_due(NOW, 3, lease=LEASE) for store in (one, two) * 10)
    )
    claimed = [d.id for batch in batches for d in batch]
    assert len(claimed) == len(set(claimed)) == 40
    assert set(claimed) == ids


async def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    """A file written by a later version of sia is a ConfigError, not a guess."""
    path = tmp_path / "webhooks.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(ConfigError, match="has schema"):
        await SqliteDeliveryStore(path).open()


async def test_unreachable_redis_is_a_config_error() -> None:
    """No Redis behind REDIS_URL at start-up: ConfigError naming it without a password."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = RedisDeliveryStore(f"redis://:pw@127.0.0.1:{port}/0", "q")
    with pytest.raises(ConfigError, match="cannot reach Redis") as caught:
        await store.open()
    assert "pw" not in str(caught.value)


def test_the_store_sits_beside_the_tasks(make_settings: MakeSettings, tmp_path: Path) -> None:
    """SQLite in DATA_DIR by default; Redis under REDIS_QUEUE with the Redis task backend."""
    sqlite_store = build_delivery_store(make_settings())
    assert isinstance(sqlite_store, SqliteDeliveryStore)
    assert sqlite_store.path == tmp_path / "data" / "webhooks.db"
    redis_store = build_delivery_store(make_settings(task_backend="redis", redis_queue="q1"))
    assert isinstance(redis_store, RedisDeliveryStore)
    assert redis_store.queue == "q1"


async def test_redis_drops_a_damaged_record() -> None:
    """A record that is no JSON is dropped at claim, not claimed again every lease."""
    await require_redis()
    queue = f"test-webhooks-{uuid.uuid4().hex[:12]}"
    try:
        async with RedisDeliveryStore(REDIS_URL, queue) as store:
            await store.add(make_delivery("msg_good", next_at=NOW))
            client = aioredis.from_url(REDIS_URL)
            try:
                await client.hset(f"sia:{queue}:webhooks:records", "msg_bad", "{not json")  # type: ignore[misc]
                await client.zadd(f"sia:{queue}:webhooks:due", {"msg_bad": NOW - 1})
            finally:
                await client.aclose()
            claimed = await store.claim_due(NOW, 10, lease=LEASE)
            assert [d.id for d in claimed] == ["msg_good"]
            assert await store.pending() == 1
    finally:
        await delete_webhook_keys(queue)
