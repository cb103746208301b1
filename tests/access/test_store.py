"""The AccessStore contract, run against the SQLite store and the Redis store alike,
then each store's own failures: a backend that cannot be reached or used."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from redis import asyncio as aioredis

from sia.access.base import AccessStore, ApiKey, KeyLimits, UsageEntry
from sia.access.redis_store import RedisAccessStore
from sia.access.sqlite_store import SCHEMA_VERSION, SqliteAccessStore
from sia.errors import AlreadyExists, ConfigError, NotFound, Unavailable
from tests.tasks.backend_helpers import REDIS_URL, own_redis, require_redis
from tests.waiting import within

#: Opens a new store object on the test's own backend (the same file, the same namespace).
MakeStore = Callable[[], Awaitable[AccessStore]]

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
D1, D2, D3 = date(2025, 3, 1), date(2025, 3, 2), date(2025, 3, 3)


def make_key(name: str = "ci", *, at: datetime = T0, **fields: object) -> ApiKey:
    """A key named `name` with a hash of its own."""
    return ApiKey(
        name=name,
        key_hash=uuid.uuid5(uuid.NAMESPACE_DNS, name).hex * 2,
        prefix=f"sia_{name[:4]}",
        created_at=at,
        **fields,  # type: ignore[arg-type]
    )


async def delete_namespace(namespace: str) -> None:
    """Delete every Redis key the store made under `namespace`."""
    client = aioredis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"sia:{namespace}:*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture(params=["sqlite", "redis"])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MakeStore]:
    """`await make_store()` opens a store on this test's file or namespace; all are closed
    (and the namespace deleted) afterwards."""
    opened: list[AccessStore] = []
    namespace = f"test-access-{uuid.uuid4().hex[:12]}"
    if request.param == "redis":
        await require_redis()

    def build() -> AccessStore:
        if request.param == "redis":
            return RedisAccessStore(REDIS_URL, namespace)
        return SqliteAccessStore(tmp_path / "access.db")

    async def make() -> AccessStore:
        store = build()
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.aclose()
    if request.param == "redis":
        await delete_namespace(namespace)


@pytest.fixture
async def store(make_store: MakeStore) -> AccessStore:
    """One open store."""
    return await make_store()


# --- keys ----------------------------------------------------------------------------------


async def test_keys_are_listed_oldest_first(store: AccessStore) -> None:
    """keys() returns every key, oldest first, whatever order they were added in."""
    assert await store.keys() == []
    late = make_key("late", at=T0 + timedelta(hours=1))
    early = make_key("early", at=T0)
    await store.add_key(late)
    await store.add_key(early)
    assert await store.keys() == [early, late]


async def test_revoke_keeps_the_key_and_a_second_revoke_changes_nothing(
    store: AccessStore,
) -> None:
    """A revoked key stays listed with its revocation time; revoking it again returns it as is."""
    await store.add_key(make_key("ci"))
    at = T0 + timedelta(days=2)
    revoked = await store.revoke_key("ci", at)
    assert revoked.revoked
    assert revoked.revoked_at == at
    assert revoked.revoked_at.tzinfo is not None
    assert await store.keys() == [revoked]
    assert await store.revoke_key("ci", at + timedelta(days=1)) == revoked
    assert await store.keys() == [revoked]


async def test_a_taken_name_is_already_exists_even_when_revoked(store: AccessStore) -> None:
    """Adding a name that exists, revoked or not, raises AlreadyExists naming it."""
    await store.add_key(make_key("ci"))
    with pytest.raises(AlreadyExists, match="an API key named 'ci' exists"):
        await store.add_key(make_key("ci", at=T0 + timedelta(seconds=1)))
    await store.revoke_key("ci", T0)
    with pytest.raises(AlreadyExists, match="'ci'"):
        await store.add_key(make_key("ci"))
    assert [key.name for key in await store.keys()] == ["ci"]


async def test_revoking_an_unknown_name_is_not_found(store: AccessStore) -> None:
    """revoke_key of a name no key has raises NotFound naming it."""
    with pytest.raises(NotFound, match="no API key named 'ghost'"):
        await store.revoke_key("ghost", T0)


async def test_limits_models_and_times_round_trip(store: AccessStore) -> None:
    """Every limit, the model set and both datetimes come back as they went in."""
    full = KeyLimits(
        requests_per_minute=60,
        images_per_minute=10,
        concurrency=4,
        images_per_day=1000,
        budget_per_day_micros=5_000_000,
        budget_per_month_micros=2**40,
    )
    keys = [
        make_key("full", limits=full, models=frozenset({"seedream-4", "gpt-image-1"})),
        make_key("part", at=T0 + timedelta(microseconds=1), limits=KeyLimits(concurrency=0)),
        make_key("open", at=T0 + timedelta(seconds=1)),
        make_key(
            "gone",
            at=datetime(2025, 3, 1, 14, 0, tzinfo=UTC) + timedelta(microseconds=7),
            revoked_at=T0 + timedelta(days=3),
        ),
    ]
    for key in keys:
        await store.add_key(key)
    assert await store.keys() == keys
    assert all(key.created_at.tzinfo is not None for key in await store.keys())


async def test_a_concurrent_add_of_one_name_has_one_winner(make_store: MakeStore) -> None:
    """Two store objects adding the same name at once: one succeeds, one gets AlreadyExists."""
    first, second = await make_store(), await make_store()
    results = await asyncio.gather(
        first.add_key(make_key("race")),
        second.add_key(make_key("race", at=T0 + timedelta(seconds=1))),
        return_exceptions=True,
    )
    assert sorted(type(result).__name__ for result in results) == ["AlreadyExists", "NoneType"]
    assert len(await first.keys()) == 1


# --- usage ---------------------------------------------------------------------------------


async def test_recording_usage_adds_to_the_totals(store: AccessStore) -> None:
    """Two record calls for one (key, model, day) sum, as do repeats within one batch."""
    entry = UsageEntry("ci", "m-1", D1, requests=1, images=2, output_tokens=300, cost_micros=40)
    await store.record_usage([entry])
    await store.record_usage([entry, entry])
    assert await store.usage("ci", D1, D1) == [
        UsageEntry("ci", "m-1", D1, requests=3, images=6, output_tokens=900, cost_micros=120)
    ]


async def test_an_empty_batch_and_zero_entries_store_nothing(store: AccessStore) -> None:
    """Nothing to add leaves no row behind."""
    await store.record_usage([])
    await store.record_usage([UsageEntry("ci", "m-1", D1)])
    assert await store.usage(None, D1, D3) == []


async def test_usage_filters_by_range_and_key_and_sorts(store: AccessStore) -> None:
    """usage() keeps days in [first, last] and the one key asked for, sorted by day, key, model."""
    before, after = D1 - timedelta(days=1), D3 + timedelta(days=1)
    await store.record_usage(
        [
            UsageEntry("zeta", "m-2", D2, requests=1),
            UsageEntry("alpha", "m-2", D2, requests=2),
            UsageEntry("alpha", "m-1", D2, images=3),
            UsageEntry("alpha", "m-1", D1, cost_micros=4),
            UsageEntry("alpha", "m-1", before, requests=5),
            UsageEntry("alpha", "m-1", after, requests=6),
            UsageEntry("zeta", "m-1", D3, output_tokens=7),
        ]
    )
    assert await store.usage(None, D1, D3) == [
        UsageEntry("alpha", "m-1", D1, cost_micros=4),
        UsageEntry("alpha", "m-1", D2, images=3),
        UsageEntry("alpha", "m-2", D2, requests=2),
        UsageEntry("zeta", "m-2", D2, requests=1),
        UsageEntry("zeta", "m-1", D3, output_tokens=7),
    ]
    assert await store.usage("zeta", D1, D3) == [
        UsageEntry("zeta", "m-2", D2, requests=1),
        UsageEntry("zeta", "m-1", D3, output_tokens=7),
    ]
    assert await store.usage("alpha", D2, D2) == [
        UsageEntry("alpha", "m-1", D2, images=3),
        UsageEntry("alpha", "m-2", D2, requests=2),
    ]
    assert await store.usage("nobody", D1, D3) == []
    assert await store.usage(None, D3, D1) == []  # an empty range
    assert len(await store.usage(None, date.min, date.max)) == 7


async def test_model_names_with_separators_stay_apart(store: AccessStore) -> None:
    """Models holding quotes, colons, commas, brackets or non-ASCII never merge or split."""
    models = ["a:b", "a", 'b"]', '["x","y"]', "a,b", "画像:モデル", ""]
    await store.record_usage(
        [UsageEntry("k.1", m, D1, requests=i + 1) for i, m in enumerate(models)]
    )
    rows = await store.usage("k.1", D1, D1)
    assert {row.model: row.requests for row in rows} == {m: i + 1 for i, m in enumerate(models)}
    assert [row.model for row in rows] == sorted(models)


async def test_large_counts_add_exactly(store: AccessStore) -> None:
    """Micros well past 2**53 add as integers, with no float rounding."""
    big = 2**60 + 1
    await store.record_usage([UsageEntry("ci", "m-1", D1, cost_micros=big)])
    await store.record_usage([UsageEntry("ci", "m-1", D1, cost_micros=1)])
    assert (await store.usage("ci", D1, D1))[0].cost_micros == big + 1


# --- sharing and persistence ---------------------------------------------------------------


async def test_data_survives_closing_and_reopening(make_store: MakeStore) -> None:
    """A new store object on the same file or namespace sees what a closed one stored."""
    first = await make_store()
    await first.add_key(make_key("ci", models=frozenset({"m-1"})))
    await first.revoke_key("ci", T0 + timedelta(days=1))
    await first.record_usage([UsageEntry("ci", "m-1", D1, requests=1)])
    keys = await first.keys()
    await first.aclose()
    await first.aclose()  # idempotent

    second = await make_store()
    assert await second.keys() == keys
    assert await second.usage(None, D1, D1) == [UsageEntry("ci", "m-1", D1, requests=1)]


async def test_a_second_store_sees_what_the_first_writes(make_store: MakeStore) -> None:
    """As the CLI and a running server do: a key or usage one adds, the other reads next time."""
    server, cli = await make_store(), await make_store()
    assert await server.keys() == []
    await cli.add_key(make_key("new"))
    assert [key.name for key in await server.keys()] == ["new"]
    await server.record_usage([UsageEntry("new", "m-1", D1, images=1)])
    await cli.record_usage([UsageEntry("new", "m-1", D1, images=1)])
    assert await cli.usage("new", D1, D1) == [UsageEntry("new", "m-1", D1, images=2)]
    await cli.revoke_key("new", T0)
    assert (await server.keys())[0].revoked


async def test_a_store_that_is_not_open_says_so(make_store: MakeStore) -> None:
    """Using a closed store is a bug (RuntimeError), not an outage."""
    store = await make_store()
    await store.aclose()
    with pytest.raises(RuntimeError, match="not open"):
        await store.keys()


# --- SQLite failures -----------------------------------------------------------------------


async def test_sqlite_in_a_directory_that_cannot_exist_is_a_config_error(tmp_path: Path) -> None:
    """A path under a regular file (no directory can be made there) fails open() with
    ConfigError."""
    (tmp_path / "file").write_text("")
    store = SqliteAccessStore(tmp_path / "file" / "data" / "access.db")
    with pytest.raises(ConfigError, match="access database"):
        await store.open()


async def test_sqlite_on_a_file_that_is_no_database_is_a_config_error(tmp_path: Path) -> None:
    """A file that is not SQLite fails open() with ConfigError."""
    path = tmp_path / "access.db"
    path.write_bytes(b"not a database, " * 512)
    with pytest.raises(ConfigError, match="cannot use the access database"):
        await SqliteAccessStore(path).open()


async def test_sqlite_with_a_newer_schema_is_a_config_error(tmp_path: Path) -> None:
    """A file a later version wrote is refused rather than misread."""
    path = tmp_path / "access.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(ConfigError, match="has schema"):
        await SqliteAccessStore(path).open()


async def test_sqlite_locked_past_the_busy_timeout_is_unavailable(tmp_path: Path) -> None:
    """A write that another process's lock holds up past the busy timeout is Unavailable;
    reads go on (WAL)."""
    path = tmp_path / "access.db"
    async with SqliteAccessStore(path, busy_timeout=0.05) as store:
        await store.add_key(make_key("ci"))
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN EXCLUSIVE")
            with pytest.raises(Unavailable, match=r"access store \(sqlite\) is unavailable"):
                await store.add_key(make_key("other"))
            with pytest.raises(Unavailable):
                await store.record_usage([UsageEntry("ci", "m-1", D1, requests=1)])
            with pytest.raises(Unavailable):
                await store.revoke_key("ci", T0)
            assert [key.name for key in await store.keys()] == ["ci"]
            other.execute("ROLLBACK")
        finally:
            other.close()
        await store.add_key(make_key("other"))


async def test_sqlite_refuses_a_second_name_for_the_same_secret(tmp_path: Path) -> None:
    """key_hash is unique in the file: a second name for one secret is AlreadyExists."""
    async with SqliteAccessStore(tmp_path / "access.db") as store:
        await store.add_key(make_key("ci"))
        twin = make_key("ci")
        with pytest.raises(AlreadyExists, match="same secret"):
            await store.add_key(ApiKey("twin", twin.key_hash, twin.prefix, T0))
        assert [key.name for key in await store.keys()] == ["ci"]


async def test_sqlite_repr_names_the_file(tmp_path: Path) -> None:
    """The repr says which file the store uses."""
    assert "access.db" in repr(SqliteAccessStore(tmp_path / "access.db"))


# --- Redis failures ------------------------------------------------------------------------


def closed_port() -> int:
    """A loopback port nothing listens on (it was just free)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_redis_unreachable_at_open_is_a_config_error() -> None:
    """open() against a port nothing listens on fails with ConfigError, without the password."""
    store = RedisAccessStore(f"redis://:s3cret@127.0.0.1:{closed_port()}/0", "ns")
    with pytest.raises(ConfigError, match="cannot reach Redis") as raised:
        await within(store.open(), "open() hung on a closed port")
    assert "s3cret" not in str(raised.value)
    await store.aclose()


