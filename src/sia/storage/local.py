"""The `local` blob store: image files in a directory, served by the HTTP side server.

Keys follow `sia.storage.base`'s scheme. File I/O runs in a thread. A disk
fault (unwritable directory, full or read-only filesystem) is
`ImageStoreUnavailable` naming the cause but never the path, and a failed
write leaves no `.part` file behind. `ready()` is what readiness asks: the
directory takes a small write and has `min_free_bytes` free.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import secrets
from typing import TYPE_CHECKING

from sia.errors import ImageStoreUnavailable, NotFound
from sia.logs import get_logger
from sia.storage.base import check_key, new_key

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from datetime import datetime
    from pathlib import Path

log = get_logger("sia.storage")

#: Free space below which the store reports itself unready: a few large images' worth.
MIN_FREE_BYTES = 64 << 20


def _unavailable(action: str, exc: OSError) -> ImageStoreUnavailable:
    """The error for a disk fault; the path stays in the log, out of the client's message."""
    cause = os.strerror(exc.errno) if exc.errno else type(exc).__name__
    name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    log.error("image_store_error", action=action, errno=name, path=exc.filename)
    return ImageStoreUnavailable(f"the image store cannot {action}: {cause}; retry later")


class LocalBlobStore:
    """Blobs as files under `root`, linked as `<base_url>/images/<key>`.

    `base_url` may be a function, read at each link: the app's HTTP port is
    known only once the server has bound it.
    """

    def __init__(
        self,
        root: Path,
        base_url: str | Callable[[], str],
        *,
        min_free_bytes: int = MIN_FREE_BYTES,
    ) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self._last_problem: str | None = None
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
        try:
            await asyncio.to_thread(self._write, self.root / key, data)
        except OSError as exc:
            raise _unavailable("write", exc) from exc
        return key

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        partial = path.with_name(path.name + ".part")
        try:
            partial.write_bytes(data)
            partial.replace(path)  # readers never see a half-written image
        except BaseException:
            partial.unlink(missing_ok=True)  # a full disk must not fill up with fragments
            raise

    def path(self, key: str) -> Path:
        """The file of `key`; raises NotFound for a key this store never makes."""
        return self.root / check_key(key)

    async def get(self, key: str) -> bytes:
        """The bytes stored under `key`."""
        path = self.path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise NotFound(f"image {key[:80]!r} not found") from None
        except OSError as exc:
            raise _unavailable("read", exc) from exc

    def url(self, key: str) -> str:
        """The HTTP side server's URL for `key`."""
        return f"{self.base_url}/images/{key}"

    async def delete(self, keys: Iterable[str]) -> None:
        """Remove the files of `keys`."""
        paths = [self.path(key) for key in keys]

        def unlink_all() -> None:
            for path in paths:
                path.unlink(missing_ok=True)

        try:
            await asyncio.to_thread(unlink_all)
        except OSError as exc:
            raise _unavailable("delete", exc) from exc

    async def sweep(self, older_than: datetime) -> int:
        """Remove files last written before `older_than`."""
        cutoff = older_than.timestamp()
        try:
            return await asyncio.to_thread(self._sweep, cutoff)
        except OSError as exc:
            raise _unavailable("delete", exc) from exc

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

    async def ready(self) -> bool:
        """Whether a small file can be written here and `min_free_bytes` are free."""
        return await asyncio.to_thread(self._ready)

    def _ready(self) -> bool:
        problem = self._problem()
        if problem != self._last_problem:  # once per change, not once per probe
            self._last_problem = problem
            if problem:
                log.warning("image_store_not_ready", problem=problem)
        return problem is None

    def _problem(self) -> str | None:
        # A name no key has, so /images never serves it and a crash leaves it to the sweep.
        probe = self.root / f".ready-{secrets.token_hex(8)}"
        try:
            try:  # written in place: a probe in flight is never taken for a stale `.part`
                probe.write_bytes(b"ready")
            finally:
                probe.unlink(missing_ok=True)
            free = os.statvfs(self.root)
        except OSError as exc:
            return os.strerror(exc.errno) if exc.errno else type(exc).__name__
        if (available := free.f_bavail * free.f_frsize) < self.min_free_bytes:
            return f"{available} bytes free, under the {self.min_free_bytes} wanted"
        return None

    async def aclose(self) -> None:
        """Nothing to release; present for the BlobStore protocol."""

    def __repr__(self) -> str:
        return f"LocalBlobStore(root={str(self.root)!r})"
