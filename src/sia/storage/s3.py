"""The `s3` blob store: image files in an S3-compatible bucket (AWS S3, MinIO).

Keys follow `sia.storage.base`'s scheme; the object in the bucket is
`<prefix><key>`, and only objects of that shape under the prefix are ever
read, swept or signed, so the bucket may hold other things.

One aiobotocore client per store, opened by `open()` (or the first call) and
closed by `aclose()`. `url` presigns a GET locally with botocore's SigV4 query
signer: no network and no client, so it stays a cheap sync call on the hot
path (aiobotocore's own `generate_presigned_url` is a coroutine and resolves
the endpoint rules on every call). With
`public_base_url` (a CDN or a public bucket) `url` links there unsigned.

botocore and aiohttp errors do not leave this module: a missing object is
NotFound, anything else ImageStoreUnavailable, and no message carries a credential.
"""

from __future__ import annotations

import asyncio
import functools
from contextlib import AsyncExitStack, contextmanager
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import quote

import aiohttp
import botocore.session
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import BotoCoreError, ClientError

from sia.errors import ImageStoreUnavailable, NotFound
from sia.storage.base import check_key, is_key, new_key

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from datetime import datetime
    from types import TracebackType

    from types_aiobotocore_s3 import S3Client

_BATCH = 1000  # the most keys one DeleteObjects call takes
_MISSING_BUCKET = frozenset({"404", "NoSuchBucket", "NotFound"})


@functools.cache
def _session() -> AioSession:
    """One session per process: it caches the S3 model, which is slow to load."""
    return get_session()


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "unknown"))


@contextmanager
def _translated() -> Iterator[None]:
    """Turn foreign errors into ImageStoreUnavailable, naming the error code but never its text."""
    try:
        yield
    except ClientError as exc:
        raise ImageStoreUnavailable(
            f"the image store is unavailable ({_code(exc)}); retry later"
        ) from exc
    except (BotoCoreError, aiohttp.ClientError, TimeoutError) as exc:
        name = type(exc).__name__
        raise ImageStoreUnavailable(
            f"the image store is unavailable ({name}); retry later"
        ) from exc


