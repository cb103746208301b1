"""The openai provider against the fake OpenAI server over loopback HTTP."""

from __future__ import annotations

import asyncio
import io
import socket
from typing import TYPE_CHECKING, Any

import aiohttp
import grpc.aio
import orjson
import pytest
from PIL import Image

from sia.api.image.v1 import image_service_pb2 as pb
from sia.api.image.v1 import image_service_pb2_grpc as pb_grpc
from sia.app import App
from sia.domain import GenerationRequest, ResponseFormat
from sia.errors import (
    ModelUnavailable,
    ProviderMisconfigured,
    SiaError,
    UpstreamQuotaExceeded,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamUnavailable,
)
from sia.logs import REQUEST_ID
from sia.providers.openai import (
    OPENAI_MODELS,
    OpenAIProvider,
    image_size,
    parse_result,
    upstream_error,
)
from sia.testing.fake_openai import (
    GENERATIONS_PATH,
    TRIGGER_ERROR,
    TRIGGER_LATENCY,
    TRIGGER_RETRY_AFTER,
    FakeError,
    FakeOpenAI,
    render,
)
from tests.helpers import MakeSettings
from tests.providers.arrivals import Arrivals
from tests.waiting import until

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

KEY = "sk-test-0123456789abcdefghij"
TIMEOUT = 30.0


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=KEY) as server:
        yield server


@pytest.fixture
def health() -> list[str | None]:
    return []


@pytest.fixture
async def provider(fake: FakeOpenAI, health: list[str | None]) -> AsyncIterator[OpenAIProvider]:
    client = OpenAIProvider(fake.base_url, KEY, on_health=health.append)
    yield client
    await client.aclose()


def request(
    prompt: str = "a red fox", model: str = "gpt-image-1", size: str = "1024x1024", **fields: Any
) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, model=model, size=size, **fields)


async def failure(provider: OpenAIProvider, prompt: str, **fields: Any) -> SiaError:
    """The error generate raises for `prompt`."""
    with pytest.raises(SiaError) as info:
        await provider.generate(request(prompt, **fields), timeout=TIMEOUT)
    return info.value


async def test_single_image_is_decoded_png(
    provider: OpenAIProvider, fake: FakeOpenAI, health: list[str | None]
) -> None:
    """A gpt-image call yields the PNG bytes, their size, content type, usage and our request id."""
    bound = REQUEST_ID.set("rid-7")  # as the gRPC interceptor does
    try:
        result = await provider.generate(request(size="1536x1024"), timeout=TIMEOUT)
    finally:
        REQUEST_ID.reset(bound)
    [image] = result.images
    assert (image.index, image.size, image.content_type, image.url) == (
        0,
        "1536x1024",
        "image/png",
        "",
    )
    with Image.open(io.BytesIO(image.data)) as img:
        assert (img.format, img.size) == ("PNG", (1536, 1024))
    assert result.model == "gpt-image-1"
    assert (result.usage.generated_images, result.usage.output_tokens) == (1, 1584)
    [record] = fake.requests
    assert record.header("Authorization") == f"Bearer {KEY}"
    assert record.client_request_id == "rid-7"
    assert health == [None]


async def test_each_image_of_the_answer_reaches_on_image_in_order(
    provider: OpenAIProvider, fake: FakeOpenAI
) -> None:
    """The images of one answer go to on_image one by one, by index, before generate returns."""
    arrivals = Arrivals()
    result = await provider.generate(request(max_images=3), timeout=TIMEOUT, on_image=arrivals)
    assert arrivals.indexes == [0, 1, 2]
    assert arrivals.images == list(result.images)


async def test_what_on_image_raises_ends_the_generation(
    provider: OpenAIProvider, fake: FakeOpenAI
) -> None:
    """An on_image error comes out of generate as is, after one call and one image."""
    error = UpstreamUnavailable("the store is unreachable")  # retryable, were it the upstream's
    arrivals = Arrivals(error=error)
    with pytest.raises(UpstreamUnavailable) as caught:
        await provider.generate(request(max_images=3), timeout=TIMEOUT, on_image=arrivals)
    assert caught.value is error
    assert (arrivals.indexes, len(fake.requests)) == ([0], 1)


