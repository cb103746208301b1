"""Tests of the S3 blob store against moto's S3 server on loopback."""

from __future__ import annotations

import asyncio
import math
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import botocore.auth
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from moto.server import ThreadedMotoServer

from sia.app import App
from sia.domain import GenerationRequest, TaskStatus
from sia.errors import NotFound, Unavailable
from sia.storage import s3 as s3_module
from sia.storage.s3 import S3BlobStore
from tests.helpers import TEST_SIZE, MakeSettings

ACCESS_KEY = "AKIASIATESTKEY000001"
SECRET_KEY = "sia-test-secret-must-not-leak"
SESSION = get_session()  # shared, so the S3 model loads once for the raw clients


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """moto's S3 server on a free loopback port for the whole module."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def make_store(endpoint: str, **kwargs: Any) -> S3BlobStore:
    """A store on a fresh bucket of the moto server."""
    options: dict[str, Any] = {
        "bucket": f"sia-{secrets.token_hex(6)}",
        "prefix": "images/",
        "endpoint_url": endpoint,
        "access_key_id": ACCESS_KEY,
        "secret_access_key": SECRET_KEY,
        "create_bucket_if_missing": True,
    }
    return S3BlobStore(**(options | kwargs))


@pytest.fixture
async def store(endpoint: str) -> AsyncIterator[S3BlobStore]:
    """An open store with a bucket of its own."""
    async with make_store(endpoint, url_expiry=600) as store:
        yield store


@pytest.fixture
async def raw(endpoint: str) -> AsyncIterator[Any]:
    """A plain aiobotocore client on the moto server, to look behind the store's back."""
    config = AioConfig(signature_version="s3v4", s3={"addressing_style": "path"})
    async with SESSION.create_client(
        "s3",
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=config,
    ) as client:
        yield client


def dead_endpoint() -> str:
    """A loopback URL on which nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def test_put_get_round_trip(store: S3BlobStore, raw: Any) -> None:
    """A stored blob reads back and keeps its content type and cache header."""
    key = await store.put(b"\x89PNG data", "image/png")
    assert await store.get(key) == b"\x89PNG data"
    head = await raw.head_object(Bucket=store.bucket, Key=f"images/{key}")
    assert head["ContentType"] == "image/png"
    assert head["CacheControl"] == "max-age=600, immutable"


async def test_keys_look_local_and_live_under_the_prefix(store: S3BlobStore, raw: Any) -> None:
    """Keys are `<32 chars>.<ext>` without the prefix; the object is `prefix + key`."""
    jpeg = await store.put(b"\xff\xd8", "image/jpeg")
    webp = await store.put(b"RIFF", "image/webp")
    assert len(jpeg.split(".")[0]) == 32 and jpeg.endswith(".jpeg") and webp.endswith(".webp")
    listing = await raw.list_objects_v2(Bucket=store.bucket)
    assert sorted(item["Key"] for item in listing["Contents"]) == sorted(
        [f"images/{jpeg}", f"images/{webp}"]
    )


async def test_presigned_url_downloads_over_http(store: S3BlobStore) -> None:
    """The presigned URL serves the bytes to a plain HTTP GET and carries its expiry."""
    key = await store.put(b"\xff\xd8jpeg", "image/jpeg")
    url = store.url(key)
    query = parse_qs(urlsplit(url).query)
    assert query["X-Amz-Expires"] == ["600"] and "X-Amz-Signature" in query
    assert SECRET_KEY not in url
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "image/jpeg"
        assert await response.read() == b"\xff\xd8jpeg"


async def test_presigned_url_matches_botocore(
    store: S3BlobStore, raw: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's local signing gives exactly the URL botocore's own presigner gives."""
    frozen = datetime(2026, 1, 2, 3, 4, 5)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: frozen)
    key = await store.put(b"x", "image/png")
    expected = await raw.generate_presigned_url(
        "get_object", Params={"Bucket": store.bucket, "Key": f"images/{key}"}, ExpiresIn=600
    )
    assert store.url(key) == expected


