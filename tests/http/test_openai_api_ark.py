"""The OpenAI-compatible API in front of a fake Ark over real HTTP: what a group whose
images all failed answers, and what a client that goes away does to the generation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import aiohttp
import pytest

from sia.app import App
from sia.testing.fake_ark import FakeArk
from tests.waiting import until

if TYPE_CHECKING:
    from tests.helpers import MakeSettings

KEY = "ark-key"


@pytest.fixture
async def fake() -> AsyncIterator[FakeArk]:
    """A fake Ark that sends a group's images 0.5 s apart."""
    async with FakeArk(api_key=KEY, image_latency=0.5) as server:
        yield server


@pytest.fixture
async def ark_app(make_settings: MakeSettings, fake: FakeArk) -> AsyncIterator[App]:
    settings = make_settings(image_provider="ark", image_api_key=KEY, image_base_url=fake.base_url)
    async with App(settings) as app:
        yield app


def _url(app: App, path: str) -> str:
    return f"http://127.0.0.1:{app.http_port}{path}"


async def test_a_group_whose_images_were_all_refused_is_a_400(ark_app: App) -> None:
    """Moderation of every image is about the caller's content: a 400 with the upstream's
    code (a 5xx would be resent, and billed again, by OpenAI's SDKs)."""
    body = {"prompt": "a strip [moderate:0,1]", "n": 2, "size": "2K"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(_url(ark_app, "/v1/images/generations"), json=body) as resp,
    ):
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["code"] == "outputimagesensitivecontentdetected"
    assert error["type"] == "invalid_request_error"


async def test_a_client_that_goes_away_ends_the_upstream_generation(
    ark_app: App, fake: FakeArk
) -> None:
    """Closing the connection mid-group cancels the call, which closes the upstream
    stream at once (as a cancelled gRPC call does); the request is counted as 499."""
    body = {"prompt": "a long strip", "n": 4, "size": "2K"}
    async with aiohttp.ClientSession() as http:
        call = asyncio.create_task(http.post(_url(ark_app, "/v1/images/generations"), json=body))
        await until(lambda: bool(fake.requests and fake.requests[0].frames_sent), "no frame")
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    await until(
        lambda: fake.requests[0].outcome == "client_disconnected",
        "the upstream stream stayed open",
        timeout=2,
    )
    await until(
        lambda: (
            b'handler="/v1/images/generations",method="POST",status="499"'
            in ark_app.metrics.render()
        ),
        "no 499 counted",
        timeout=2,
    )


async def test_a_call_in_flight_at_shutdown_finishes_within_the_grace(
    ark_app: App, fake: FakeArk
) -> None:
    """Shutdown lets a REST generation already running finish (it drains the HTTP
    requests in flight as it drains gRPC calls), while new calls get 503."""
    # 6 images 0.5 s apart: longer than the 2 s stop() gives requests left after a drain.
    body = {"prompt": "a strip", "n": 6, "size": "2K"}
    async with aiohttp.ClientSession() as http:
        call = asyncio.create_task(http.post(_url(ark_app, "/v1/images/generations"), json=body))
        await until(lambda: bool(fake.requests and fake.requests[0].frames_sent), "no frame")
        shutdown = asyncio.create_task(ark_app.shutdown())
        await until(lambda: ark_app.readiness.shutting_down, "no shutdown")
        async with http.post(_url(ark_app, "/v1/images/generations"), json=body) as refused:
            assert refused.status == 503
        resp = await call
        assert resp.status == 200
        assert len((await resp.json())["data"]) == 6
        await shutdown
