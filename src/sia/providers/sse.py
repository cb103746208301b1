"""Server-sent events: an incremental text/event-stream parser.

Ark streams a sequential group as server-sent events; `SSEParser` turns the
answer's byte chunks into events as they arrive, tolerating multi-line data,
comments, keep-alives, CRLF line ends and lines of several megabytes (one
base64 image per event).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator


@dataclass(slots=True)
class ServerSentEvent:
    """One event of a text/event-stream."""

    event: str = "message"
    data: str = ""


@dataclass(slots=True)
class SSEParser:
    """Incremental text/event-stream parser (WHATWG rules, LF or CRLF line ends only).

    Lines may end in LF or CRLF; `data:` lines of one event are joined with
    LF; comments (`:`) and unknown fields are ignored; a blank line dispatches.
    """

    _buffer: bytearray = field(default_factory=bytearray)
    _scan_from: int = 0  # where the search for the next LF resumes: a long line is scanned once
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
