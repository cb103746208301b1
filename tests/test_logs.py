"""Log output: one JSON object per line, timestamps, and one flush per loop iteration."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any, cast

import pytest
import structlog

from sia import logs
from sia.logs import (
    FLUSH_INTERVAL,
    OUTPUT,
    REQUEST_ID,
    AccessLog,
    LineOutput,
    get_logger,
)
from tests.helpers import LogConfig


class CountingStream(io.StringIO):
    """A text stream that counts its writes and flushes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


@pytest.mark.parametrize(
    "now",
    [0.0, 1.5, 1_764_500_000.123456, 1_764_500_000.9999996, 1_764_500_059.000001, 2_000_000_000.5],
)
def test_timestamp_is_iso_utc_with_microseconds(
    now: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stamp reads like datetime.isoformat (UTC, Z), to the microsecond."""
    monkeypatch.setattr(time, "time", lambda: now)
    stamp = logs._timestamp(None, "info", {})["timestamp"]
    assert stamp.endswith("Z") and len(stamp) == len("2026-11-30T11:42:47.763119Z")
    parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert abs(parsed.timestamp() - now) <= 1e-6
    assert parsed.tzinfo == UTC


async def test_lines_on_a_loop_are_written_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a loop, lines written within FLUSH_INTERVAL leave in one write and one flush, even
    across iterations and when stdout itself writes through (PYTHONUNBUFFERED=1)."""
    stream = CountingStream()
    monkeypatch.setattr("sys.stdout", stream)
    output = LineOutput()
    for n in range(3):
        output.write(f'{{"n":{n}}}')
        await asyncio.sleep(0)
    assert (stream.writes, stream.flushes) == (0, 0)
    await asyncio.sleep(FLUSH_INTERVAL * 2)  # a later timer: the flush's fires first
    assert (stream.writes, stream.flushes) == (1, 1)
    assert [json.loads(line)["n"] for line in stream.getvalue().splitlines()] == [0, 1, 2]
    output.write('{"n":3}')
    await asyncio.sleep(FLUSH_INTERVAL * 2)
    assert (stream.writes, stream.flushes) == (2, 2)


def test_lines_left_waiting_by_a_closed_loop_leave_at_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    """What flush() does at exit: lines whose loop closed before their flush go out."""
    stream = CountingStream()
    monkeypatch.setattr("sys.stdout", stream)
    output = LineOutput()

    async def write() -> None:
        output.write('{"n":1}')

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(write())
    finally:
        loop.close()
    assert stream.getvalue() == ""
    output.flush()  # registered with atexit
    assert stream.getvalue() == '{"n":1}\n'


def test_a_flush_left_on_a_closed_loop_does_not_strand_lines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A loop closed before its flush ran: lines written on the next loop still go out."""
    stream = CountingStream()
    monkeypatch.setattr("sys.stdout", stream)
    output = LineOutput()

    async def write(text: str, *, stop: bool = False) -> None:
        output.write(text)
        if stop:
            asyncio.get_running_loop().stop()  # before the scheduled flush can run

    first = asyncio.new_event_loop()
    first.run_until_complete(write('{"n":1}', stop=True))
    first.close()
    assert stream.flushes == 0
    second = asyncio.new_event_loop()
    try:
        second.run_until_complete(write('{"n":2}'))
        second.run_until_complete(asyncio.sleep(FLUSH_INTERVAL * 2))
    finally:
        second.close()
    assert stream.flushes == 1
    assert stream.getvalue() == '{"n":1}\n{"n":2}\n'


async def test_a_broken_stdout_loses_lines_but_fails_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A broken pipe on stdout (the log collector gone) neither raises into the caller nor
    into the loop; lines written once stdout works again go out."""
    errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))

    class Broken(CountingStream):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", Broken())
    output = LineOutput()
    output.write('{"n":1}')
    await asyncio.sleep(FLUSH_INTERVAL * 2)
    output.flush()
    assert errors == []
    stream = CountingStream()
    monkeypatch.setattr("sys.stdout", stream)
    output.write('{"n":2}')
    await asyncio.sleep(FLUSH_INTERVAL * 2)
    assert stream.getvalue() == '{"n":2}\n'


