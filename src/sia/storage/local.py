"""The `local` blob store: image files in a directory, served by the HTTP side server.

Keys follow `sia.storage.base`'s scheme. File I/O runs in a thread. A disk
fault (unwritable directory, full or read-only filesystem) is
`ImageStoreUnavailable` naming the cause but never the path, and a failed
write leaves no `.part` file behind. `ready()` is what readiness asks: the
directory takes a small write and has `min_free_bytes` free.

Links are signed and expire (`ImageLinks`):
`<base>/images/<key>?expires=<unix seconds>&signature=<HMAC-SHA256>`, the
HTTP side server checking both. The secret is IMAGE_URL_SECRET, else one made
once and kept in `$DATA_DIR/image-url-secret` (mode 0600), so links outlive a
restart; replicas serving each other's links need the same IMAGE_URL_SECRET.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import functools
import hashlib
import hmac
import math
import os
import re
import secrets
import time
from typing import TYPE_CHECKING

from sia.errors import ConfigError, ImageStoreUnavailable, NotFound
from sia.logs import get_logger
from sia.storage.base import check_key, new_key

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from datetime import datetime
    from pathlib import Path

    from sia.config import Settings

log = get_logger("sia.storage")

#: Free space below which the store reports itself unready: a few large images' worth.
MIN_FREE_BYTES = 64 << 20
#: The file in DATA_DIR that keeps the generated link secret when IMAGE_URL_SECRET is unset.
SECRET_FILE = "image-url-secret"  # noqa: S105 - a file name, not a secret
#: Characters of a generated secret (32 random bytes, base64url); fewer means a damaged file.
_SECRET_CHARS = 43
_EXPIRES = re.compile(r"[0-9]{1,12}")


class ImageLinks:
    """Signs image links so that they expire, and checks them.

    A link carries `expires` (unix seconds, now + `ttl` when the link is made)
    and `signature`: HMAC-SHA256 with the secret over `<key>\\n<expires>`,
    base64url without padding. Altering either, or the key, breaks it.
    """

    def __init__(self, secret: bytes, ttl: float, *, clock: Callable[[], float] = time.time):
        if not secret:
            raise ValueError("an empty secret signs nothing")
        self._secret = secret
        self.ttl = ttl
        self._clock = clock

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageLinks:
        """IMAGE_URL_SECRET (else DATA_DIR's secret file, made if missing) and the links' TTL.

        ConfigError when the file cannot be read or made.
        """
        if settings.image_url_secret is not None:
            secret = settings.image_url_secret.get_secret_value().encode()
        else:
            secret = _stored_secret(settings.data_dir / SECRET_FILE)
        return cls(secret, settings.image_link_ttl)

    def signature(self, key: str, expires: int) -> str:
        """The signature of `key` valid until `expires`."""
        digest = hmac.new(self._secret, f"{key}\n{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def query(self, key: str) -> str:
        """The query string of a new link to `key`, valid for `ttl` seconds."""
        expires = math.ceil(self._clock() + self.ttl)
        return f"expires={expires}&signature={self.signature(key, expires)}"

    def seconds_left(self, key: str, expires: str | None, signature: str | None) -> int | None:
        """Seconds a link stays valid; None when unsigned, altered or expired."""
        if expires is None or signature is None or not _EXPIRES.fullmatch(expires):
            return None
        expected = self.signature(key, int(expires)).encode()
        if not hmac.compare_digest(expected, signature.encode(errors="replace")):
            return None
        left = int(expires) - self._clock()
        return math.floor(left) if left >= 0 else None

    def __repr__(self) -> str:
        return f"ImageLinks(ttl={self.ttl})"


def _stored_secret(path: Path) -> bytes:
    """The secret kept in `path`, made first when there is none (mode 0600)."""
    try:
        if not path.exists():
            _make_secret(path)
        text = path.read_text("ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        cause = _describe(exc)
        raise ConfigError(
            f"IMAGE_URL_SECRET: not set, and the link secret in {path} cannot be kept: "
            f"{cause}; set IMAGE_URL_SECRET or make DATA_DIR writable"
        ) from None
    if len(text) < _SECRET_CHARS:
        raise ConfigError(
            f"IMAGE_URL_SECRET: not set, and {path} holds no whole secret; delete it to "
            "make a new one (links handed out so far stop working) or set IMAGE_URL_SECRET"
        )
    return text.encode("ascii")


def _make_secret(path: Path) -> None:
    """Write a new secret whole, under its final name only once complete.

    A hard link never replaces: when two processes start at once, the first
    one's secret wins and the other reads it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(secrets.token_urlsafe(32) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.link(partial, path)
    except FileExistsError:
        return  # another process made it first
    finally:
        partial.unlink(missing_ok=True)
    log.info("image_link_secret_created", path=str(path))


def _describe(exc: OSError | UnicodeDecodeError) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "not text"
    return os.strerror(exc.errno) if exc.errno else type(exc).__name__


def _unavailable(action: str, exc: OSError) -> ImageStoreUnavailable:
    """The error for a disk fault; the path stays in the log, out of the client's message."""
    cause = os.strerror(exc.errno) if exc.errno else type(exc).__name__
    name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    log.error("image_store_error", action=action, errno=name, path=exc.filename)
    return ImageStoreUnavailable(f"the image store cannot {action}: {cause}; retry later")


class LocalBlobStore:
    """Blobs as files under `root`, linked as `<base_url>/images/<key>`.

    `base_url` may be a function, read at each link: the app's HTTP port is
    known only once the server has bound it. With `links` every link is
    signed and expires (give the HTTP side server the same `ImageLinks` to
    check them); without, links are bare keys.
    """

    def __init__(
        self,
        root: Path,
        base_url: str | Callable[[], str],
        *,
        min_free_bytes: int = MIN_FREE_BYTES,
        links: ImageLinks | None = None,
    ) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self.links = links
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
        """The HTTP side server's URL for `key`, signed when the store has `links`."""
        url = f"{self.base_url}/images/{key}"
        return url if self.links is None else f"{url}?{self.links.query(key)}"

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
