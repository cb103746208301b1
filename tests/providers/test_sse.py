"""`sia.providers.sse.SSEParser`: events from byte chunks cut anywhere."""

from __future__ import annotations

from sia.providers.sse import SSEParser


def test_sse_parser_tolerance() -> None:
    """The SSE parser joins multi-line data, skips comments, handles CRLF and split chunks."""
    stream = (
        b": keep-alive\r\n\r\n"
        b"event: image_generation.partial_succeeded\r\n"
        b'data: {"a":\r\ndata: 1}\r\n\r\n'
        b"data: [DONE]\n\n"
    )
    parser = SSEParser()
    events = [e for i in range(len(stream)) for e in parser.feed(stream[i : i + 1])]
    events += list(parser.close())
    assert [(e.event, e.data) for e in events] == [
        ("image_generation.partial_succeeded", '{"a":\n1}'),
        ("message", "[DONE]"),
    ]


def test_long_line_split_over_many_chunks() -> None:
    """A multi-megabyte data line arriving in small chunks is one event, intact."""
    data = "A" * (3 << 20)
    stream = f"data: {data}\n\n".encode()
    parser = SSEParser()
    events = [e for i in range(0, len(stream), 65_536) for e in parser.feed(stream[i : i + 65_536])]
    assert [(e.event, e.data) for e in events] == [("message", data)]


def test_close_flushes_an_unterminated_event() -> None:
    """An event without its final blank line is still delivered when the stream ends."""
    parser = SSEParser()
    assert list(parser.feed(b"event: done\ndata: x")) == []
    assert [(e.event, e.data) for e in parser.close()] == [("done", "x")]