def test_lines_off_the_loop_are_flushed_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start-up and worker threads have no loop: each line is flushed as it is written."""
    stream = CountingStream()
    monkeypatch.setattr("sys.stdout", stream)
    output = LineOutput()
    output.write('{"a":1}')
    output.write('{"a":2}')
    assert (stream.writes, stream.flushes) == (2, 2)
    assert stream.getvalue() == '{"a":1}\n{"a":2}\n'


async def test_structlog_lines_go_through_the_output(
    capsys: pytest.CaptureFixture[str], log_config: LogConfig
) -> None:
    """A JSON line has the event, its fields, bound context, level, timestamp and logger."""
    log_config("info")
    log = get_logger("sia.test")
    with structlog.contextvars.bound_contextvars(task_id="t-1"):
        log.info("hello", n=1, api_key="sk-secret")
    OUTPUT.flush()
    [line] = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert line["event"] == "hello" and line["n"] == 1 and line["task_id"] == "t-1"
    assert line["level"] == "info" and line["logger"] == "sia.test"
    assert line["api_key"] == "***"
    assert line["timestamp"].endswith("Z")


async def test_standard_library_lines_share_the_output_and_its_order(
    capsys: pytest.CaptureFixture[str], log_config: LogConfig
) -> None:
    """grpc's, aiohttp's and asyncio's records (the standard library's loggers) are rendered
    like ours and leave through the same output, in the order they were written."""
    log_config("info")
    get_logger("sia.test").info("first")
    logging.getLogger("aiohttp.client").warning("second %s", "arg")
    get_logger("sia.test").info("third")
    assert capsys.readouterr().out == ""  # all three wait for the flush
    await asyncio.sleep(FLUSH_INTERVAL * 2)
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [line["event"] for line in lines] == ["first", "second arg", "third"]
    assert lines[1]["logger"] == "aiohttp.client" and lines[1]["level"] == "warning"


def _lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    return [json.loads(x) for x in capsys.readouterr().out.splitlines()]


def test_access_line_has_the_shape_structlog_gives_every_line(
    capsys: pytest.CaptureFixture[str], log_config: LogConfig
) -> None:
    """The directly rendered access line equals structlog's line for the same event."""
    log_config("info")
    token = REQUEST_ID.set("req-9")
    try:
        fields = {"method": "/image.v1.ImageService/Check", "code": "OK", "duration_ms": 1.5}
        AccessLog("sia.rpc")("rpc", **fields)
        get_logger("sia.rpc").info("rpc", **fields)
    finally:
        REQUEST_ID.reset(token)
    fast, reference = _lines(capsys)
    assert fast.pop("timestamp") and reference.pop("timestamp")
    assert list(fast.items()) == list(reference.items())
    assert fast["request_id"] == "req-9"


def test_access_line_follows_format_and_level(
    capsys: pytest.CaptureFixture[str], log_config: LogConfig
) -> None:
    """Console format renders it through structlog; below LOG_LEVEL it is not written."""
    log_config("info", "console")
    AccessLog("sia.rpc")("rpc", code="OK")
    assert "rpc" in capsys.readouterr().out
    log_config("warning")
    AccessLog("sia.rpc")("rpc", code="OK")
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("log_level", "written"),
    [
        ("debug", ["info", "warning", "error"]),
        ("info", ["info", "warning", "error"]),
        ("warning", ["warning", "error"]),
        ("error", ["error"]),
    ],
)
@pytest.mark.parametrize("fmt", ["json", "console"])
def test_access_line_levels_follow_log_level(
    capsys: pytest.CaptureFixture[str],
    log_config: LogConfig,
    log_level: str,
    written: list[str],
    fmt: str,
) -> None:
    """An access line is written at its own level when LOG_LEVEL lets that level through,
    so an error line still shows at LOG_LEVEL=error, in either format."""
    log_config(log_level, fmt)
    access = AccessLog("sia.rpc")
    for level in logs.ACCESS_LEVELS:
        access("rpc", level, code=f"code_{level}")
    OUTPUT.flush()
    out = capsys.readouterr().out
    assert [level for level in logs.ACCESS_LEVELS if f"code_{level}" in out] == written
    if fmt == "json":
        assert [line["level"] for line in _lines_of(out)] == written


def _lines_of(out: str) -> list[dict[str, object]]:
    return [json.loads(x) for x in out.splitlines()]


def _fail_with_a_prompt_in_scope() -> None:
    prompt = "secret prompt text"  # a local a trace with locals would show
    raise RuntimeError(f"failed after {len(prompt)} characters")


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_error_traces_carry_frames_without_locals(
    capsys: pytest.CaptureFixture[str], log_config: LogConfig, fmt: str
) -> None:
    """A logged exception names its frames but none of their local variables, from structlog
    and from standard-library loggers alike."""
    log_config("info", fmt)
    for logger in (get_logger("sia.test"), logging.getLogger("sia.stdlib")):
        try:
            _fail_with_a_prompt_in_scope()
        except RuntimeError:
            logger.exception("failed")
    OUTPUT.flush()
    out = capsys.readouterr().out
    assert out.count("_fail_with_a_prompt_in_scope") >= 2
    assert "secret prompt text" not in out
    if fmt == "json":
        lines = _lines_of(out)
        assert [line["level"] for line in lines] == ["error", "error"]
        for line in lines:
            [exception] = cast("list[dict[str, Any]]", line["exception"])
            frames = exception["frames"]
            assert frames[-1]["name"] == "_fail_with_a_prompt_in_scope"
            assert all("locals" not in frame for frame in frames)