async def test_a_bad_redis_url_is_a_config_error() -> None:
    """A URL of no Redis scheme fails open() with ConfigError."""
    with pytest.raises(ConfigError, match="REDIS_URL"):
        await RedisAccessStore("http://127.0.0.1:1/", "ns").open()


async def test_redis_going_away_after_open_is_unavailable(tmp_path: Path) -> None:
    """Every call fails fast with Unavailable while Redis is down, and works once it is back."""
    async with (
        own_redis(tmp_path / "redis") as redis,
        RedisAccessStore(redis.url, "outage") as store,
    ):
        await store.add_key(make_key("ci"))
        await redis.kill()
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: store.add_key(make_key("other")),
            lambda: store.revoke_key("ci", T0),
            store.keys,
            lambda: store.record_usage([UsageEntry("ci", "m-1", D1, requests=1)]),
            lambda: store.usage(None, D1, D1),
        ]
        for call in calls:
            with pytest.raises(Unavailable, match=r"access store \(redis\) is unavailable"):
                await within(call(), "a call hung while Redis was down", timeout=5)
        assert not await store.ping()
        await redis.start()
        assert await store.ping()
        assert [key.name for key in await store.keys()] == ["ci"]  # AOF kept it


async def test_redis_repr_hides_the_password() -> None:
    """Neither the password nor a query string reaches the repr."""
    text = repr(RedisAccessStore("rediss://user:s3cret@cache:6380/2?password=other", "prod"))
    assert "s3cret" not in text
    assert "other" not in text
    assert "cache:6380/2" in text
    assert "prod" in text
