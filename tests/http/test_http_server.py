"""Tests of the HTTP side server over real HTTP: health, readiness, metrics, images."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import grpc.aio
import pytest

from sia.api.image.v1 import image_service_pb2 as pb
from sia.api.image.v1 import image_service_pb2_grpc as pb_grpc
from sia.app import App
from sia.health import Readiness
from sia.http.server import HttpServer
from sia.metrics import Metrics
from sia.storage.local import ImageLinks, LocalBlobStore
from tests.helpers import MakeSettings


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


async def test_http_metrics_by_route_template(http: aiohttp.ClientSession) -> None:
    """Every HTTP request is counted and timed by its route's template, never its path
    (task ids and image keys would make a series each); what no route took (an unknown
    path, a method a path does not serve) is "unmatched", an odd method "other"."""
    for path in ("/health", "/v1/tasks/task_abc", "/v1/tasks/task_def", "/no/such/page"):
        async with http.get(path):
            pass
    async with http.request("PROPFIND", "/health"):
        pass
    async with http.get("/metrics") as resp:
        text = await resp.text()
    assert 'http_requests_total{handler="/health",method="GET",status="200"} 1.0' in text
    assert (
        'http_requests_total{handler="/v1/tasks/{task_id}",method="GET",status="404"} 2.0' in text
    )
    assert 'http_requests_total{handler="unmatched",method="GET",status="404"} 1.0' in text
    assert 'http_requests_total{handler="unmatched",method="other",status="405"} 1.0' in text
    assert 'http_request_duration_seconds_count{handler="/health",method="GET"} 1.0' in text
    assert "task_abc" not in text


async def test_unknown_image_is_404(app: App, http: aiohttp.ClientSession) -> None:
    """/images answers 404 for malformed keys, and for a well-signed link to no file,
    without touching other paths."""
    for key in ("nope", "..%2F..%2Fetc%2Fpasswd"):
        async with http.get(f"/images/{key}") as resp:
            assert resp.status == 404
    unknown = "A" * 32 + ".jpeg"
    links = app.http.links
    query = "" if links is None else f"?{links.query(unknown)}"
    async with http.get(f"/images/{unknown}{query}") as resp:
        assert resp.status == 404


async def test_metrics_token_guards_metrics_only(make_settings: MakeSettings) -> None:
    """With METRICS_TOKEN, /metrics needs `Authorization: Bearer <token>` (401 with
    WWW-Authenticate: Bearer otherwise); /health and /ready stay open."""
    async with (
        App(make_settings(metrics_token="tok-3f9a")) as app,
        aiohttp.ClientSession(f"http://127.0.0.1:{app.http_port}") as http,
    ):
        for headers in ({}, {"Authorization": "Basic dG9rLTNmOWE="}):
            async with http.get("/metrics", headers=headers) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"] == "Bearer"
                assert "sia_" not in await resp.text()
        for wrong in ("Bearer tok-3f9", "Bearer tok-3f9ab", "Bearer ", "Bearer tok-3f9é"):
            async with http.get("/metrics", headers={"Authorization": wrong}) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        for right in ("Bearer tok-3f9a", "bearer tok-3f9a"):
            async with http.get("/metrics", headers={"Authorization": right}) as resp:
                assert resp.status == 200
                assert "sia_build_info" in await resp.text()
        for path in ("/health", "/ready"):
            async with http.get(path) as resp:
                assert resp.status == 200


@dataclass
class SignedImages:
    """An HTTP server checking the links of a local store that signs them."""

    store: LocalBlobStore
    links: ImageLinks
    http: aiohttp.ClientSession
    now: list[float]  # the links' clock: tests move it on

    def path(self, url: str) -> str:
        """The path and query of `url`, for the session."""
        parts = urlsplit(url)
        return f"{parts.path}?{parts.query}"


@pytest.fixture
async def signed(make_settings: MakeSettings, tmp_path: Path) -> AsyncIterator[SignedImages]:
    """A store and an HTTP side server sharing one ImageLinks, whatever App wires."""
    now = [time.time()]
    links = ImageLinks(b"k" * 32, ttl=60, clock=lambda: now[0])
    store = LocalBlobStore(tmp_path / "images", "http://unused.test", links=links)
    server = HttpServer(
        make_settings(),
        readiness=Readiness(),
        metrics=Metrics(),
        images=store.image_dir,
        links=links,
    )
    await server.start()
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.port}") as http:
            yield SignedImages(store, links, http, now)
    finally:
        await server.stop()


async def test_signed_image_link_serves_the_image(signed: SignedImages) -> None:
    """A link the store made serves the image until its expiry, and no cache keeps it longer."""
    key = await signed.store.put(b"\xff\xd8jpeg", "image/jpeg")
    url = signed.store.url(key)
    query = parse_qs(urlsplit(url).query)
    assert set(query) == {"expires", "signature"}
    assert int(query["expires"][0]) == math.ceil(signed.now[0] + 60)
    async with signed.http.get(signed.path(url)) as resp:
        assert resp.status == 200
        assert await resp.read() == b"\xff\xd8jpeg"
        assert resp.headers["Content-Type"] == "image/jpeg"
        assert resp.headers["Cache-Control"] == "private, max-age=60, immutable"


async def test_expired_altered_and_unsigned_links_are_403(signed: SignedImages) -> None:
    """Unsigned, half-signed, altered (expiry, signature or key) and expired links are 403,
    never the image; a signed link to a missing file stays 404."""
    key = await signed.store.put(b"\xff\xd8jpeg", "image/jpeg")
    other = await signed.store.put(b"\xff\xd8other", "image/jpeg")
    url = signed.store.url(key)
    query = parse_qs(urlsplit(url).query)
    expires, signature = query["expires"][0], query["signature"][0]
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    bad = [
        f"/images/{key}",
        f"/images/{key}?expires={expires}",
        f"/images/{key}?signature={signature}",
        f"/images/{key}?expires={int(expires) + 3600}&signature={signature}",
        f"/images/{key}?expires={expires}&signature={flipped}",
        f"/images/{key}?expires={expires}&signature={signature}=",
        f"/images/{key}?expires=+{expires}&signature={signature}",
        f"/images/{other}?expires={expires}&signature={signature}",
        f"/images/{key}?expires={expires}&signature=%E2%98%83",
    ]
    for path in bad:
        async with signed.http.get(path) as resp:
            assert resp.status == 403, path
            assert b"jpeg" not in await resp.read()
    signed.now[0] += 61  # past the expiry
    async with signed.http.get(signed.path(url)) as resp:
        assert resp.status == 403
    past = int(time.time()) - 1  # a past expiry signed with the right secret
    async with signed.http.get(
        f"/images/{key}?expires={past}&signature={signed.links.signature(key, past)}"
    ) as resp:
        assert resp.status == 403
    await signed.store.delete([key])
    signed.now[0] -= 61
    async with signed.http.get(signed.path(signed.store.url(key))) as resp:
        assert resp.status == 404


async def test_app_image_links_download(stub: pb_grpc.ImageServiceStub) -> None:
    """A link the app hands out downloads its image as given (signed once App wires links)."""
    response = await stub.GenerateImage(pb.GenerateImageRequest(prompt="a cat"), timeout=30)
    async with aiohttp.ClientSession() as http, http.get(response.images[0].url) as resp:
        assert resp.status == 200
        assert (await resp.read())[:2] == b"\xff\xd8"
