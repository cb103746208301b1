"""Tests of the HTTP side server over real HTTP: health, readiness, metrics, images."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import grpc.aio
import pytest

from sia.api.image.v1 import image_service_pb2 as pb
from sia.api.image.v1 import image_service_pb2_grpc as pb_grpc
from sia.app import App


@pytest.fixture
async def http(app: App) -> AsyncIterator[aiohttp.ClientSession]:
    """A client session whose relative URLs go to the app's HTTP port."""
    async with aiohttp.ClientSession(f"http://127.0.0.1:{app.http_port}") as session:
        yield session


async def test_health(http: aiohttp.ClientSession) -> None:
    """/health answers 200 while the process runs."""
    async with http.get("/health") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}


async def test_ready_then_not_ready_on_shutdown(app: App, http: aiohttp.ClientSession) -> None:
    """/ready answers 200 when serving and 503 from the first moment of shutdown."""
    async with http.get("/ready") as resp:
        assert resp.status == 200
    app.readiness.begin_shutdown()
    async with http.get("/ready") as resp:
        assert resp.status == 503
        assert (await resp.json())["reasons"] == {"server": "shutting down"}


async def test_ready_reports_component_problems(app: App, http: aiohttp.ClientSession) -> None:
    """A component's reported problem turns /ready 503 until it is cleared."""
    app.readiness.report("provider", "credentials refused")
    async with http.get("/ready") as resp:
        assert resp.status == 503
        assert (await resp.json())["reasons"] == {"provider": "credentials refused"}
    app.readiness.report("provider", None)
    async with http.get("/ready") as resp:
        assert resp.status == 200


async def test_metrics_after_calls(
    stub: pb_grpc.ImageServiceStub, http: aiohttp.ClientSession
) -> None:
    """/metrics exports per-RPC counters and latency, images, tasks and upstream latency."""
    await stub.GenerateImage(pb.GenerateImageRequest(prompt="a cat"), timeout=30)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GenerateImage(pb.GenerateImageRequest(prompt=""), timeout=30)
    async with http.get("/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    method = 'grpc_method="GenerateImage",grpc_service="image.v1.ImageService",grpc_type="unary"'
    assert f'grpc_server_handled_total{{grpc_code="OK",{method}}} 1.0' in text
    assert f'grpc_server_handled_total{{grpc_code="INVALID_ARGUMENT",{method}}} 1.0' in text
    assert 'grpc_code="DATA_LOSS"' not in text  # a series per code that occurred, no more
    assert f"grpc_server_started_total{{{method}}} 2.0" in text
    assert "grpc_server_handling_seconds_bucket{" in text
    assert 'grpc_server_in_flight_requests{grpc_method="GenerateImage"' in text
    assert (
        'sia_images_generated_total{model="doubao-seedream-4-0-250828",outcome="success"} 1.0'
        in text
    )
    assert 'sia_tasks{backend="sqlite",status="queued"} 0.0' in text
    upstream = 'model="doubao-seedream-4-0-250828",provider="offline"'
    assert f"sia_upstream_request_seconds_count{{{upstream}}} 1.0" in text
    assert 'sia_build_info{provider="offline",version="1.0.0"} 1.0' in text


async def test_unknown_image_is_404(http: aiohttp.ClientSession) -> None:
    """/images answers 404 for malformed and unknown keys, without touching other paths."""
    for key in ("nope", "..%2F..%2Fetc%2Fpasswd", "A" * 32 + ".jpeg"):
        async with http.get(f"/images/{key}") as resp:
            assert resp.status == 404