class S3BlobStore:
    """Blobs as objects `<prefix><key>` in `bucket`, linked by presigned GET URLs."""

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        url_expiry: float = 86400.0,
        public_base_url: str | None = None,
        create_bucket_if_missing: bool = False,
        timeout: float = 10.0,
        max_attempts: int = 3,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.region = region
        self.url_expiry = url_expiry
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self._create_bucket = create_bucket_if_missing
        self._keys = (access_key_id, secret_access_key)
        # Explicit keys sign as they are; otherwise botocore's default chain
        # (environment, profile, instance role) is resolved once, in open().
        self._signing: Credentials | None = (
            Credentials(access_key_id, secret_access_key)
            if access_key_id and secret_access_key
            else None
        )
        if endpoint_url:  # MinIO and friends: path style needs no wildcard DNS
            self._object_base = f"{endpoint_url.rstrip('/')}/{bucket}/"
        elif "." in bucket:  # a dotted name breaks the TLS wildcard of virtual hosts
            self._object_base = f"https://s3.{region}.amazonaws.com/{bucket}/"
        else:
            self._object_base = f"https://{bucket}.s3.{region}.amazonaws.com/"
        self._config = AioConfig(
            signature_version="s3v4",
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            connect_timeout=timeout,
            read_timeout=timeout,
            # Checksums only where S3 demands them: many S3-compatible stores
            # reject the CRC32 headers botocore now adds by default.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._stack = AsyncExitStack()
        self._client: S3Client | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    async def open(self) -> Self:
        """Create the client (and the bucket, if asked); idempotent."""
        async with self._lock:
            if self._closed:
                raise RuntimeError("S3BlobStore is closed")
            if self._client is None:
                client = await self._stack.enter_async_context(
                    _session().create_client(
                        "s3",
                        region_name=self.region,
                        endpoint_url=self.endpoint_url,
                        aws_access_key_id=self._keys[0],
                        aws_secret_access_key=self._keys[1],
                        config=self._config,
                    )
                )
                try:
                    if self._create_bucket:
                        await self._ensure_bucket(client)
                except BaseException:
                    await self._stack.aclose()
                    raise
                self._client = client
            if self._signing is None and self.public_base_url is None:
                self._signing = await asyncio.to_thread(self._default_credentials)
        return self

    async def _ensure_bucket(self, client: S3Client) -> None:
        with _translated():
            try:
                await client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if _code(exc) not in _MISSING_BUCKET:
                    raise
                config: dict[str, Any] = {}
                if self.region != "us-east-1":  # S3 refuses the default region spelled out
                    config = {"CreateBucketConfiguration": {"LocationConstraint": self.region}}
                await client.create_bucket(Bucket=self.bucket, **config)

    @staticmethod
    def _default_credentials() -> Credentials | None:
        return botocore.session.get_session().get_credentials()

    async def _s3(self) -> S3Client:
        if self._client is None:
            await self.open()
        assert self._client is not None
        return self._client

    async def put(self, data: bytes, content_type: str) -> str:
        """Upload `data` under a new key and return the key (without the prefix)."""
        key = new_key(content_type)
        s3 = await self._s3()
        with _translated():
            await s3.put_object(
                Bucket=self.bucket,
                Key=self.prefix + key,
                Body=data,
                ContentType=content_type,
                # A key's bytes never change; caches keep them as long as a URL lives.
                CacheControl=f"max-age={int(self.url_expiry)}, immutable",
            )
        return key

    async def get(self, key: str) -> bytes:
        """The bytes stored under `key`."""
        check_key(key)
        s3 = await self._s3()
        with _translated():
            try:
                response = await s3.get_object(Bucket=self.bucket, Key=self.prefix + key)
            except ClientError as exc:
                if _code(exc) == "NoSuchKey":
                    raise NotFound(f"image {key[:80]!r} not found") from None
                raise
            async with response["Body"] as body:
                return await body.read()

    @property
    def image_dir(self) -> None:
        """None: links lead to the bucket or `public_base_url`, not to the HTTP side server."""
        return None

    def url(self, key: str) -> str:
        """A presigned GET URL for `key` valid `url_expiry` seconds, or the public link."""
        check_key(key)
        path = quote(self.prefix + key, safe="/~")
        if self.public_base_url is not None:
            return f"{self.public_base_url}/{path}"
        if self._signing is None:  # url() before open(): resolve the chain once, here
            self._signing = self._default_credentials()
            if self._signing is None:
                raise ImageStoreUnavailable("the image store has no credentials to sign URLs with")
        request = AWSRequest(method="GET", url=self._object_base + path)
        # A refreshable (role) credential may refresh here, about once an hour.
        signer = S3SigV4QueryAuth(
            self._signing.get_frozen_credentials(), "s3", self.region, expires=int(self.url_expiry)
        )
        signer.add_auth(request)
        return str(request.url)

    async def delete(self, keys: Iterable[str]) -> None:
        """Remove the objects of `keys`, up to 1000 per request."""
        names = [self.prefix + check_key(key) for key in dict.fromkeys(keys)]
        s3 = await self._s3()
        for start in range(0, len(names), _BATCH):
            await self._delete(s3, names[start : start + _BATCH])

    async def _delete(self, s3: S3Client, names: list[str]) -> None:
        with _translated():
            response = await s3.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": name} for name in names], "Quiet": True},
            )
        if errors := response.get("Errors"):
            code = errors[0].get("Code", "unknown")
            raise ImageStoreUnavailable(f"the image store is unavailable ({code}); retry later")

    async def sweep(self, older_than: datetime) -> int:
        """Remove this store's objects last modified before `older_than`; return how many."""
        cutoff = older_than.timestamp()
        s3 = await self._s3()
        removed = 0
        with _translated():
            pages = s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            )
            async for page in pages:  # a page holds at most 1000 keys: one delete call
                old = [
                    item["Key"]
                    for item in page.get("Contents", [])
                    if is_key(item["Key"][len(self.prefix) :])
                    and item["LastModified"].timestamp() < cutoff
                ]
                if old:
                    await self._delete(s3, old)
                    removed += len(old)
        return removed

    async def ready(self) -> bool:
        """Whether the bucket answers a HEAD with these credentials."""
        try:
            s3 = await self._s3()
            with _translated():
                await s3.head_bucket(Bucket=self.bucket)
        except ImageStoreUnavailable:
            return False
        return True

    async def aclose(self) -> None:
        """Close the client; idempotent."""
        async with self._lock:
            self._closed = True
            self._client = None
            await self._stack.aclose()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return (
            f"S3BlobStore(bucket={self.bucket!r}, prefix={self.prefix!r}, "
            f"endpoint_url={self.endpoint_url!r})"
        )