async def test_group_sends_n_and_nothing_openai_lacks(
    provider: OpenAIProvider, fake: FakeOpenAI
) -> None:
    """A sequential request is one call with n; seed, watermark and response_format stay out."""
    group = request(
        "a comic in three panels",
        max_images=3,
        seed=7,
        guidance_scale=5.0,
        watermark=True,
        response_format=ResponseFormat.URL,
    )
    result = await provider.generate(group, timeout=TIMEOUT)
    assert [image.index for image in result.images] == [0, 1, 2]
    assert all(image.data and image.size == "1024x1024" for image in result.images)
    assert result.usage.generated_images == 3
    [record] = fake.requests
    body = record.body
    assert body["model"] == "gpt-image-1"
    assert body["prompt"] == "a comic in three panels"
    assert body["n"] == 3
    assert body["size"] == "1024x1024"
    assert body["output_format"] == "png"
    assert set(body) == {"model", "prompt", "n", "size", "output_format"}
    assert len(record.client_request_id or "") == 32  # a fresh uuid4 hex without a bound id


async def test_dall_e_3_url_result(provider: OpenAIProvider, fake: FakeOpenAI) -> None:
    """dall-e-3 gets response_format url and returns a downloadable URL with the request's size."""
    result = await provider.generate(request(model="dall-e-3", size="1792x1024"), timeout=TIMEOUT)
    [image] = result.images
    assert image.url.startswith(fake.base_url + "/images/")
    assert (image.data, image.size, image.content_type) == (b"", "1792x1024", "image/png")
    assert fake.requests[0].body == {
        "model": "dall-e-3",
        "prompt": "a red fox",
        "n": 1,
        "size": "1792x1024",
        "response_format": "url",
    }
    async with aiohttp.ClientSession() as session, session.get(image.url) as resp:
        with Image.open(io.BytesIO(await resp.read())) as img:
            assert img.size == (1792, 1024)


async def test_dall_e_2_b64_result(provider: OpenAIProvider) -> None:
    """dall-e-2 with b64_json returns the bytes inline."""
    result = await provider.generate(
        request(model="dall-e-2", size="256x256", response_format=ResponseFormat.B64_JSON),
        timeout=TIMEOUT,
    )
    [image] = result.images
    assert (image.size, image.content_type, image.url) == ("256x256", "image/png", "")
    assert image.data == render(256, 256)[0]


async def test_auto_size_comes_from_the_answer(provider: OpenAIProvider) -> None:
    """For size auto the answer's top-level size is used."""
    result = await provider.generate(request(size="auto"), timeout=TIMEOUT)
    assert result.images[0].size == "1024x1024"


def test_auto_size_without_answer_size_reads_the_image() -> None:
    """Without a size in the answer or the request, the image header gives it."""
    png = render(256, 512)[0]
    payload = {"data": [{"b64_json": render(256, 512)[1]}]}
    [image] = parse_result(payload, request(size="auto")).images
    assert image.size == image_size(png) == "256x512"
    assert image_size(b"not an image") == ""


@pytest.mark.parametrize("code", ["content_policy_violation", "moderation_blocked"])
async def test_content_policy_is_rejected_prompt(
    provider: OpenAIProvider, fake: FakeOpenAI, code: str
) -> None:
    """A safety-system 400 is UpstreamRejected on the prompt field, not retried."""
    exc = await failure(provider, TRIGGER_ERROR.format(code))
    assert isinstance(exc, UpstreamRejected)
    assert exc.violations[0].field == "prompt"
    assert exc.metadata == {
        "provider": "openai",
        "upstream_code": code,
        "upstream_request_id": fake.requests[0].request_id,
    }
    assert len(fake.requests) == 1