def test_presigning_is_local() -> None:
    """Presigning needs no client and no network: the endpoint here does not even exist."""
    store = S3BlobStore(
        bucket="b", endpoint_url="http://127.0.0.1:1", access_key_id="a", secret_access_key="s"
    )
    key = f"{secrets.token_urlsafe(24)}.png"
    url = store.url(key)
    assert url.startswith(f"http://127.0.0.1:1/b/{key}?")
    assert "X-Amz-Signature=" in url


async def test_public_base_url_is_unsigned(endpoint: str) -> None:
    """With a public base URL, links are `<base>/<prefix><key>` with no signature."""
    async with make_store(endpoint, public_base_url="https://cdn.example.test/") as store:
        key = await store.put(b"x", "image/webp")
        assert store.url(key) == f"https://cdn.example.test/images/{key}"


def test_aws_object_urls() -> None:
    """Without an endpoint, URLs use AWS's regional virtual host (path style for dotted names)."""
    plain = S3BlobStore(bucket="imgs", region="eu-west-1", access_key_id="a", secret_access_key="s")
    dotted = S3BlobStore(bucket="a.b", region="eu-west-1", access_key_id="a", secret_access_key="s")
    key = "A" * 32 + ".png"
    assert plain.url(key).startswith(f"https://imgs.s3.eu-west-1.amazonaws.com/{key}?")
    assert dotted.url(key).startswith(f"https://s3.eu-west-1.amazonaws.com/a.b/{key}?")


async def test_missing_key_is_not_found(store: S3BlobStore) -> None:
    """A well-formed key with no object behind it is NotFound."""
    with pytest.raises(NotFound):
        await store.get("A" * 32 + ".jpeg")


@pytest.mark.parametrize("key", ["../secret", "a" * 32 + ".exe", "short.jpeg", "", "x/" + "a" * 32])
async def test_foreign_keys_are_not_found_without_a_request(key: str) -> None:
    """Keys this store never makes are NotFound before any client exists."""
    store = make_store(dead_endpoint())
    with pytest.raises(NotFound):
        await store.get(key)
    with pytest.raises(NotFound):
        store.url(key)
    with pytest.raises(NotFound):
        await store.delete([key])
    assert store._client is None
    await store.aclose()


