"""`sia.providers.client.Upstream` against a scripted loopback server."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
from structlog.testing import capture_logs

from sia.domain import GenerationRequest
from sia.errors import UpstreamUnavailable, retryable
from sia.providers.ark import ArkProvider
from sia.providers.client import Upstream
from tests.waiting import until

#: The request's bytes -> the answer; None: hang up without one; (answer, True): then hang up.
Reply = Callable[[bytes], bytes | tuple[bytes, bool] | None]


@asynccontextmanager
async def scripted(*replies: Reply) -> AsyncIterator[tuple[str, list[bytes], list[int]]]:
    """A server answering each request, across connections, with the next of `replies`.

    Yields its base URL, the requests received, and how many requests each
    connection carried (to see reuse).
    """
    queue = list(replies)
    received: list[bytes] = []
    per_connection: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        per_connection.append(0)
        index = len(per_connection) - 1
        try:
            while queue:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                received.append(request)
                per_connection[index] += 1
                answer = queue.pop(0)(request)
                if answer is None:
                    break
                data, close = answer if isinstance(answer, tuple) else (answer, False)
                writer.write(data)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/base", received, per_connection
    finally:
        server.close()
        await server.wait_closed()


def ok(body: bytes, *extra: str) -> Reply:
    fields = "".join(f"{line}\r\n" for line in extra)
    answer = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{fields}\r\n".encode() + body
    return lambda _: answer


def upstream(base_url: str, **kw: int) -> Upstream:
    return Upstream(
        base_url,
        headers={"Authorization": "Bearer sk-secret"},
        max_connections=kw.get("max_connections", 16),
        provider="test",
    )


async def test_fetch_sends_json_post_and_reuses_the_connection() -> None:
    replies = (ok(b'{"a":1}', "X-Request-Id: r1", "Content-Type: application/json"), ok(b"{}"))
    async with scripted(*replies) as (url, received, per_connection):
        client = upstream(url)
        try:
            first = await client.fetch("/gen", b'{"p":1}', {"X-Client-Request-Id": "c1"})
            second = await client.fetch("/gen", b"{}", {})
        finally:
            await client.aclose()
    assert (first.status, first.body, second.body) == (200, b'{"a":1}', b"{}")
    assert first.headers["x-request-id"] == first.headers["X-Request-Id"] == "r1"
    assert first.content_type == "application/json"
    request = received[0].lower()
    assert request.startswith(b"post /base/gen http/1.1\r\n")
    for field in (
        b"authorization: bearer sk-secret",
        b"content-type: application/json",
        b"x-client-request-id: c1",
        b"user-agent: sia-image-service",
    ):
        assert field in request
    assert received[0].endswith(b'\r\n\r\n{"p":1}')
    assert per_connection == [2]  # kept alive


async def test_fetch_decodes_gzip_and_chunked_bodies() -> None:
    packed = gzip.compress(b'{"zipped":true}')
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Encoding: gzip\r\n\r\n"
        + f"{len(packed):x}\r\n".encode()
        + packed
        + b"\r\n0\r\n\r\n"
    )
    async with scripted(lambda _: chunked) as (url, _, _):
        client = upstream(url)
        try:
            answer = await client.fetch("/gen", b"{}", {})
        finally:
            await client.aclose()
    assert answer.body == b'{"zipped":true}'


async def test_stream_yields_chunks_as_they_arrive() -> None:
    events = [b"data: one\n\n", b"data: two\n\n"]
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    answer += b"".join(f"{len(e):x}\r\n".encode() + e + b"\r\n" for e in events) + b"0\r\n\r\n"
    async with scripted(lambda _: answer) as (url, _, _):
        client = upstream(url)
        try:
            async with client.stream("/gen", b"{}", {}) as streamed:
                assert (streamed.status, streamed.content_type) == (200, "text/event-stream")
                body = b"".join([chunk async for chunk in streamed.chunks()])
        finally:
            await client.aclose()
    assert body == b"".join(events)


async def test_failures_become_upstream_unavailable() -> None:
    async with scripted(lambda _: None) as (url, _, _):  # hangs up without an answer
        client = upstream(url)
        try:
            with pytest.raises(UpstreamUnavailable) as hung_up:
                await client.fetch("/gen", b"{}", {})
        finally:
            await client.aclose()
    assert hung_up.value.metadata["provider"] == "test"
    assert "sk-secret" not in str(hung_up.value)

    refused = upstream(url)  # the server is gone: nothing listens on its port
    try:
        with pytest.raises(UpstreamUnavailable, match="could not be reached"):
            await refused.fetch("/gen", b"{}", {})
        with pytest.raises(UpstreamUnavailable):
            async with refused.stream("/gen", b"{}", {}):
                pass
    finally:
        await refused.aclose()


async def test_a_broken_stream_becomes_upstream_unavailable() -> None:
    partial = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"b\r\ndata: one\n\n\r\n",
        True,
    )
    async with scripted(lambda _: partial) as (url, _, _):
        client = upstream(url)
        try:
            async with client.stream("/gen", b"{}", {}) as streamed:
                chunks = streamed.chunks()
                assert await anext(chunks) == b"data: one\n\n"
                with pytest.raises(UpstreamUnavailable):
                    await anext(chunks)
        finally:
            await client.aclose()


async def test_cancelling_a_call_closes_its_connection() -> None:
    closed = asyncio.Event()
    arrived = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        arrived.set()
        await reader.read()  # until the client hangs up
        closed.set()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = upstream(f"http://127.0.0.1:{port}")
    try:
        call = asyncio.create_task(client.fetch("/gen", b"{}", {}))
        await until(arrived.is_set, "the request never arrived", timeout=5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await until(closed.is_set, "the upstream did not see the disconnect", timeout=5)
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


def test_repr_hides_the_credentials() -> None:
    client = upstream("http://127.0.0.1:9")
    assert "sk-secret" not in repr(client)
    assert repr(client) == "Upstream(provider='test', base_url='http://127.0.0.1:9')"


#: A 200 whose JSON body is cut off: the upstream accepted (and billed) the generation.
CUT_OFF = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{",
    True,
)


async def test_an_answer_lost_after_its_headers_is_final_and_logged() -> None:
    """A body cut off after a 2xx status is UpstreamUnavailable that no retry may repeat."""
    async with scripted(lambda _: CUT_OFF) as (url, _, _):
        client = upstream(url)
        try:
            with capture_logs() as logs, pytest.raises(UpstreamUnavailable) as lost:
                await client.fetch("/gen", b"{}", {})
        finally:
            await client.aclose()
    assert not retryable(lost.value)
    assert lost.value.metadata["answer_lost"] == "true"
    assert "lost in transit" in lost.value.message
    assert [e["log_level"] for e in logs if e["event"] == "upstream_answer_lost"] == ["error"]


async def test_a_5xx_cut_off_stays_retryable() -> None:
    """A body cut off after an error status was not a generation: it may be retried."""
    cut = (b"HTTP/1.1 503 Busy\r\nContent-Length: 50\r\n\r\n{", True)
    async with scripted(lambda _: cut) as (url, _, _):
        client = upstream(url)
        try:
            with pytest.raises(UpstreamUnavailable) as failed:
                await client.fetch("/gen", b"{}", {})
        finally:
            await client.aclose()
    assert retryable(failed.value)


async def test_a_provider_makes_one_request_when_the_answer_is_lost() -> None:
    """Through a real provider with retries on: exactly one upstream request."""
    async with scripted(*[lambda _: CUT_OFF] * 4) as (url, received, _):
        provider = ArkProvider(url, "sk-secret", max_retries=3, client=upstream(url))
        try:
            with pytest.raises(UpstreamUnavailable, match="lost in transit"):
                await provider.generate(
                    GenerationRequest(
                        prompt="a cat", model="doubao-seedream-4-0-250828", size="2K"
                    ),
                    timeout=30,
                )
        finally:
            await provider.aclose()
    assert len(received) == 1