async def test_other_400_names_the_param_and_is_not_retried(
    provider: OpenAIProvider, fake: FakeOpenAI
) -> None:
    """A prompt too long for dall-e-2 is UpstreamRejected naming prompt, after one request."""
    exc = await failure(provider, "x" * 1200, model="dall-e-2", size="256x256")
    assert isinstance(exc, UpstreamRejected)
    assert exc.violations[0].field == "prompt"
    assert exc.metadata["upstream_code"] == "string_above_max_length"
    assert "maximum length 1000" in exc.message
    assert len(fake.requests) == 1


async def test_wrong_key_is_misconfigured_until_a_success(
    fake: FakeOpenAI, health: list[str | None]
) -> None:
    """A 401 is ProviderMisconfigured and reported to health; a later success clears it."""
    wrong = "sk-wrong-9876543210zyxwvuts"
    provider = OpenAIProvider(fake.base_url, wrong, on_health=health.append)
    try:
        with pytest.raises(ProviderMisconfigured) as info:
            await provider.generate(request(), timeout=TIMEOUT)
        assert info.value.metadata["upstream_code"] == "invalid_api_key"
        assert "credentials or account" in info.value.message
        assert "not your request" in info.value.message
        assert wrong not in str(info.value)
        assert len(fake.requests) == 1
        assert len(health) == 1
        assert health[0]
        assert wrong not in health[0]
        fake.api_key = wrong
        await provider.generate(request(), timeout=TIMEOUT)
        assert health[-1] is None
    finally:
        await provider.aclose()


async def test_403_account_refusal_is_misconfigured(
    provider: OpenAIProvider, fake: FakeOpenAI, health: list[str | None]
) -> None:
    """A 403 account refusal is ProviderMisconfigured and reported to health."""
    code = "unsupported_country_region_territory"
    exc = await failure(provider, TRIGGER_ERROR.format(code))
    assert isinstance(exc, ProviderMisconfigured)
    assert exc.metadata["upstream_code"] == code
    assert health
    assert health[-1]
    assert len(fake.requests) == 1


async def test_404_model_fails_that_call_only(
    provider: OpenAIProvider, fake: FakeOpenAI, health: list[str | None]
) -> None:
    """A model the account lacks is ModelUnavailable naming it; health hears nothing."""
    exc = await failure(provider, "a cat", model="gpt-image-9")
    assert isinstance(exc, ModelUnavailable)
    assert exc.metadata["upstream_code"] == "model_not_found"
    assert exc.metadata["model"] == "gpt-image-9"
    assert not any(health)
    assert len(fake.requests) == 1


@pytest.mark.parametrize("code", ["insufficient_quota", "billing_hard_limit_reached"])
async def test_quota_is_final(provider: OpenAIProvider, fake: FakeOpenAI, code: str) -> None:
    """An exhausted quota or billing limit is UpstreamQuotaExceeded after one request."""
    exc = await failure(provider, TRIGGER_ERROR.format(code))
    assert isinstance(exc, UpstreamQuotaExceeded)
    assert exc.metadata["upstream_code"] == code
    assert len(fake.requests) == 1


async def test_rate_limit_waits_retry_after_then_succeeds(
    provider: OpenAIProvider, fake: FakeOpenAI
) -> None:
    """A 429 with Retry-After 1 is retried after a second, with the same client request id."""
    fake.script(FakeError("rate_limit_exceeded", retry_after=1))
    result = await provider.generate(request(), timeout=TIMEOUT)
    assert len(result.images) == 1
    first, second = fake.requests
    assert (first.outcome, second.outcome) == ("error:rate_limit_exceeded", "ok")
    assert second.received - first.received >= 1.0
    assert first.client_request_id == second.client_request_id


async def test_rate_limit_every_time_gives_up(fake: FakeOpenAI) -> None:
    """A 429 on every attempt is UpstreamRateLimited after max_retries + 1 requests."""
    provider = OpenAIProvider(fake.base_url, KEY, max_retries=2)
    try:
        prompt = TRIGGER_ERROR.format("rate_limit_exceeded") + TRIGGER_RETRY_AFTER.format(0)
        exc = await failure(provider, prompt)
    finally:
        await provider.aclose()
    assert isinstance(exc, UpstreamRateLimited)
    assert exc.upstream_retry_after == 0
    assert exc.metadata["upstream_code"] == "rate_limit_exceeded"
    assert len(fake.requests) == 3