async def test_delete_in_batches(
    store: S3BlobStore, raw: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """delete removes every key in batches, ignores missing ones and repeats."""
    monkeypatch.setattr(s3_module, "_BATCH", 2)
    keep = await store.put(b"keep", "image/png")
    keys = [await store.put(b"x", "image/png") for _ in range(4)]
    calls: list[int] = []
    original = store._delete

    async def spy(s3: Any, names: list[str]) -> None:
        calls.append(len(names))
        await original(s3, names)

    monkeypatch.setattr(store, "_delete", spy)
    await store.delete([*keys, keys[0], "Z" * 32 + ".png"])
    assert calls == [2, 2, 1]
    listing = await raw.list_objects_v2(Bucket=store.bucket)
    assert [item["Key"] for item in listing["Contents"]] == [f"images/{keep}"]
    await store.delete([])


async def test_sweep_all_none_and_only_own_objects(store: S3BlobStore, raw: Any) -> None:
    """sweep with a past cutoff removes nothing; a future one removes only the store's objects."""
    keys = [await store.put(b"x", "image/jpeg") for _ in range(3)]
    await raw.put_object(Bucket=store.bucket, Key="images/notes.txt", Body=b"keep")
    await raw.put_object(Bucket=store.bucket, Key=keys[0], Body=b"outside the prefix")
    assert await store.sweep(datetime.now(UTC) - timedelta(hours=1)) == 0
    assert await store.sweep(datetime.now(UTC) + timedelta(hours=1)) == 3
    listing = await raw.list_objects_v2(Bucket=store.bucket)
    assert {item["Key"] for item in listing["Contents"]} == {keys[0], "images/notes.txt"}


async def test_sweep_cuts_between_old_and_new(store: S3BlobStore) -> None:
    """sweep deletes an object written before the cutoff and keeps one written after it."""
    old = await store.put(b"old", "image/png")
    # LastModified has whole seconds: cut at the next second, then write again.
    cutoff = math.floor(time.time()) + 1
    await asyncio.sleep(max(0.0, cutoff - time.time()) + 0.05)
    new = await store.put(b"new", "image/png")
    assert await store.sweep(datetime.fromtimestamp(cutoff, UTC)) == 1
    assert await store.get(new) == b"new"
    with pytest.raises(NotFound):
        await store.get(old)


async def test_dead_endpoint_is_unavailable_without_secrets() -> None:
    """Connection failures become Unavailable, and neither message nor repr holds the secret."""
    store = make_store(dead_endpoint(), create_bucket_if_missing=False, max_attempts=1)
    with pytest.raises(Unavailable) as caught:
        await store.put(b"x", "image/png")
    assert SECRET_KEY not in str(caught.value) and ACCESS_KEY not in str(caught.value)
    assert "unavailable" in str(caught.value)
    with pytest.raises(Unavailable):
        await store.get("A" * 32 + ".png")
    assert await store.ready() is False
    await store.aclose()
    await store.aclose()


def test_repr_hides_credentials(endpoint: str) -> None:
    """repr names bucket, prefix and endpoint, never the keys."""
    store = make_store(endpoint, bucket="shown")
    text = repr(store)
    assert "shown" in text and "images/" in text and endpoint in text
    assert SECRET_KEY not in text and ACCESS_KEY not in text


async def test_ready(store: S3BlobStore, endpoint: str) -> None:
    """ready is true for an existing bucket and false for a missing one."""
    assert await store.ready() is True
    async with make_store(endpoint, create_bucket_if_missing=False) as missing:
        assert await missing.ready() is False


async def test_closed_store_refuses_work(endpoint: str) -> None:
    """After aclose the store does not quietly reopen."""
    store = make_store(endpoint)
    await store.open()
    await store.aclose()
    with pytest.raises(RuntimeError):
        await store.put(b"x", "image/png")


async def test_bucket_created_outside_the_default_region(endpoint: str) -> None:
    """create_bucket_if_missing names the region where S3 wants it spelled out."""
    async with make_store(endpoint, region="eu-west-1") as store:
        key = await store.put(b"x", "image/png")
        assert await store.get(key) == b"x"


def test_default_credential_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without explicit keys, URLs are signed with the environment's; with none, Unavailable."""
    # Never ask an instance-metadata service, and read no profile of this machine.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    key = "A" * 32 + ".png"
    url = S3BlobStore(bucket="b", endpoint_url="http://127.0.0.1:1").url(key)
    assert f"X-Amz-Credential={ACCESS_KEY}" in url
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(Unavailable):
        S3BlobStore(bucket="b", endpoint_url="http://127.0.0.1:1").url(key)


async def test_app_stores_task_images_in_s3(
    endpoint: str, raw: Any, make_settings: MakeSettings
) -> None:
    """With BLOB_STORE=s3 a task's image lands in the bucket and its presigned URL downloads."""
    bucket = f"sia-{secrets.token_hex(6)}"
    await raw.create_bucket(Bucket=bucket)
    settings = make_settings(
        blob_store="s3",
        s3_bucket=bucket,
        s3_endpoint_url=endpoint,
        s3_access_key_id=ACCESS_KEY,
        s3_secret_access_key=SECRET_KEY,
    )
    async with App(settings) as app:
        request = GenerationRequest(prompt="x", model="doubao-seedream-4-0-250828", size=TEST_SIZE)
        task = await app.service.submit(request)
        async with asyncio.timeout(15):
            while (done := await app.service.get_task(task.id)).status is not TaskStatus.SUCCEEDED:
                await asyncio.sleep(0.05)
        assert done.result is not None
        url = done.result.images[0].url
        assert url.startswith(f"{endpoint}/{bucket}/sia/") and "X-Amz-Signature=" in url
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            assert resp.status == 200
            assert (await resp.read())[:2] == b"\xff\xd8"
