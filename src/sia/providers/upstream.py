"""What every HTTP provider shares: the pooled client, retries, and SSE parsing.

`Upstream` owns one aiohttp session per provider per process, sized for
thousands of concurrent generations. `call_with_retries` runs one attempt
after another with exponential backoff and full jitter, honouring
`Retry-After`, for retryable errors only and never past the deadline.
`SSEParser` turns a byte stream into server-sent events, tolerating
multi-line data, comments, keep-alives and lines of several megabytes.

aiohttp's exceptions never leave this module: a connection that fails
becomes `UpstreamUnavailable`.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import aiohttp

from sia.errors import Retryable, SiaError, UpstreamUnavailable
from sia.logs import get_logger

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator, Mapping

log = get_logger("sia.providers")

T = TypeVar("T")

#: Seconds to open a TCP connection before the attempt counts as failed.
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter: attempt n waits U(0, min(cap, base * 2**n))."""

    max_retries: int = 3
    base_delay: float = 0.5
    max_delay: float = 8.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt` (0-based)."""
        if retry_after is not None:
            return retry_after
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))  # noqa: S311 - jitter, not crypto


def retryable(exc: BaseException) -> bool:
    """True for an error another attempt may fix (rate limits and transient failures)."""
    return isinstance(exc, Retryable) and not exc.final


async def call_with_retries(
    attempt: Callable[[], Awaitable[T]], policy: RetryPolicy, *, deadline: float
) -> T:
    """Run `attempt` until it succeeds, fails for good, or the next wait passes `deadline`.

    `deadline` is on the `time.monotonic()` clock.
    """
    for number in range(policy.max_retries + 1):
        try:
            return await attempt()
        except SiaError as exc:
            if not retryable(exc) or number == policy.max_retries:
                raise
            delay = policy.delay(number, getattr(exc, "upstream_retry_after", None))
            if time.monotonic() + delay >= deadline:
                raise
            log.info(
                "upstream_retry",
                attempt=number + 1,
                delay_s=round(delay, 3),
                reason=exc.reason,
                upstream_code=exc.metadata.get("upstream_code", ""),
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover - the loop always returns or raises


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), if any."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Upstream:
    """A pooled aiohttp client for one provider's base URL."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str],
        max_connections: int,
        provider: str,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.provider = provider
        self._headers = dict(headers)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The shared session, created on first use inside the running loop."""
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                limit_per_host=0,
                ttl_dns_cache=300,
                keepalive_timeout=30,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT),
                raise_for_status=False,
                auto_decompress=True,
            )
        return self._session

    def post(self, path: str, body: bytes, headers: Mapping[str, str]) -> RequestContext:
        """A POST of a JSON body; use as `async with upstream.post(...) as resp:`."""
        return RequestContext(self, path, body, headers)

    async def aclose(self) -> None:
        """Close the pooled connections; idempotent."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def __repr__(self) -> str:
        return f"Upstream(provider={self.provider!r}, base_url={self.base_url!r})"


class RequestContext:
    """Opens one POST and translates connection failures into UpstreamUnavailable."""

    def __init__(
        self, upstream: Upstream, path: str, body: bytes, headers: Mapping[str, str]
    ) -> None:
        self._upstream = upstream
        self._path = path
        self._body = body
        self._headers = headers
        self._response: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        up = self._upstream
        try:
            self._response = await up.session.post(
                up.base_url + self._path,
                data=self._body,
                headers={"Content-Type": "application/json", **self._headers},
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise connection_failed(up.provider, exc) from exc
        return self._response

    async def __aexit__(self, *exc_info: object) -> None:
        if self._response is not None:
            self._response.release()


def connection_failed(provider: str, exc: BaseException) -> UpstreamUnavailable:
    """The error for a connection that could not be made or broke mid-answer."""
    kind = type(exc).__name__
    return UpstreamUnavailable(
        f"the {provider} provider could not be reached ({kind})",
        metadata={"provider": provider, "upstream_code": kind},
    )


async def read_body(resp: aiohttp.ClientResponse, provider: str) -> bytes:
    """The whole response body; a broken connection becomes UpstreamUnavailable."""
    try:
        return await resp.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise connection_failed(provider, exc) from exc


@dataclass(slots=True)
class ServerSentEvent:
    """One event of a text/event-stream."""

    event: str = "message"
    data: str = ""


@dataclass(slots=True)
class SSEParser:
    """Incremental text/event-stream parser (WHATWG rules, bytes in, events out).

    Lines may end in LF, CRLF or CR; `data:` lines of one event are joined with
    LF; comments (`:`) and unknown fields are ignored; a blank line dispatches.
    """

    _buffer: bytearray = field(default_factory=bytearray)
    _scan_from: int = 0
    _event: str = ""
    _data: list[str] = field(default_factory=list)

    def feed(self, chunk: bytes) -> Iterator[ServerSentEvent]:
        """Consume `chunk` and yield every event it completes."""
        buf = self._buffer
        buf += chunk
        start = 0
        while True:
            end = buf.find(b"\n", max(start, self._scan_from))
            if end < 0:
                self._scan_from = len(buf)
                break
            line = bytes(buf[start:end]).rstrip(b"\r")
            start = end + 1
            self._scan_from = start
            if (event := self._line(line.decode("utf-8", "replace"))) is not None:
                yield event
        if start:
            del buf[:start]
            self._scan_from -= start

    def close(self) -> Iterator[ServerSentEvent]:
        """Flush an event left without its final blank line."""
        if self._buffer:
            line = bytes(self._buffer).rstrip(b"\r").decode("utf-8", "replace")
            self._buffer.clear()
            if (event := self._line(line)) is not None:
                yield event
        if (event := self._line("")) is not None:
            yield event

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            if not self._data and not self._event:
                return None
            event = ServerSentEvent(self._event or "message", "\n".join(self._data))
            self._event, self._data = "", []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None