async def test_server_error_then_success(provider: OpenAIProvider, fake: FakeOpenAI) -> None:
    """A 500 is retried and the next answer is returned."""
    fake.script(FakeError("server_error", retry_after=0))
    result = await provider.generate(request(), timeout=TIMEOUT)
    assert len(result.images) == 1
    assert [r.status for r in fake.requests] == [500, 200]


async def test_unreachable_upstream_is_unavailable() -> None:
    """A refused connection is UpstreamUnavailable."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    provider = OpenAIProvider(f"http://127.0.0.1:{port}", KEY, max_retries=0)
    try:
        exc = await failure(provider, "a cat")
    finally:
        await provider.aclose()
    assert isinstance(exc, UpstreamUnavailable)


async def test_api_key_never_leaks(provider: OpenAIProvider, fake: FakeOpenAI) -> None:
    """The key appears in no repr, error message or metadata, even when the upstream echoes it."""
    assert KEY not in repr(provider)
    errors = [
        await failure(provider, TRIGGER_ERROR.format(code))
        for code in ("invalid_api_key", "content_policy_violation", "insufficient_quota")
    ]
    echoed = orjson.dumps({"error": {"message": f"bad key {KEY}", "code": "invalid_api_key"}})
    errors.append(upstream_error(401, echoed, {}, secret=KEY))
    for exc in errors:
        texts = [str(exc), exc.message, repr(exc), *exc.metadata.values()]
        assert not [text for text in texts if KEY in text]
    assert "bad key ***" in errors[-1].message


async def test_cancellation_closes_the_request(provider: OpenAIProvider, fake: FakeOpenAI) -> None:
    """Cancelling a generation in flight ends it and the fake sees the disconnect."""
    task = asyncio.create_task(
        provider.generate(request(TRIGGER_LATENCY.format(5)), timeout=TIMEOUT)
    )
    await until(lambda: bool(fake.requests), "the call never reached the fake", timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(
        lambda: fake.requests[0].outcome != "pending",
        "the upstream request is still pending",
        timeout=5,
    )
    assert fake.requests[0].outcome == "client_disconnected"


def test_catalogue() -> None:
    """Every OpenAI model allows 10 images per group; dall-e-3 makes no groups."""
    assert set(OPENAI_MODELS) == {"gpt-image-1", "gpt-image-1-mini", "dall-e-3", "dall-e-2"}
    assert all(spec.max_images == 10 for spec in OPENAI_MODELS.values())
    assert not OPENAI_MODELS["dall-e-3"].sequential
    assert OPENAI_MODELS["gpt-image-1"].check_size("auto") is None
    assert OPENAI_MODELS["dall-e-2"].check_size("1024x1792") is not None
    assert GENERATIONS_PATH == "/v1/images/generations"


async def test_openai_through_grpc(make_settings: MakeSettings) -> None:
    """IMAGE_PROVIDER=openai serves GenerateSequentialImages through the real server as `n`."""
    async with FakeOpenAI(api_key="sk-grpc-test") as fake:
        settings = make_settings(
            image_provider="openai",
            image_api_key="sk-grpc-test",
            image_base_url=fake.base_url,
            image_model="gpt-image-1",
            image_default_size="1024x1024",
        )
        async with (
            App(settings) as app,
            grpc.aio.insecure_channel(
                f"127.0.0.1:{app.grpc_port}",
                options=[("grpc.max_receive_message_length", 64 << 20)],
            ) as channel,
        ):
            stub = pb_grpc.ImageServiceStub(channel)
            resp = await stub.GenerateSequentialImages(
                pb.GenerateSequentialImagesRequest(prompt="three foxes", max_images=3), timeout=20
            )
            assert len(resp.images) == 3
            assert all(i.url.startswith("http://localhost:") for i in resp.images)
            assert fake.requests[-1].body["n"] == 3  # type: ignore[index]
            health = await stub.HealthCheck(pb.HealthCheckRequest())
            assert health.provider == "openai"
