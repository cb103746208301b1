"""The blob-store seam: where generated images are kept so their URLs last.

Every store names blobs by the one key scheme below: `<32 url-safe
characters>.<ext>`, random and unguessable, so a link is its own credential
(like a presigned URL). A key of any other shape is NotFound before any
file or object is touched, which also shuts out path tricks.
"""

from __future__ import annotations

import re
import secrets
from typing import TYPE_CHECKING, Protocol

from sia.errors import NotFound

if TYPE_CHECKING:
    from collections.abc import Iterable
    from datetime import datetime
    from pathlib import Path

#: File extension for each content type the service stores.
EXTENSIONS = {"image/jpeg": "jpeg", "image/png": "png", "image/webp": "webp"}
CONTENT_TYPES = {ext: ctype for ctype, ext in EXTENSIONS.items()}
_KEY = re.compile(r"[A-Za-z0-9_-]{32}\.(?:jpeg|png|webp)")


def new_key(content_type: str) -> str:
    """A fresh key for a blob of `content_type` (JPEG's extension for unknown types)."""
    return f"{secrets.token_urlsafe(24)}.{EXTENSIONS.get(content_type, 'jpeg')}"


def is_key(key: str) -> bool:
    """True when `key`, all of it, has the shape `new_key` makes."""
    return _KEY.fullmatch(key) is not None


def check_key(key: str) -> str:
    """`key` itself; NotFound for a key no store ever makes."""
    if not is_key(key):
        raise NotFound(f"image {key[:80]!r} not found")
    return key


def content_type_of(key: str) -> str:
    """The content type to serve for a stored key."""
    return CONTENT_TYPES.get(key.rsplit(".", 1)[-1], "application/octet-stream")


class BlobStore(Protocol):
    """Keeps image files by key and hands out URLs to them.

    A fault of the store itself (disk, bucket, network) is
    `sia.errors.ImageStoreUnavailable`, never a foreign exception.
    """

    @property
    def image_dir(self) -> Path | None:
        """The directory served at /images/{key} by the HTTP side server; else None."""
        ...

    async def put(self, data: bytes, content_type: str) -> str:
        """Store `data` and return its new, unguessable key."""
        ...

    async def get(self, key: str) -> bytes:
        """The bytes stored under `key`; raises sia.errors.NotFound if there are none."""
        ...

    def url(self, key: str) -> str:
        """A URL from which a client can download the blob."""
        ...

    async def delete(self, keys: Iterable[str]) -> None:
        """Remove the given blobs; missing ones are ignored."""
        ...

    async def sweep(self, older_than: datetime) -> int:
        """Remove every blob stored before `older_than`; return how many."""
        ...

    async def ready(self) -> bool:
        """Whether the store can take images now (readiness asks every few seconds)."""
        ...

    async def aclose(self) -> None:
        """Release resources; idempotent."""
        ...
