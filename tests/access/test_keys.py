"""API keys: their form, their hash, the bearer header, names, and the key ring's modes."""

from __future__ import annotations

from pathlib import Path

import pytest

from sia.access.keys import KeyRing, bearer, check_name, hash_key, new_key
from sia.access.sqlite_store import SqliteAccessStore
from sia.domain import utcnow
from sia.errors import InvalidArgument, Unauthenticated
from sia.logs import OUTPUT
from tests.access.helpers import create_key


def test_keys_are_prefixed_random_and_stored_as_sha256() -> None:
    """`sia_` and 43 URL-safe characters (256 bits); the stored form is a hex SHA-256."""
    keys = {new_key() for _ in range(100)}
    assert len(keys) == 100
    for key in keys:
        assert key.startswith("sia_") and len(key) == 47
    key = next(iter(keys))
    assert len(hash_key(key)) == 64 and key not in hash_key(key)


@pytest.mark.parametrize(
    ("value", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc ", "abc"),
        ("BEARER   abc", "abc"),
        ("Basic abc", None),
        ("Bearer ", None),
        ("abc", None),
        (None, None),
    ],
)
def test_bearer_reads_the_token(value: str | None, token: str | None) -> None:
    assert bearer(value) == token


@pytest.mark.parametrize("name", ["", "-a", "a b", "a/b", "é", "x" * 65])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument, match="name"):
        check_name(name)


async def test_auto_mode_enforces_once_any_key_exists(tmp_path: Path) -> None:
    """Open with no keys; enforcing with one; still enforcing when all are revoked."""
    store = SqliteAccessStore(tmp_path / "access.db")
    await store.open()
    try:
        ring = KeyRing(store)
        await ring.refresh()
        assert not ring.enforcing
        assert ring.authenticate(None) is None
        assert ring.authenticate("Bearer sia_unknown") is None  # open: anonymous

        key = await create_key(store, "only")
        await ring.refresh()
        assert ring.enforcing
        found = ring.authenticate(f"Bearer {key}")
        assert found is not None and found.name == "only"
        with pytest.raises(Unauthenticated):
            ring.authenticate(None)

        await store.revoke_key("only", utcnow())
        await ring.refresh()
        assert ring.enforcing
        with pytest.raises(Unauthenticated):
            ring.authenticate(f"Bearer {key}")
        assert "sia_" not in repr(ring)
    finally:
        await store.aclose()


async def test_keys_mode_enforces_with_no_keys_and_none_never(tmp_path: Path) -> None:
    store = SqliteAccessStore(tmp_path / "access.db")
    await store.open()
    try:
        strict, open_ = KeyRing(store, "keys"), KeyRing(store, "none")
        await strict.refresh()
        await open_.refresh()
        with pytest.raises(Unauthenticated):
            strict.authenticate(None)
        await create_key(store, "k")
        await open_.refresh()
        assert open_.authenticate(None) is None
    finally:
        await store.aclose()


def test_the_suite_refuses_a_key_in_a_log_line() -> None:
    """The conftest guard: any log line holding a key fails the test that wrote it."""
    with pytest.raises(AssertionError, match="API key reached the logs"):
        OUTPUT.write('{"event":"oops","token":"' + new_key() + '"}')
