"""The `local` blob store: image files in a directory, served by the HTTP side server.

Keys follow `sia.storage.base`'s scheme. File I/O runs in a thread.
"""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING

from sia.errors import NotFound
from sia.storage.base import check_key, new_key

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from datetime import datetime
    from pathlib import Path


class LocalBlobStore:
    """Blobs as files under `root`, linked as `<base_url>/images/<key>`.

    `base_url` may be a function, read at each link: the app's HTTP port is
    known only once the server has bound it.
    """

    def __init__(self, root: Path, base_url: str | Callable[[], str]) -> None:
        self.root = root
        self._base_url: Callable[[], str] = (
            functools.partial(base_url.rstrip, "/") if isinstance(base_url, str) else base_url
        )
        root.mkdir(parents=True, exist_ok=True)

    @property
    def image_dir(self) -> Path:
        """The directory the HTTP side server serves at /images/{key}."""
        return self.root

    @property
    def base_url(self) -> str:
        """Where links to this store's images start (no trailing slash)."""
        return self._base_url()

    async def put(self, data: bytes, content_type: str) -> str:
        """Write `data` to a new file and return its key."""
        key = new_key(content_type)
        await asyncio.to_thread(self._write, self.root / key, data)
        return key

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        partial = path.with_suffix(".part")
        partial.write_bytes(data)
        partial.replace(path)  # readers never see a half-written image

    def path(self, key: str) -> Path:
        """The file of `key`; raises NotFound for a key this store never makes."""
        return self.root / check_key(key)

    async def get(self, key: str) -> bytes:
        """The bytes stored under `key`."""
        try:
            return await asyncio.to_thread(self.path(key).read_bytes)
        except FileNotFoundError:
            raise NotFound(f"image {key[:80]!r} not found") from None

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
