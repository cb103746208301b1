"""What every HTTP provider shares: the pooled client, retries, SSE and base64 images.

`HttpProvider` is the base of the Ark and OpenAI providers: it owns their
`Upstream`, runs each generation as attempts under `call_with_retries`, and
reports a misconfigured provider (refused key, missing model) to readiness
until a later call succeeds. A subclass says how to build its request body
and how to read one attempt's answer.

`Upstream` owns one aiohttp session per provider per process, sized for
thousands of concurrent generations: `fetch` reads a whole answer, `stream`
one that arrives as server-sent events. `call_with_retries` runs one attempt
after another with exponential backoff and full jitter, honouring
`Retry-After`, for retryable errors only and never past the deadline.
`SSEParser` turns a byte stream into server-sent events, tolerating
multi-line data, comments, keep-alives and lines of several megabytes.
`decode_b64_image` reads a `b64_json` image, on a SIMD decoder when it can.

aiohttp's exceptions never leave this module: a connection that fails
becomes `UpstreamUnavailable`.
"""

from __future__ import annotations

import abc
import asyncio
import binascii
import email.utils
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import aiohttp
import pybase64
import structlog
import yarl

from sia.domain import new_request_id
from sia.errors import ProviderMisconfigured, Retryable, SiaError, UpstreamUnavailable
from sia.logs import REQUEST_ID, get_logger

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping

    from sia.domain import GenerationRequest, GenerationResult

log = get_logger("sia.providers")

T = TypeVar("T")

#: Seconds to open a TCP connection before the attempt counts as failed.
CONNECT_TIMEOUT = 10.0
#: Seconds an idle pooled connection is kept open (aiohttp's default). The pool closes
#: idle connections 15-30 s after their last use and the next heap trim returns their
#: memory: after a 2,000-call burst, RSS is back within 20 % of idle in 30-50 s (bench
#: target 5c); with 30 s it took up to 80 s.
KEEPALIVE_TIMEOUT = 15.0
#: The User-Agent of every upstream request.
USER_AGENT = "sia-image-service"


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
    attempt: Callable[..., Awaitable[T]], *args: Any, policy: RetryPolicy, deadline: float
) -> T:
    """Run `attempt(*args)` until it succeeds, fails for good, or the next wait passes `deadline`.

    `deadline` is on the `time.monotonic()` clock.
    """
    for number in range(policy.max_retries + 1):
        try:
            return await attempt(*args)
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
    """One provider's pooled aiohttp client for its base URL."""

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
        self._headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, **headers}
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, yarl.URL] = {}  # parsed once per path, not per call

    @property
    def session(self) -> aiohttp.ClientSession:
        """The shared session, created on first use inside the running loop."""
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                limit_per_host=0,
                ttl_dns_cache=300,
                keepalive_timeout=KEEPALIVE_TIMEOUT,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT),
                raise_for_status=False,
                cookie_jar=aiohttp.DummyCookieJar(),  # an API needs no cookies, nor their cost
            )
        return self._session

    def _url(self, path: str) -> yarl.URL:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = yarl.URL(self.base_url + path)
        return url

    async def fetch(self, path: str, body: bytes, headers: Mapping[str, str]) -> Answer:
        """POST a JSON body and read the whole answer; failures are UpstreamUnavailable."""
        async with self.stream(path, body, headers) as answer:
            return Answer(answer.status, answer.headers, await answer.read())

    def stream(self, path: str, body: bytes, headers: Mapping[str, str]) -> Exchange:
        """POST a JSON body and read the answer as it arrives (server-sent events).

        `async with upstream.stream(...) as answer:` leaves the connection
        closed or back in the pool; failures are UpstreamUnavailable.
        """
        return Exchange(self.session, self._url(path), body, headers, self.provider)

    async def aclose(self) -> None:
        """Close the pooled connections; idempotent."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def __repr__(self) -> str:
        return f"Upstream(provider={self.provider!r}, base_url={self.base_url!r})"


class Exchange:
    """One request and its answer: `async with` sends it and releases the connection.

    A class rather than an @asynccontextmanager generator: it runs on every
    upstream call, and costs a third as much.
    """

    __slots__ = ("_body", "_headers", "_provider", "_response", "_session", "_url")

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: yarl.URL,
        body: bytes,
        headers: Mapping[str, str],
        provider: str,
    ) -> None:
        self._session = session
        self._url = url
        self._body = body
        self._headers = headers
        self._provider = provider
        self._response: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> StreamedAnswer:
        try:
            self._response = await self._session.post(
                self._url, data=self._body, headers=self._headers
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise connection_failed(self._provider, exc) from exc
        return StreamedAnswer(self._response, self._provider)

    async def __aexit__(self, *_: object) -> None:
        if self._response is not None:
            self._response.release()


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole HTTP answer: status, header fields (case-insensitive) and the body."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        """The media type, lower case, without parameters ("" when absent)."""
        return media_type(self.headers)


class StreamedAnswer:
    """An answer whose body is read chunk by chunk."""

    def __init__(self, response: aiohttp.ClientResponse, provider: str) -> None:
        self._response = response
        self._provider = provider
        self.status = response.status
        self.headers: Mapping[str, str] = response.headers

    @property
    def content_type(self) -> str:
        """The media type, lower case, without parameters ("" when absent)."""
        return media_type(self.headers)

    async def read(self) -> bytes:
        """The rest of the body."""
        try:
            return await self._response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise connection_failed(self._provider, exc) from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's chunks as they arrive."""
        content = self._response.content
        while True:
            try:
                chunk = await content.readany()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise connection_failed(self._provider, exc) from exc
            if not chunk:
                return
            yield chunk


