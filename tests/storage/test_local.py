"""Tests of the local blob store on a real directory, its faults included."""

from __future__ import annotations

import os
import stat
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest

from sia.errors import ConfigError, ImageStoreUnavailable, NotFound
from sia.rpc.errors import status_code_of
from sia.storage.base import content_type_of
from sia.storage.local import SECRET_FILE, ImageLinks, LocalBlobStore
from tests.helpers import MakeSettings
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


KEY = "A" * 32 + ".jpeg"


def test_links_sign_key_and_expiry() -> None:
    """A link is valid until its expiry and only as made: same secret, key and expiry."""
    now = [1_000_000.5]
    links = ImageLinks(b"s" * 32, ttl=60, clock=lambda: now[0])
    query = parse_qs(links.query(KEY))
    expires, signature = query["expires"][0], query["signature"][0]
    assert expires == "1000061" and "=" not in signature and len(signature) == 43
    assert links.seconds_left(KEY, expires, signature) == 60
    other = ImageLinks(b"t" * 32, ttl=60, clock=lambda: now[0])
    assert other.seconds_left(KEY, expires, signature) is None  # another secret
    assert links.seconds_left("B" * 32 + ".jpeg", expires, signature) is None
    for bad_expires in ("1000062", "\uff11\uff10", "", "-1", "1e9", " 1000061"):
        assert links.seconds_left(KEY, bad_expires, signature) is None
    assert links.seconds_left(KEY, expires, None) is None
    assert links.seconds_left(KEY, None, signature) is None
    assert links.seconds_left(KEY, expires, signature[:-1]) is None
    now[0] = 1_000_061.0
    assert links.seconds_left(KEY, expires, signature) == 0  # its last second
    now[0] = 1_000_061.5
    assert links.seconds_left(KEY, expires, signature) is None


async def test_store_signs_its_links(tmp_path: Path) -> None:
    """With links, url() carries expires and a signature that checks out."""
    links = ImageLinks(b"s" * 32, ttl=600)
    store = LocalBlobStore(tmp_path / "images", "http://example.test:9090/", links=links)
    key = await store.put(b"\xff\xd8jpeg", "image/jpeg")
    parts = urlsplit(store.url(key))
    assert (
        f"{parts.scheme}://{parts.netloc}{parts.path}" == f"http://example.test:9090/images/{key}"
    )
    query = parse_qs(parts.query)
    assert links.seconds_left(key, query["expires"][0], query["signature"][0]) in (599, 600)


def test_secret_from_setting(make_settings: MakeSettings) -> None:
    """IMAGE_URL_SECRET signs: two instances with it agree, and no file is written; the TTL is
    IMAGE_URL_TTL, else TASK_RETENTION."""
    settings = make_settings(image_url_secret="sec-77c1-" + "x" * 32, image_url_ttl=90)
    first, second = ImageLinks.from_settings(settings), ImageLinks.from_settings(settings)
    assert first.signature(KEY, 5) == second.signature(KEY, 5)
    assert first.ttl == 90
    assert not (settings.data_dir / SECRET_FILE).exists()
    retention = make_settings(task_retention=3600)
    assert ImageLinks.from_settings(retention).ttl == 3600


def test_generated_secret_is_kept_private_and_survives_restarts(
    make_settings: MakeSettings,
) -> None:
    """Without IMAGE_URL_SECRET a secret is made once in DATA_DIR, mode 0600, and read again
    by the next start, so links outlive a restart; a damaged file is a ConfigError."""
    settings = make_settings()
    first = ImageLinks.from_settings(settings)
    path = settings.data_dir / SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in settings.data_dir.iterdir()] == [SECRET_FILE]  # no temporary left
    again = ImageLinks.from_settings(settings)
    assert again.signature(KEY, 5) == first.signature(KEY, 5)
    secret = path.read_text().strip()
    from_setting = ImageLinks.from_settings(make_settings(image_url_secret=secret))
    assert from_setting.signature(KEY, 5) == first.signature(KEY, 5)  # copy it to replicas
    path.write_text("short\n")
    with pytest.raises(ConfigError) as caught:
        ImageLinks.from_settings(settings)
    assert caught.value.message.startswith("IMAGE_URL_SECRET: ")
    assert "short" not in caught.value.message


def test_secret_that_cannot_be_kept_is_config_error(
    make_settings: MakeSettings, tmp_path: Path
) -> None:
    """A DATA_DIR where the secret cannot be made is a ConfigError naming IMAGE_URL_SECRET."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(ConfigError) as caught:
        ImageLinks.from_settings(make_settings(data_dir=blocker / "data"))
    assert caught.value.message.startswith("IMAGE_URL_SECRET: not set, and ")


def test_reprs_hide_the_secret(make_settings: MakeSettings, tmp_path: Path) -> None:
    """The secret shows in no repr: links, store, settings."""
    settings = make_settings(image_url_secret="sec-77c1-" + "x" * 32)
    links = ImageLinks.from_settings(settings)
    store = LocalBlobStore(tmp_path / "images", "http://x", links=links)
    for text in (repr(links), repr(store), repr(settings), str(vars(store))):
        assert "sec-77c1" not in text
