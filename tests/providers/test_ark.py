"""Integration tests of the ark provider: the real server, a real gRPC channel, the fake Ark."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from PIL import Image

from sia.api.image.v1 import image_service_pb2 as pb
from sia.api.image.v1 import image_service_pb2_grpc as pb_grpc
from sia.app import App
from sia.domain import GeneratedImage, GenerationRequest
from sia.providers.ark import ArkProvider
from sia.testing.fake_ark import ERROR_STATUS, FakeArk, FakeDrop, FakeError, FakeOK
from tests.helpers import LogConfig, MakeSettings
from tests.providers.arrivals import Arrivals
from tests.waiting import until, within

KEY = "ark-test-key-5f3e9c"
Stub = pb_grpc.ImageServiceStub


@pytest.fixture
async def fake() -> AsyncIterator[FakeArk]:
    """A fake Ark on loopback that expects KEY."""
    async with FakeArk(api_key=KEY) as server:
        yield server


@pytest.fixture
async def ark_app(make_settings: MakeSettings, fake: FakeArk) -> AsyncIterator[App]:
    """The real server with its ark provider pointed at the fake."""
    settings = make_settings(
        image_provider="ark",
        image_api_key=KEY,
        image_base_url=fake.base_url,
        image_max_retries=2,
    )
    async with App(settings) as app:
        yield app


@pytest.fixture
async def stub(ark_app: App) -> AsyncIterator[Stub]:
    """A stub on a real channel to the ark-backed server."""
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{ark_app.grpc_port}", options=[("grpc.max_receive_message_length", 64 << 20)]
    ) as channel:
        yield pb_grpc.ImageServiceStub(channel)


def png_data_uri() -> str:
    """A data URI of a real 64x64 PNG."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo detail of a failed call."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo")


async def test_text_to_image_url(stub: Stub, fake: FakeArk) -> None:
    """A t2i call sends Ark's fields and passes the upstream URL through."""
    resp = await stub.GenerateImage(
        pb.GenerateImageRequest(prompt="a cat", size="2K", watermark=False, seed=5), timeout=10
    )
    image = resp.images[0]
    assert image.url.startswith(fake.base_url + "/images/")
    assert image.size == "2048x2048"
    assert resp.usage.generated_images == 1
    body = fake.requests[-1].body
    assert body == {
        "model": "doubao-seedream-4-0-250828",
        "prompt": "a cat",
        "size": "2K",
        "response_format": "url",
        "watermark": False,
        "sequential_image_generation": "disabled",
    }
    assert fake.requests[-1].header("Authorization") == f"Bearer {KEY}"
    assert fake.requests[-1].client_request_id
    async with aiohttp.ClientSession() as http, http.get(image.url) as download:
        assert download.status == 200


async def test_text_to_image_b64(stub: Stub, fake: FakeArk) -> None:
    """A b64_json answer is decoded and returned as bytes."""
    resp = await stub.GenerateImage(
        pb.GenerateImageRequest(prompt="a cat", response_format=pb.RESPONSE_FORMAT_B64_JSON),
        timeout=10,
    )
    image = resp.images[0]
    assert image.url == ""
    assert image.content_type == "image/jpeg"
    with Image.open(io.BytesIO(image.data)) as img:
        assert img.format == "JPEG"
    assert fake.requests[-1].body["response_format"] == "b64_json"  # type: ignore[index]


async def test_seed_and_guidance_only_where_accepted(stub: Stub, fake: FakeArk) -> None:
    """Seedream 3.0 gets seed and guidance_scale; unset watermark is not sent."""
    await stub.GenerateImage(
        pb.GenerateImageRequest(
            prompt="a cat",
            model="doubao-seedream-3-0-t2i-250415",
            size="1024x1024",
            seed=42,
            guidance_scale=2.5,
        ),
        timeout=10,
    )
    body = fake.requests[-1].body
    assert body == {
        "model": "doubao-seedream-3-0-t2i-250415",
        "prompt": "a cat",
        "size": "1024x1024",
        "response_format": "url",
        "seed": 42,
        "guidance_scale": 2.5,
    }


async def test_image_to_image_references(stub: Stub, fake: FakeArk) -> None:
    """One reference is sent as a string, several as a list, data URIs unchanged."""
    uri = png_data_uri()
    await stub.GenerateImage(
        pb.GenerateImageRequest(prompt="make it red", images=["https://example.com/a.png"]),
        timeout=10,
    )
    assert fake.requests[-1].body["image"] == "https://example.com/a.png"  # type: ignore[index]
    await stub.GenerateImage(
        pb.GenerateImageRequest(prompt="combine", images=["https://example.com/a.png", uri]),
        timeout=10,
    )
    assert fake.requests[-1].body["image"] == ["https://example.com/a.png", uri]  # type: ignore[index]