def decode_b64_image(value: str) -> bytes:
    """The bytes of a `b64_json` image; binascii.Error (a ValueError) when it is not base64.

    Canonical base64 takes pybase64's SIMD decoder (a 4 MiB image in 0.3 ms
    instead of binascii's 11 ms); anything else, such as base64 broken into
    lines, takes the standard library's lenient decoder, which skips
    characters outside the alphabet.
    """
    try:
        return pybase64.b64decode(value, validate=True)
    except binascii.Error:
        return binascii.a2b_base64(value)


def media_type(headers: Mapping[str, str]) -> str:
    """The Content-Type's media type, lower case, without parameters ("" when absent)."""
    return headers.get("content-type", "").partition(";")[0].strip().lower()


def connection_failed(provider: str, exc: BaseException) -> UpstreamUnavailable:
    """The error for a connection that could not be made or broke mid-answer."""
    kind = type(exc).__name__
    return UpstreamUnavailable(
        f"the {provider} provider could not be reached ({kind})",
        metadata={"provider": provider, "upstream_code": kind},
    )


class HttpProvider(abc.ABC):
    """An ImageProvider over HTTP with a bearer key (see the module docstring)."""

    #: Short name shown in health answers, metrics and errors.
    provider: ClassVar[str]

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        max_retries: int = 3,
        max_connections: int = 4096,
        on_health: Callable[[str | None], None] | None = None,
    ) -> None:
        self._upstream = Upstream(
            base_url,
            headers={"Authorization": f"Bearer {api_key}"},
            max_connections=max_connections,
            provider=self.provider,
        )
        self._secret = api_key
        self._policy = RetryPolicy(max_retries=max_retries)
        self._on_health = on_health or (lambda _: None)

    @property
    def name(self) -> str:
        """Short name shown in health answers and metrics."""
        return self.provider

    @abc.abstractmethod
    def encode_request(self, request: GenerationRequest) -> bytes:
        """The JSON body of `request`, as the provider's API expects it."""

    @abc.abstractmethod
    async def _attempt(
        self, request: GenerationRequest, body: bytes, headers: Mapping[str, str]
    ) -> GenerationResult:
        """One call of the API; errors are the error tree's."""

    async def generate(self, request: GenerationRequest, *, timeout: float) -> GenerationResult:
        """Generate `request`, retrying transient failures until `timeout` runs out."""
        body = self.encode_request(request)
        headers = {"X-Client-Request-Id": client_request_id()}
        try:
            result = await call_with_retries(
                self._attempt,
                request,
                body,
                headers,
                policy=self._policy,
                deadline=time.monotonic() + timeout,
            )
        except ProviderMisconfigured as exc:
            log.warning(
                "provider_misconfigured",
                provider=self.provider,
                upstream_code=exc.metadata.get("upstream_code", ""),
                upstream_request_id=exc.metadata.get("upstream_request_id", ""),
            )
            self._on_health(exc.message)
            raise
        self._on_health(None)
        return result

    async def aclose(self) -> None:
        """Close the pooled connections; idempotent."""
        await self._upstream.aclose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self._upstream.base_url!r})"


def client_request_id() -> str:
    """Our request or task id for X-Client-Request-Id, so a call can be traced upstream.

    Printable ASCII of at most 512 characters (OpenAI's limit); anything else,
    or no id bound, gets a fresh one.
    """
    value = REQUEST_ID.get() or str(structlog.contextvars.get_contextvars().get("task_id") or "")
    if value and len(value) <= 512 and value.isascii() and value.isprintable():
        return value
    return new_request_id()


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
