"""Tests of the local blob store on a real directory."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sia.errors import NotFound
from sia.storage.base import content_type_of
from sia.storage.local import LocalBlobStore


@pytest.fixture
def store(tmp_path: Path) -> LocalBlobStore:
    """A store in a fresh directory."""
    return LocalBlobStore(tmp_path / "images", "http://example.test:9090/")


async def test_put_get_url(store: LocalBlobStore) -> None:
    """A stored blob reads back, has an unguessable key and a URL on the base."""
    key = await store.put(b"\xff\xd8jpeg", "image/jpeg")
    other = await store.put(b"\x89PNG", "image/png")
    assert key.endswith(".jpeg") and other.endswith(".png")
    assert len(key.split(".")[0]) == 32 and key != other
    assert await store.get(key) == b"\xff\xd8jpeg"
    assert store.url(key) == f"http://example.test:9090/images/{key}"
    assert content_type_of(other) == "image/png"
    assert not list(store.root.glob("*.part"))


@pytest.mark.parametrize("key", ["../secret", "a" * 32 + ".exe", "short.jpeg", ""])
async def test_foreign_keys_are_not_found(store: LocalBlobStore, key: str) -> None:
    """Keys this store never makes, including path tricks, are NotFound."""
    with pytest.raises(NotFound):
        await store.get(key)


async def test_delete_and_missing(store: LocalBlobStore) -> None:
    """Deleted blobs are gone; deleting a missing blob is fine."""
    key = await store.put(b"x", "image/jpeg")
    await store.delete([key, key])
    with pytest.raises(NotFound):
        await store.get(key)


async def test_sweep_removes_only_old_blobs(store: LocalBlobStore) -> None:
    """sweep deletes blobs written before the cutoff and keeps newer ones."""
    old = await store.put(b"old", "image/jpeg")
    new = await store.put(b"new", "image/jpeg")
    an_hour_ago = time.time() - 3600
    os.utime(store.path(old), (an_hour_ago, an_hour_ago))
    removed = await store.sweep(datetime.now(UTC) - timedelta(minutes=30))
    assert removed == 1
    assert await store.get(new) == b"new"
    with pytest.raises(NotFound):
        await store.get(old)
