"""The `local` blob store: image files in a directory, served by the HTTP side server.

Keys are random and unguessable (`<32 url-safe chars>.<ext>`), so the URL
itself is the credential, like a presigned URL. File I/O runs in a thread.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from typing import TYPE_CHECKING

from sia.errors import NotFound

if TYPE_CHECKING:
    from collections.abc import Iterable
    from datetime import datetime
    from pathlib import Path

#: File extension for each content type the service stores.
EXTENSIONS = {"image/jpeg": "jpeg", "image/png": "png", "image/webp": "webp"}
CONTENT_TYPES = {ext: ctype for ctype, ext in EXTENSIONS.items()}
_KEY = re.compile(r"[A-Za-z0-9_-]{32}\.(?:jpeg|png|webp)")


class LocalBlobStore:
    """Blobs as files under `root`, linked as `<base_url>/images/<key>`."""

    def __init__(self, root: Path, base_url: str) -> None:
        self.root = root
        self.base_url = base_url.rstrip("/")
        root.mkdir(parents=True, exist_ok=True)

    async def put(self, data: bytes, content_type: str) -> str:
        """Write `data` to a new file and return its key."""
        key = f"{secrets.token_urlsafe(24)}.{EXTENSIONS.get(content_type, 'jpeg')}"
        await asyncio.to_thread(self._write, self.root / key, data)
        return key

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        partial = path.with_suffix(".part")
        partial.write_bytes(data)
        partial.replace(path)  # readers never see a half-written image

    def path(self, key: str) -> Path:
        """The file of `key`; raises NotFound for a key this store never makes."""
        if not _KEY.fullmatch(key):
            raise NotFound(f"image {key!r} not found")
        return self.root / key

    async def get(self, key: str) -> bytes:
        """The bytes stored under `key`."""
        try:
            return await asyncio.to_thread(self.path(key).read_bytes)
        except FileNotFoundError:
            raise NotFound(f"image {key!r} not found") from None

    def url(self, key: str) -> str:
        """The HTTP side server's URL for `key`."""
        return f"{self.base_url}/images/{key}"

    async def delete(self, keys: Iterable[str]) -> None:
        """Remove the files of `keys`."""
        paths = [self.path(key) for key in keys]

        def unlink_all() -> None:
            for path in paths:
                path.unlink(missing_ok=True)

        await asyncio.to_thread(unlink_all)

    async def sweep(self, older_than: datetime) -> int:
        """Remove files last written before `older_than`."""
        cutoff = older_than.timestamp()
        return await asyncio.to_thread(self._sweep, cutoff)

    def _sweep(self, cutoff: float) -> int:
        removed = 0
        for path in self.root.iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    async def aclose(self) -> None:
        """Nothing to release; present for the BlobStore protocol."""

    def __repr__(self) -> str:
        return f"LocalBlobStore(root={str(self.root)!r})"


def content_type_of(key: str) -> str:
    """The content type to serve for a stored key."""
    return CONTENT_TYPES.get(key.rsplit(".", 1)[-1], "application/octet-stream")