async def test_group_with_a_moderated_image(stub: Stub, fake: FakeArk) -> None:
    """A streamed group with one moderated image returns the others and one per-image error."""
    resp = await stub.GenerateSequentialImages(
        pb.GenerateSequentialImagesRequest(prompt="four seasons [moderate:1]", max_images=4),
        timeout=10,
    )
    assert [bool(i.url) for i in resp.images] == [True, False, True, True]
    assert resp.images[1].error.code == "OutputImageSensitiveContentDetected"
    assert resp.images[1].index == 1
    assert resp.usage.generated_images == 3
    body = fake.requests[-1].body
    assert body["stream"] is True  # type: ignore[index]
    assert body["sequential_image_generation"] == "auto"  # type: ignore[index]
    assert body["sequential_image_generation_options"] == {"max_images": 4}  # type: ignore[index]


async def test_group_stopped_by_internal_error(stub: Stub) -> None:
    """An internal error stops the group; the images before it still come back."""
    resp = await stub.GenerateSequentialImages(
        pb.GenerateSequentialImagesRequest(prompt="x [internal:2]", max_images=4), timeout=10
    )
    assert [i.error.code for i in resp.images] == ["", "", "InternalServiceError"]


ERROR_CASES = [
    ("MissingParameter", grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_REJECTED"),
    ("InvalidParameter", grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_REJECTED"),
    ("InputTextSensitiveContentDetected", grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_REJECTED"),
    ("OutputImageSensitiveContentDetected", grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_REJECTED"),
    ("AuthenticationError", grpc.StatusCode.FAILED_PRECONDITION, "PROVIDER_MISCONFIGURED"),
    ("AccountOverdueError", grpc.StatusCode.FAILED_PRECONDITION, "PROVIDER_MISCONFIGURED"),
    ("AccessDenied", grpc.StatusCode.FAILED_PRECONDITION, "PROVIDER_MISCONFIGURED"),
    (
        "OperationDenied.ServiceNotOpen",
        grpc.StatusCode.FAILED_PRECONDITION,
        "PROVIDER_MISCONFIGURED",
    ),
    ("ModelNotOpen", grpc.StatusCode.FAILED_PRECONDITION, "MODEL_NOT_ENABLED"),
    ("InvalidEndpointOrModel.NotFound", grpc.StatusCode.FAILED_PRECONDITION, "MODEL_NOT_ENABLED"),
    (
        "InvalidEndpointOrModel.ModelIDAccessDisabled",
        grpc.StatusCode.FAILED_PRECONDITION,
        "MODEL_NOT_ENABLED",
    ),
    ("QuotaExceeded", grpc.StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_QUOTA_EXCEEDED"),
    ("SetLimitExceeded", grpc.StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_QUOTA_EXCEEDED"),
    (
        "ModelAccountIpmRateLimitExceeded",
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "UPSTREAM_RATE_LIMITED",
    ),
    ("ServerOverloaded", grpc.StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_RATE_LIMITED"),
    ("InternalServiceError", grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE"),
]


@pytest.mark.parametrize(("code", "status", "reason"), ERROR_CASES)
async def test_error_mapping(
    make_settings: MakeSettings, fake: FakeArk, code: str, status: grpc.StatusCode, reason: str
) -> None:
    """Each upstream error class becomes its gRPC status with the upstream code and request id."""
    settings = make_settings(
        image_provider="ark", image_api_key=KEY, image_base_url=fake.base_url, image_max_retries=0
    )
    async with App(settings) as app, grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as ch:
        stub = pb_grpc.ImageServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GenerateImage(
                pb.GenerateImageRequest(prompt=f"x [error:{code}]"), timeout=10
            )
    err = caught.value
    assert err.code() == status
    info = error_info(err)
    assert info.reason == reason
    assert info.metadata["upstream_code"] == code
    assert info.metadata["upstream_request_id"] == fake.requests[-1].request_id
    assert fake.requests[-1].status == ERROR_STATUS[code]
    details = err.details() or ""
    if reason == "PROVIDER_MISCONFIGURED":
        assert "server is misconfigured" in details and "not a problem with your request" in details
    if reason == "MODEL_NOT_ENABLED":
        assert info.metadata["model"] == "doubao-seedream-4-0-250828"
        assert "doubao-seedream-4-0-250828" in details
    if status == grpc.StatusCode.RESOURCE_EXHAUSTED and reason == "UPSTREAM_RATE_LIMITED":
        trailer = rpc_status.from_call(err)  # type: ignore[arg-type]
        assert trailer is not None
        assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in trailer.details)


async def test_misconfigured_turns_health_off_until_success(
    ark_app: App, stub: Stub, fake: FakeArk
) -> None:
    """A refused key turns /ready and gRPC health NOT_SERVING until a later call succeeds."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ark_app.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        fake.script(FakeError("AuthenticationError"))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GenerateImage(pb.GenerateImageRequest(prompt="x"), timeout=10)
        check = await health.Check(health_pb2.HealthCheckRequest(service="image.v1.ImageService"))
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
        alive = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert alive.status == health_pb2.HealthCheckResponse.SERVING  # liveness: no restart
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{ark_app.http_port}/ready") as ready:
                assert ready.status == 503
            await stub.GenerateImage(pb.GenerateImageRequest(prompt="x"), timeout=10)
            async with http.get(f"http://127.0.0.1:{ark_app.http_port}/ready") as ready:
                assert ready.status == 200
        check = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert check.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("code", ["ModelNotOpen", "InvalidEndpointOrModel.NotFound"])
async def test_a_model_the_account_lacks_fails_that_call_only(
    ark_app: App, stub: Stub, fake: FakeArk, code: str
) -> None:
    """Ark's 404 for a model the account has not enabled: that call fails FAILED_PRECONDITION
    naming the model; /ready stays 200 and gRPC health SERVING (any client could otherwise
    take every replica out in turn), and the next call is served."""
    model = "doubao-seedream-4-5-251128"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GenerateImage(
            pb.GenerateImageRequest(prompt=f"x [error:{code}]", model=model, size="2048x2048"),
            timeout=10,
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert model in (caught.value.details() or "")
    info = error_info(caught.value)
    assert (info.reason, info.metadata["model"]) == ("MODEL_NOT_ENABLED", model)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ark_app.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        check = await health.Check(health_pb2.HealthCheckRequest(service="image.v1.ImageService"))
        assert check.status == health_pb2.HealthCheckResponse.SERVING
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{ark_app.http_port}/ready") as ready,
    ):
        assert ready.status == 200
    assert ark_app.readiness.problems == {}
    await stub.GenerateImage(pb.GenerateImageRequest(prompt="x"), timeout=10)


async def test_misconfigured_instance_serves_again_to_recheck(
    make_settings: MakeSettings, fake: FakeArk
) -> None:
    """Out of rotation no call can clear the problem: after PROVIDER_RECHECK_INTERVAL it serves."""
    settings = make_settings(
        image_provider="ark",
        image_api_key=KEY,
        image_base_url=fake.base_url,
        provider_recheck_interval=0.3,
    )
    async with (
        App(settings) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
    ):
        stub, health = pb_grpc.ImageServiceStub(channel), health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="image.v1.ImageService")
        fake.script(FakeError("AccountOverdueError"))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GenerateImage(pb.GenerateImageRequest(prompt="x"), timeout=10)
        assert (await health.Check(request)).status == health_pb2.HealthCheckResponse.NOT_SERVING
        await asyncio.sleep(0.5)  # the account was topped up meanwhile: nothing is scripted
        assert (await health.Check(request)).status == health_pb2.HealthCheckResponse.SERVING
        await stub.GenerateImage(pb.GenerateImageRequest(prompt="x"), timeout=10)
        assert (await health.Check(request)).status == health_pb2.HealthCheckResponse.SERVING


async def test_rate_limit_retried_after_retry_after(stub: Stub, fake: FakeArk) -> None:
    """A 429 with Retry-After: 1 is retried no sooner than one second later."""
    fake.script(FakeError("ModelAccountRpmRateLimitExceeded", retry_after=1), FakeOK())
    resp = await stub.GenerateImage(pb.GenerateImageRequest(prompt="x"), timeout=10)
    assert resp.images[0].url
    first, second = fake.requests[-2:]
    assert (first.outcome, second.outcome) == ("error:ModelAccountRpmRateLimitExceeded", "ok")
    assert second.received - first.received >= 1.0
    assert first.client_request_id == second.client_request_id


async def test_server_errors_retried_then_unavailable(stub: Stub, fake: FakeArk) -> None:
    """5xx answers are retried IMAGE_MAX_RETRIES times, then UNAVAILABLE."""
    fake.script(*["InternalServiceError"] * 3)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GenerateImage(pb.GenerateImageRequest(prompt="x"), timeout=20)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(fake.requests) == 3


async def test_dropped_connection_retried(stub: Stub, fake: FakeArk) -> None:
    """A connection dropped without an answer is retried."""
    fake.script(FakeDrop(), FakeOK())
    resp = await stub.GenerateImage(pb.GenerateImageRequest(prompt="x"), timeout=10)
    assert resp.images[0].url
    assert [r.outcome for r in fake.requests] == ["dropped", "ok"]


async def test_no_retry_on_bad_request(stub: Stub, fake: FakeArk) -> None:
    """A 400 is not retried."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GenerateImage(pb.GenerateImageRequest(prompt="x [error:InvalidParameter]"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(fake.requests) == 1


async def test_quota_not_retried(stub: Stub, fake: FakeArk) -> None:
    """QuotaExceeded is not retried."""
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GenerateImage(pb.GenerateImageRequest(prompt="x [error:QuotaExceeded]"))
    assert len(fake.requests) == 1


async def test_no_retry_after_a_streamed_image(stub: Stub, fake: FakeArk) -> None:
    """A group whose connection breaks after the first image is not retried; the image survives."""
    resp = await stub.GenerateSequentialImages(
        pb.GenerateSequentialImagesRequest(prompt="x [drop:1]", max_images=3), timeout=10
    )
    assert len(resp.images) == 1 and resp.images[0].url
    assert len(fake.requests) == 1


async def test_client_deadline_closes_upstream(stub: Stub, fake: FakeArk) -> None:
    """A 1 s deadline against a 5 s upstream answers DEADLINE_EXCEEDED and hangs up upstream."""
    fake.latency = 5
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GenerateImage(pb.GenerateImageRequest(prompt="x"), timeout=1)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await until(
        lambda: fake.requests[-1].outcome != "pending",
        "the upstream request is still pending",
        timeout=5,
    )
    assert fake.requests[-1].outcome == "client_disconnected"


async def test_client_cancel_reaches_upstream(stub: Stub, fake: FakeArk) -> None:
    """Cancelling the gRPC call closes the upstream request."""
    fake.latency = 5
    call = stub.GenerateImage(pb.GenerateImageRequest(prompt="x"), timeout=30)
    await until(lambda: bool(fake.requests), "the call never reached the fake", timeout=5)
    call.cancel()
    await until(
        lambda: fake.requests[-1].outcome != "pending",
        "the upstream request is still pending",
        timeout=5,
    )
    assert fake.requests[-1].outcome == "client_disconnected"


async def test_api_key_never_logged(
    make_settings: MakeSettings,
    fake: FakeArk,
    capsys: pytest.CaptureFixture[str],
    log_config: LogConfig,
) -> None:
    """No log line, at debug level, carries the API key, even for refused credentials."""
    log_config("debug")
    settings = make_settings(
        image_provider="ark", image_api_key=KEY, image_base_url=fake.base_url, log_level="debug"
    )
    async with (
        App(settings) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
    ):
        stub = pb_grpc.ImageServiceStub(channel)
        await stub.GenerateImage(pb.GenerateImageRequest(prompt="x"), timeout=10)
        fake.script(FakeError("AuthenticationError"), "InternalServiceError", "ok")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GenerateImage(pb.GenerateImageRequest(prompt="x"), timeout=10)
        assert KEY not in (caught.value.details() or "")
        await stub.GenerateImage(pb.GenerateImageRequest(prompt="x"), timeout=10)
        assert KEY not in repr(app.provider)
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any(line["event"] == "upstream_retry" for line in lines)
    assert KEY not in out


async def test_store_results_keeps_sync_images(make_settings: MakeSettings, fake: FakeArk) -> None:
    """With STORE_RESULTS a synchronous URL result is fetched as bytes and served by us."""
    settings = make_settings(
        image_provider="ark", image_api_key=KEY, image_base_url=fake.base_url, store_results=True
    )
    async with App(settings) as app, grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as ch:
        stub = pb_grpc.ImageServiceStub(ch)
        resp = await stub.GenerateImage(pb.GenerateImageRequest(prompt="keep me"), timeout=10)
        url = resp.images[0].url
        assert url.startswith(f"http://localhost:{app.http_port}/images/")
        assert fake.requests[-1].body["response_format"] == "b64_json"  # type: ignore[index]
        async with aiohttp.ClientSession() as http, http.get(url) as download:
            assert download.status == 200


# The provider itself, without the server: each image of a streamed group reaches `on_image`.

#: Seconds the fake takes per image in the timing tests.
GAP = 0.3


@pytest.fixture
async def provider(fake: FakeArk) -> AsyncIterator[ArkProvider]:
    """An Ark provider talking to the fake over loopback HTTP."""
    ark = ArkProvider(fake.base_url, KEY, max_retries=2)
    yield ark
    await ark.aclose()


def group(prompt: str, max_images: int) -> GenerationRequest:
    return GenerationRequest(
        prompt=prompt, model="doubao-seedream-4-0-250828", size="2K", max_images=max_images
    )


async def test_group_images_reach_on_image_as_the_fake_sends_them(
    provider: ArkProvider, fake: FakeArk
) -> None:
    """Each image, a moderated one as its error, comes to on_image when the fake sends it."""
    fake.image_latency = GAP
    arrivals = Arrivals()
    result = await provider.generate(
        group("four seasons [moderate:1]", 4), timeout=30, on_image=arrivals
    )
    returned = time.monotonic()
    assert arrivals.images == list(result.images)
    assert arrivals.indexes == [0, 1, 2, 3]
    assert [image.ok for image in arrivals.images] == [True, False, True, True]
    assert arrivals.images[1].error is not None
    assert arrivals.images[1].error.code == "OutputImageSensitiveContentDetected"
    # The fake sends image i GAP * (i + 1) seconds after the request came in.
    sent = fake.requests[-1].received
    for index, arrived in enumerate(arrivals.times):
        assert arrived >= sent + GAP * (index + 1) - 0.05, f"image {index} came before it was sent"
    assert arrivals.times[0] < returned - 3 * GAP / 2, "the first image waited for the group"
    assert all(b - a >= GAP / 2 for a, b in zip(arrivals.times, arrivals.times[1:], strict=False))


async def test_latency_trigger_spreads_a_group_over_its_callbacks(
    provider: ArkProvider, fake: FakeArk
) -> None:
    """With `[latency:S]` the images of a stream, and so the callbacks, are S/n apart."""
    arrivals = Arrivals()
    started = time.monotonic()
    await provider.generate(group(f"x [latency:{3 * GAP}]", 3), timeout=30, on_image=arrivals)
    returned = time.monotonic()
    assert arrivals.indexes == [0, 1, 2]
    assert arrivals.times[0] - started >= GAP - 0.05
    assert arrivals.times[0] < returned - GAP, "the first image waited for the group"


@pytest.mark.parametrize("callback_blocks", [False, True], ids=["between-images", "in-callback"])
async def test_cancelling_a_group_mid_stream_closes_the_upstream_connection(
    provider: ArkProvider, fake: FakeArk, callback_blocks: bool
) -> None:
    """Cancelling generate after the first image hangs up on the upstream at once,
    whether it was waiting for the next image or inside on_image."""
    fake.image_latency = 0.5  # the rest of the group would take 1.5 s: longer than we wait
    first = asyncio.Event()

    async def on_image(image: GeneratedImage) -> None:
        first.set()
        if callback_blocks:
            await asyncio.Event().wait()

    call = asyncio.create_task(provider.generate(group("x", 4), timeout=30, on_image=on_image))
    await within(first.wait(), "no image came", timeout=10)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await until(
        lambda: fake.requests[-1].outcome != "pending",
        "the upstream request is still open a second after the cancel",
        timeout=1,
    )
    assert fake.requests[-1].outcome == "client_disconnected"
    assert len(fake.requests) == 1


async def test_on_image_error_ends_the_group_and_hangs_up(
    provider: ArkProvider, fake: FakeArk
) -> None:
    """What on_image raises is what generate raises; the stream is closed, not retried."""
    fake.image_latency = GAP
    boom = RuntimeError("the store is full")
    arrivals = Arrivals(error=boom)
    with pytest.raises(RuntimeError) as caught:
        await provider.generate(group("x", 4), timeout=30, on_image=arrivals)
    assert caught.value is boom
    assert arrivals.indexes == [0]
    await until(
        lambda: fake.requests[-1].outcome != "pending",
        "the upstream request is still open after the callback failed",
        timeout=1,
    )
    assert fake.requests[-1].outcome == "client_disconnected"
    assert len(fake.requests) == 1
