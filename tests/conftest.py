"""Shared fixtures: settings on free ports and a temporary data directory, a
running app, and a real gRPC channel to it."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc.aio
import pytest

from sia.api.image.v1 import image_service_pb2_grpc as pb_grpc
from sia.app import App
from sia.config import Settings, without_settings
from sia.logs import OUTPUT, configure_logging
from tests.helpers import TEST_SIZE, MakeSettings


def _quiet_logging() -> None:
    configure_logging("warning", "json", cache=False)


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    """JSON logs at warning level, as in production but less chatty."""
    _quiet_logging()


@pytest.fixture
def log_config() -> Iterator[Callable[..., None]]:
    """`log_config(level, format)` for one test; the suite's quiet set-up returns after it."""

    def configure(level: str, fmt: str = "json") -> None:
        configure_logging(level, fmt, cache=False)  # type: ignore[arg-type]  # tests pass literals

    yield configure
    _quiet_logging()


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's SIA variables (nor does a server process it starts)."""
    for name in set(os.environ) - set(without_settings(os.environ)):
        monkeypatch.delenv(name)


#: An SIA API key (sia.access.keys.new_key): no log line of any test may hold one.
API_KEY = re.compile(r"sia_[A-Za-z0-9_-]{43}")


@pytest.fixture(autouse=True)
def _flush_log_lines(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Log lines still waiting for their loop's flush leave with the test that wrote them;
    every line is checked on its way for an API key."""
    write = OUTPUT.write

    def checked(line: str) -> None:
        assert not API_KEY.search(line), f"an API key reached the logs: {line[:200]}"
        write(line)

    monkeypatch.setattr(OUTPUT, "write", checked)
    yield
    OUTPUT.flush()


@pytest.fixture
def make_settings(tmp_path: Path) -> MakeSettings:
    """Build Settings for a test: loopback, ports chosen by the OS, data under tmp_path."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "grpc_host": "127.0.0.1",
            "grpc_port": 0,
            "http_host": "127.0.0.1",
            "http_port": 0,
            "data_dir": tmp_path / "data",
            "image_default_size": TEST_SIZE,
            "log_level": "warning",
            "shutdown_grace": 5,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return make


@pytest.fixture
def settings(make_settings: MakeSettings) -> Settings:
    """Default test settings."""
    return make_settings()


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[App]:
    """A running app on free loopback ports."""
    async with App(settings) as running:
        yield running


@pytest.fixture
async def channel(app: App) -> AsyncIterator[grpc.aio.Channel]:
    """A real gRPC channel to the running app."""
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{app.grpc_port}",
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
    ) as chan:
        yield chan


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.ImageServiceStub:
    """An ImageService client on the channel."""
    return pb_grpc.ImageServiceStub(channel)
