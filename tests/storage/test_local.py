"""Tests of the local blob store on a real directory, its faults included."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from sia.errors import ImageStoreUnavailable, NotFound
from sia.rpc.errors import status_code_of
from sia.storage.base import content_type_of
from sia.storage.local import LocalBlobStore
from tests.storage.faults import full_disk, part_files, unwritable


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


async def test_unwritable_directory_is_unavailable_then_recovers(store: LocalBlobStore) -> None:
    """An unwritable directory: put is ImageStoreUnavailable (UNAVAILABLE, no path in the
    message) and ready() False; writable again, both recover."""
    assert await store.ready()
    with unwritable(store.root):
        with pytest.raises(ImageStoreUnavailable) as caught:
            await store.put(b"\xff\xd8jpeg", "image/jpeg")
        assert not await store.ready()
    exc = caught.value
    assert status_code_of(exc) == grpc.StatusCode.UNAVAILABLE
    assert exc.message.startswith("the image store cannot write: ")
    assert str(store.root) not in exc.message
    assert await store.ready()
    key = await store.put(b"\xff\xd8jpeg", "image/jpeg")
    assert await store.get(key) == b"\xff\xd8jpeg"
    assert part_files(store.root) == []


async def test_full_disk_is_unavailable_and_leaves_no_part_file(
    store: LocalBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC mid-write: ImageStoreUnavailable naming the cause, the partial file removed,
    and the store not ready until space is back."""
    with full_disk(monkeypatch):
        with pytest.raises(ImageStoreUnavailable) as caught:
            await store.put(b"\xff\xd8" + b"x" * 1000, "image/jpeg")
        assert not await store.ready()
        assert part_files(store.root) == []
    assert "No space left on device" in caught.value.message
    assert str(store.root) not in caught.value.message
    assert list(store.root.iterdir()) == []
    assert await store.ready()


async def test_ready_wants_free_space(tmp_path: Path) -> None:
    """A directory with less free space than min_free_bytes is not ready."""
    free = os.statvfs(tmp_path)
    enough = LocalBlobStore(tmp_path / "a", "http://x", min_free_bytes=1)
    short = LocalBlobStore(
        tmp_path / "b", "http://x", min_free_bytes=free.f_bavail * free.f_frsize * 2 + 1
    )
    assert await enough.ready()
    assert not await short.ready()
    assert list(short.root.iterdir()) == []  # the probe leaves nothing behind
