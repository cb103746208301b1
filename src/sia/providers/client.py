"""The HTTP client seam of the providers, and its real implementation on aiohttp.

`HttpClient` is what a provider needs from HTTP: POST a JSON body and read the
answer whole (`fetch`) or as it arrives (`stream`). `Upstream` is the real one:
one pooled aiohttp session per provider per process, sized for thousands of
concurrent generations. Tests hand a provider an in-process `HttpClient`
instead, so a provider test needs no socket.

aiohttp's exceptions never leave this module: a connection that cannot be
made, or breaks mid-answer, becomes `UpstreamUnavailable`. One that breaks
after a 2xx status arrived is final (never retried) and logged at error as
`upstream_answer_lost`: the upstream accepted, and likely billed, that
generation, so another attempt would pay for it twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import aiohttp
import yarl

from sia.errors import UpstreamUnavailable
from sia.logs import get_logger

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping
    from contextlib import AbstractAsyncContextManager

log = get_logger("sia.providers")

#: Seconds to open a TCP connection before the attempt counts as failed.
CONNECT_TIMEOUT = 10.0
#: Seconds an idle pooled connection is kept open (aiohttp's default): short enough
#: that the memory of a burst's connections returns soon after it, see bench/README.md.
KEEPALIVE_TIMEOUT = 15.0
#: The User-Agent of every upstream request.
USER_AGENT = "sia-image-service"


class HttpAnswer(Protocol):
    """An answer whose body is read on demand, whole or chunk by chunk."""

    @property
    def status(self) -> int:
        """The HTTP status code."""
        ...

    @property
    def headers(self) -> Mapping[str, str]:
        """The header fields; lookups ignore case."""
        ...

    @property
    def content_type(self) -> str:
        """The media type, lower case, without parameters ("" when absent)."""
        ...

    async def read(self) -> bytes:
        """The rest of the body."""
        ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body's chunks as they arrive."""
        ...


class HttpClient(Protocol):
    """What a provider needs from HTTP; failures are `UpstreamUnavailable`."""

    def stream(
        self, path: str, body: bytes, headers: Mapping[str, str]
    ) -> AbstractAsyncContextManager[HttpAnswer]:
        """POST a JSON body to `path`; the answer is read inside `async with`."""
        ...

    async def fetch(self, path: str, body: bytes, headers: Mapping[str, str]) -> Answer:
        """POST a JSON body to `path` and read the whole answer."""
        ...

    async def aclose(self) -> None:
        """Release the connections; idempotent."""
        ...


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


class Upstream:
    """One provider's pooled aiohttp client for its base URL (an `HttpClient`)."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        max_connections: int,
        provider: str,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.provider = provider
        self._headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            **(headers or {}),
        }
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
    upstream call, and a class is the cheaper of the two.
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


class StreamedAnswer:
    """An aiohttp answer whose body is read chunk by chunk (an `HttpAnswer`)."""

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
            raise self._answer_broken(exc) from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's chunks as they arrive."""
        content = self._response.content
        while True:
            try:
                chunk = await content.readany()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise self._answer_broken(exc) from exc
            if not chunk:
                return
            yield chunk

    def _answer_broken(self, exc: BaseException) -> UpstreamUnavailable:
        return answer_broken(self._provider, self.status, exc)


def media_type(headers: Mapping[str, str]) -> str:
    """The Content-Type's media type, lower case, without parameters ("" when absent)."""
    return headers.get("content-type", "").partition(";")[0].strip().lower()


def answer_broken(provider: str, status: int, exc: BaseException) -> UpstreamUnavailable:
    """The error for a body cut off; final after a 2xx, which the upstream likely billed."""
    if not 200 <= status < 300:
        return connection_failed(provider, exc)
    kind = type(exc).__name__
    log.error("upstream_answer_lost", provider=provider, status=status, error=kind)
    error = UpstreamUnavailable(
        f"the {provider} provider's answer was lost in transit ({kind}); "
        "not retried, as the upstream may have generated and billed it",
        metadata={"provider": provider, "upstream_code": kind, "answer_lost": "true"},
    )
    error.final = True
    return error


def connection_failed(provider: str, exc: BaseException) -> UpstreamUnavailable:
    """The error for a connection that could not be made or broke mid-answer."""
    kind = type(exc).__name__
    return UpstreamUnavailable(
        f"the {provider} provider could not be reached ({kind})",
        metadata={"provider": provider, "upstream_code": kind},
    )
