"""One webhook attempt on the wire: a POST, its answer read no further than needed.

`Sender` owns the aiohttp session every attempt shares. Its connector
resolves names through `urls.VettedResolver`, so it connects only to
addresses that passed the SSRF rules; redirects are never followed (a 3xx is
the answer); the whole attempt (connect, send, answer) is bounded by
WEBHOOK_TIMEOUT; no proxy from the environment, no cookies, no automatic
decompression. The answer's body is read only when the status is not 2xx,
and then at most `BODY_LIMIT` bytes of it, for the log; what the receiver
sends beyond is never buffered (the connection is closed instead of reused).

aiohttp's exceptions never leave this module: `post` always returns an
`Answer`, whose `error` names the kind of failure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

import aiohttp

from sia.providers.retry import parse_retry_after
from sia.webhooks.urls import RefusedAddress, VettedResolver

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import TracebackType

    from yarl import URL

#: The most bytes of a receiver's answer that are read (and logged).
BODY_LIMIT = 1024
USER_AGENT = "sia-webhooks/1"

# Answer.error kinds: the first two are retried, the rest are not.
TIMEOUT = "timeout"
CONNECTION = "connection"
REFUSED_ADDRESS = "refused_address"
INVALID_URL = "invalid_url"


@dataclass(frozen=True, slots=True)
class Answer:
    """What one attempt got: an HTTP status, or the kind of failure that stopped it."""

    status: int | None = None  # None when no response arrived
    error: str = ""  # "" with a status; else TIMEOUT, CONNECTION, REFUSED_ADDRESS, INVALID_URL
    detail: str = ""  # the first BODY_LIMIT bytes of the answer, or what went wrong
    retry_after: float | None = None  # the receiver's Retry-After, in seconds
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True for a 2xx answer: the receiver has the event."""
        return self.status is not None and 200 <= self.status < 300

    @property
    def retryable(self) -> bool:
        """True when another attempt may succeed: 429, 5xx, a timeout or a connection failure."""
        if self.status is not None:
            return self.status == 429 or self.status >= 500
        return self.error in (TIMEOUT, CONNECTION)


class Sender:
    """POSTs signed events; `start()` (or `async with`) before `post`.

    Pass `client` to use a session of your own (tests, a proxy set-up): it is
    then not closed here, and the address rules at delivery are that
    session's business.
    """

    def __init__(
        self,
        *,
        timeout: float,
        allow_private: bool,
        concurrency: int = 8,
        client: aiohttp.ClientSession | None = None,
    ) -> None:
        self.timeout = timeout
        self.allow_private = allow_private
        self.concurrency = concurrency
        self._client = client
        self._owned = client is None

    async def start(self) -> None:
        """Create the session, unless one was given; on the running loop."""
        if self._client is not None:
            return
        connector = aiohttp.TCPConnector(
            resolver=VettedResolver(allow_private=self.allow_private),
            limit=self.concurrency,
            ttl_dns_cache=10,
        )
        self._client = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.timeout, connect=self.timeout),
            headers={"User-Agent": USER_AGENT},
            skip_auto_headers=("Accept-Encoding",),  # an answer is read raw, for the log
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            trust_env=False,
        )

    async def post(self, url: URL, body: bytes, headers: Mapping[str, str]) -> Answer:
        """One POST of `body` to `url`; never raises for what the network or receiver does."""
        client = self._client
        if client is None:
            raise RuntimeError("Sender.start() has not been called, or it is closed")
        started = time.monotonic()
        try:
            async with client.post(
                url, data=body, headers=dict(headers), allow_redirects=False
            ) as response:
                status = response.status
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                detail = "" if 200 <= status < 300 else await _head(response)
        except RefusedAddress as exc:
            return _failure(REFUSED_ADDRESS, str(exc), started)
        except aiohttp.InvalidURL as exc:  # its text is the URL, token and all: not logged
            return _failure(INVALID_URL, type(exc).__name__, started)
        except TimeoutError:
            return _failure(TIMEOUT, f"no answer within {self.timeout:g} s", started)
        except (aiohttp.ClientError, OSError) as exc:
            return _failure(CONNECTION, f"{type(exc).__name__}: {exc}"[:BODY_LIMIT], started)
        return Answer(
            status=status,
            detail=detail,
            retry_after=retry_after,
            seconds=time.monotonic() - started,
        )

    async def aclose(self) -> None:
        """Close the session if it is this sender's own; idempotent."""
        client, self._client = self._client, None
        if client is not None and self._owned:
            await client.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


async def _head(response: aiohttp.ClientResponse) -> str:
    """At most BODY_LIMIT bytes of the answer's body, as text; "" if reading it fails.

    The status has decided the attempt already, so a body that is slow or
    broken does not change it.
    """
    chunks: list[bytes] = []
    size = 0
    try:
        while size < BODY_LIMIT:
            chunk = await response.content.read(BODY_LIMIT - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except (TimeoutError, aiohttp.ClientError, OSError):
        pass
    if size >= BODY_LIMIT:
        response.close()  # the rest is never read: drop the connection rather than drain it
    return b"".join(chunks).decode("utf-8", "replace")


def _failure(kind: str, detail: str, started: float) -> Answer:
    return Answer(error=kind, detail=detail, seconds=time.monotonic() - started)
