"""Clients of the client tests: an AsyncClient on the test app, and an app in front of
a fake Ark that sends a group's images GAP seconds apart."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest

from sia.app import App
from sia.client import AsyncClient
from sia.testing.fake_ark import FakeArk

if TYPE_CHECKING:
    from tests.helpers import MakeSettings

ARK_KEY = "ark-key"
GAP = 0.5  # seconds between the fake's images


@pytest.fixture
async def client(app: App) -> AsyncIterator[AsyncClient]:
    """An AsyncClient without a key on the running app."""
    async with AsyncClient(f"127.0.0.1:{app.grpc_port}", api_key="") as sia:
        yield sia


@pytest.fixture
async def fake() -> AsyncIterator[FakeArk]:
    async with FakeArk(api_key=ARK_KEY, image_latency=GAP) as server:
        yield server


@pytest.fixture
async def ark_app(make_settings: MakeSettings, fake: FakeArk) -> AsyncIterator[App]:
    settings = make_settings(
        image_provider="ark", image_api_key=ARK_KEY, image_base_url=fake.base_url
    )
    async with App(settings) as app:
        yield app


@pytest.fixture
async def ark_client(ark_app: App) -> AsyncIterator[AsyncClient]:
    """An AsyncClient on the app in front of the slow fake Ark."""
    async with AsyncClient(f"127.0.0.1:{ark_app.grpc_port}", api_key="") as sia:
        yield sia
