"""The blob-store seam: where generated images are kept so their URLs last."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Iterable
    from datetime import datetime


class BlobStore(Protocol):
    """Keeps image files by key and hands out URLs to them."""

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

    async def aclose(self) -> None:
        """Release resources; idempotent."""
        ...
