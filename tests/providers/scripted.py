"""An in-process `HttpClient` for provider tests: scripted answers, no sockets.

A provider built with `client=ScriptedClient(...)` sends every request to it;
the client records each one and answers with the next scripted `Reply`
(the last one again once the script runs out, so retries see it too).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from multidict import CIMultiDict

from sia.errors import UpstreamUnavailable
from sia.providers.client import Answer, answer_broken, media_type

JSON = {"Content-Type": "application/json"}
SSE = {"Content-Type": "text/event-stream"}


@dataclass(frozen=True, slots=True)
class Reply:
    """One scripted answer: a status, headers and a body sent in `chunks`.

    `broken` ends the body with a connection failure after the chunks;
    `unreachable` fails before any answer; `hang` never answers.
    """

    status: int = 200
    headers: Mapping[str, str] = field(default_factory=lambda: dict(JSON))
    chunks: Sequence[bytes] = ()
    broken: bool = False
    unreachable: bool = False
    hang: bool = False


def json_reply(payload: Any, status: int = 200, **headers: str) -> Reply:
    """An answer with a JSON body (and extra header fields, `Retry_After` for Retry-After)."""
    fields = {**JSON, **{name.replace("_", "-"): value for name, value in headers.items()}}
    return Reply(status, fields, (orjson.dumps(payload),))


def text_reply(status: int, body: str, content_type: str = "text/plain") -> Reply:
    """An answer whose body is not JSON, such as a proxy's HTML error page."""
    return Reply(status, {"Content-Type": content_type}, (body.encode(),))


def sse_reply(*events: Any, broken: bool = False) -> Reply:
    """A text/event-stream of `events` (JSON objects, or raw strings such as "[DONE]")."""
    frames = b"".join(
        b"data: " + (e.encode() if isinstance(e, str) else orjson.dumps(e)) + b"\n\n"
        for e in events
    )
    # Chunk edges fall inside events and lines, as TCP may cut them.
    chunks = [frames[i : i + 37] for i in range(0, len(frames), 37)]
    return Reply(200, dict(SSE), chunks, broken=broken)


@dataclass(frozen=True, slots=True)
class Sent:
    """One request the provider sent."""

    path: str
    body: Any
    headers: Mapping[str, str]


class ScriptedAnswer:
    """The `HttpAnswer` of a `Reply`."""

    def __init__(self, reply: Reply) -> None:
        self._reply = reply
        self.status = reply.status
        self.headers: Mapping[str, str] = CIMultiDict(reply.headers)
        self._read = False

    @property
    def content_type(self) -> str:
        """The media type, lower case, without parameters."""
        return media_type(self.headers)

    async def read(self) -> bytes:
        """The whole body."""
        return b"".join([chunk async for chunk in self.chunks()])

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's chunks, then a connection failure when the reply is `broken`
        (final after a 2xx, as the real client's)."""
        assert not self._read, "the body was read twice"
        self._read = True
        for chunk in self._reply.chunks:
            await asyncio.sleep(0)
            yield chunk
        if self._reply.broken:
            raise answer_broken("scripted", self.status, ConnectionResetError())


class ScriptedClient:
    """An `HttpClient` answering from a script; `sent` lists what it received."""

    def __init__(self, *replies: Reply) -> None:
        assert replies, "script at least one reply"
        self._replies = list(replies)
        self.sent: list[Sent] = []
        self.closed = False

    @asynccontextmanager
    async def stream(
        self, path: str, body: bytes, headers: Mapping[str, str]
    ) -> AsyncIterator[ScriptedAnswer]:
        """Record the request and answer it with the next reply."""
        assert not self.closed, "request on a closed client"
        self.sent.append(Sent(path, orjson.loads(body), dict(headers)))
        reply = self._replies.pop(0) if len(self._replies) > 1 else self._replies[0]
        if reply.hang:
            await asyncio.Event().wait()
        if reply.unreachable:
            raise UpstreamUnavailable("scripted: unreachable", metadata={"upstream_code": "Drop"})
        yield ScriptedAnswer(reply)

    async def fetch(self, path: str, body: bytes, headers: Mapping[str, str]) -> Answer:
        """The whole answer of the next reply."""
        async with self.stream(path, body, headers) as answer:
            return Answer(answer.status, answer.headers, await answer.read())

    async def aclose(self) -> None:
        """Mark the client closed."""
        self.closed = True
