"""The interceptor's operator signals: access-line levels, traces, undecodable requests."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from sia.app import App
from sia.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ProviderMisconfigured,
    ShuttingDown,
    SiaError,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from sia.health import Readiness
from sia.logs import OUTPUT
from sia.metrics import Metrics
from sia.rpc.interceptors import ObservabilityInterceptor
from tests.helpers import LogConfig
from tests.waiting import until, within

SERVICE = "test.v1.Probe"
Behaviour = Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], Any]


def _raising(exc: Exception) -> Behaviour:
    async def behave(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        raise exc

    return behave


async def _ok(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return b""


async def _bug(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    prompt = "secret prompt text"  # a local a trace with locals would show
    raise RuntimeError(f"a bug after {len(prompt)} characters")


async def _slow(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    await asyncio.sleep(30)
    return b""


BEHAVIOURS: dict[str, Behaviour] = {
    "Ok": _ok,
    "Bug": _bug,
    "Slow": _slow,
    "Invalid": _raising(InvalidArgument.field("size", "not a size")),
    "UpstreamDown": _raising(UpstreamUnavailable("the provider answered 503")),
    "ImageTimeout": _raising(DeadlineExceeded("the generation ran past IMAGE_TIMEOUT")),
    "RateLimited": _raising(UpstreamRateLimited("the provider's rate limit")),
    "KeyRefused": _raising(ProviderMisconfigured("the provider refused the key")),
    "Draining": _raising(ShuttingDown()),
    "Unclassified": _raising(SiaError("an error with no narrower class")),
}


async def _count_then_fail(
    request: bytes, context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    """A streaming handler written as an async generator: two messages, then an error."""
    yield b"1"
    yield b"2"
    raise UpstreamUnavailable("the provider went away mid-group")


async def _write_two(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """A streaming handler written as a coroutine calling context.write (as health's Watch)."""
    await context.write(b"a")
    await context.write(b"b")


STREAMS: dict[str, Behaviour] = {"CountThenFail": _count_then_fail, "WriteTwo": _write_two}


class Probe:
    """A real grpc.aio server with the interceptor, serving BEHAVIOURS, and a channel to it."""

    def __init__(self, channel: grpc.aio.Channel, metrics: Metrics) -> None:
        self.channel = channel
        self.metrics = metrics

    async def call(self, name: str, timeout: float | None = None) -> grpc.StatusCode:
        """Call `name` with an empty request; the status code the client sees."""
        method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]
        method = self.channel.unary_unary(f"/{SERVICE}/{name}")
        try:
            await method(b"", timeout=timeout)
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    def handled(self, name: str, code: str) -> float:
        """grpc_server_handled_total for the method and code."""
        labels = {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": name}
        value = self.metrics.registry.get_sample_value(
            "grpc_server_handled_total", {**labels, "grpc_code": code}
        )
        return value or 0.0


@pytest.fixture
async def probe() -> AsyncIterator[Probe]:
    """The probe server on a free loopback port."""
    metrics = Metrics()
    server = grpc.aio.server(interceptors=[ObservabilityInterceptor(metrics, Readiness())])
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            behave,
            request_deserializer=bytes,
            response_serializer=bytes,
        )
        for name, behave in BEHAVIOURS.items()
    }
    handlers |= {
        name: grpc.unary_stream_rpc_method_handler(
            behave, request_deserializer=bytes, response_serializer=bytes
        )
        for name, behave in STREAMS.items()
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Probe(channel, metrics)
    finally:
        await server.stop(None)


class Lines:
    """Every JSON line written to stdout during the test so far."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self._capsys = capsys
        self._lines: list[dict[str, Any]] = []

    def all(self) -> list[dict[str, Any]]:
        """The lines so far (waiting lines flushed first)."""
        OUTPUT.flush()
        self._lines += [json.loads(x) for x in self._capsys.readouterr().out.splitlines()]
        return self._lines

    def access(self, method: str) -> list[dict[str, Any]]:
        """The access lines of `method`."""
        return [x for x in self.all() if x["event"] == "rpc" and x["method"] == method]

    async def access_line(self, method: str) -> dict[str, Any]:
        """The one access line of `method`, once written: abort sends the status before the
        handler resumes to write it."""
        await until(lambda: bool(self.access(method)), f"no access line for {method}")
        [line] = self.access(method)
        return line


@pytest.fixture
def lines(capsys: pytest.CaptureFixture[str]) -> Lines:
    """What the test has logged, line by line."""
    return Lines(capsys)


@pytest.mark.parametrize(
    ("name", "code", "level"),
    [
        ("Ok", "OK", "info"),
        ("Invalid", "INVALID_ARGUMENT", "info"),
        ("Bug", "INTERNAL", "error"),
        ("Unclassified", "INTERNAL", "error"),
        ("UpstreamDown", "UNAVAILABLE", "error"),
        ("ImageTimeout", "DEADLINE_EXCEEDED", "error"),
        ("KeyRefused", "FAILED_PRECONDITION", "error"),
        ("RateLimited", "RESOURCE_EXHAUSTED", "warning"),
        ("Draining", "UNAVAILABLE", "info"),
    ],
)
async def test_access_line_level_follows_the_status(
    probe: Probe, lines: Lines, log_config: LogConfig, name: str, code: str, level: str
) -> None:
    """Server-side failures log their access line at error, rate limits at warning, the
    client's mistakes and a planned drain at info; the client sees the same code."""
    log_config("info")
    assert (await probe.call(name)).name == code
    line = await lines.access_line(f"/{SERVICE}/{name}")
    assert (line["code"], line["level"]) == (code, level)
    assert probe.handled(name, code) == 1


async def test_the_clients_own_deadline_is_not_an_error(
    probe: Probe, lines: Lines, log_config: LogConfig
) -> None:
    """DEADLINE_EXCEEDED because the client's deadline passed is logged at info, unlike the
    server's own IMAGE_TIMEOUT."""
    log_config("info")
    assert await probe.call("Slow", timeout=0.2) == grpc.StatusCode.DEADLINE_EXCEEDED
    line = await lines.access_line(f"/{SERVICE}/Slow")
    assert (line["code"], line["level"]) == ("DEADLINE_EXCEEDED", "info")


async def test_error_lines_are_written_at_log_level_error(
    probe: Probe, lines: Lines, log_config: LogConfig
) -> None:
    """With LOG_LEVEL=error a failed call's access line is still written; an OK one is not."""
    log_config("error")
    await probe.call("Ok")
    await probe.call("UpstreamDown")
    await probe.call("RateLimited")
    await until(lambda: probe.handled("RateLimited", "RESOURCE_EXHAUSTED") == 1, "not counted")
    assert [(x["method"], x["level"]) for x in lines.all() if x["event"] == "rpc"] == [
        (f"/{SERVICE}/UpstreamDown", "error")
    ]


async def test_an_internal_error_is_traced_without_locals(
    probe: Probe, lines: Lines, log_config: LogConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """The bug's trace names the failing frame but not the prompt held in a local."""
    log_config("info")
    assert await probe.call("Bug") == grpc.StatusCode.INTERNAL
    await lines.access_line(f"/{SERVICE}/Bug")
    [trace] = [x for x in lines.all() if x["event"] == "rpc_internal_error"]
    assert trace["level"] == "error" and trace["request_id"]
    assert trace["exception"][0]["frames"][-1]["name"] == "_bug"
    assert "secret prompt text" not in json.dumps(lines.all())


async def test_undecodable_request_is_invalid_argument_logged_and_counted(
    app: App, channel: grpc.aio.Channel, lines: Lines, log_config: LogConfig
) -> None:
    """Bytes that are not a GenerateImageRequest get INVALID_ARGUMENT with a field-less
    BadRequest (not grpc.aio's UNKNOWN), an access line and both counters."""
    log_config("info")
    method = "/image.v1.ImageService/GenerateImage"
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await within(call(b"\xff\xff\xff"), "no answer to undecodable bytes")
    error = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "the request is not a valid image.v1.GenerateImageRequest"
    status = rpc_status.from_call(error)  # type: ignore[arg-type]  # an aio error is a Call too
    assert status is not None
    bad = [d for d in status.details if d.Is(error_details_pb2.BadRequest.DESCRIPTOR)]
    assert len(bad) == 1
    violations = error_details_pb2.BadRequest()
    bad[0].Unpack(violations)
    assert list(violations.field_violations) == []

    line = await lines.access_line(method)
    assert (line["code"], line["level"]) == ("INVALID_ARGUMENT", "info")
    labels = {"grpc_service": "image.v1.ImageService", "grpc_method": "GenerateImage"}
    sample = app.metrics.registry.get_sample_value
    assert sample("sia_undecodable_requests_total", labels) == 1
    handled = {**labels, "grpc_type": "unary", "grpc_code": "INVALID_ARGUMENT"}
    assert sample("grpc_server_handled_total", handled) == 1


@pytest.mark.parametrize(
    ("name", "messages", "code", "level"),
    [
        ("CountThenFail", [b"1", b"2"], "UNAVAILABLE", "error"),
        ("WriteTwo", [b"a", b"b"], "OK", "info"),
    ],
)
async def test_server_streams_are_observed_like_unary_calls(
    probe: Probe,
    lines: Lines,
    log_config: LogConfig,
    name: str,
    messages: list[bytes],
    code: str,
    level: str,
) -> None:
    """Either way of writing a streaming handler sends its messages; an error after them
    reaches the client as its status; one access line and the server_stream counters."""
    log_config("info")
    stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes]
    stream = probe.channel.unary_stream(f"/{SERVICE}/{name}")
    call = stream(b"")
    received = []
    with contextlib.suppress(grpc.aio.AioRpcError):  # the status is checked below
        while (message := await call.read()) is not grpc.aio.EOF:
            received.append(message)
    assert received == messages
    assert (await call.code()).name == code
    line = await lines.access_line(f"/{SERVICE}/{name}")
    assert (line["code"], line["level"]) == (code, level)
    labels = {"grpc_type": "server_stream", "grpc_service": SERVICE, "grpc_method": name}
    handled = probe.metrics.registry.get_sample_value(
        "grpc_server_handled_total", {**labels, "grpc_code": code}
    )
    assert handled == 1


async def test_undecodable_watch_request_is_invalid_argument(
    app: App, channel: grpc.aio.Channel
) -> None:
    """A streaming method (health's Watch) answers bytes that do not parse INVALID_ARGUMENT,
    not grpc.aio's UNKNOWN, and counts them."""
    method = "/grpc.health.v1.Health/Watch"
    watch: grpc.aio.UnaryStreamMultiCallable[bytes, bytes]
    watch = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
    call = watch(b"\xff\xff\xff")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await within(call.read(), "no answer to undecodable bytes")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "the request is not a valid grpc.health.v1.HealthCheckRequest"
    labels = {"grpc_service": "grpc.health.v1.Health", "grpc_method": "Watch"}
    assert app.metrics.registry.get_sample_value("sia_undecodable_requests_total", labels) == 1
