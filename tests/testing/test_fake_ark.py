"""The fake Ark server, driven over loopback HTTP like the real client will drive it."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from PIL import Image

from sia.models import SEEDEDIT_3_0_I2I, SEEDREAM_3_0_T2I, SEEDREAM_4_0, SEEDREAM_4_5
from sia.testing.fake_ark import (
    ERRORS,
    GENERATIONS_PATH,
    TRIGGER_COUNT,
    TRIGGER_DROP,
    TRIGGER_DROP_AFTER,
    TRIGGER_ERROR,
    TRIGGER_INTERNAL,
    TRIGGER_LATENCY,
    TRIGGER_MODERATE,
    TRIGGER_RETRY_AFTER,
    FakeArk,
    FakeDrop,
    FakeError,
    FakeOK,
    error_status,
    padded_jpeg,
    run_fake_ark,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PNG_URI = "data:image/png;base64,iVBORw0KGgo="
TYPES = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    429: "TooManyRequests",
    500: "InternalServerError",
}


@pytest.fixture
async def fake() -> AsyncIterator[FakeArk]:
    async with FakeArk(api_key=KEY, latency=0.0) as server:
        yield server


async def generate(
    fake: FakeArk,
    session: aiohttp.ClientSession,
    prompt: str = "a red fox",
    *,
    model: str = SEEDREAM_4_0.id,
    headers: dict[str, str] | None = None,
    **fields: Any,
) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    """POST a generation and return status, parsed JSON body and the response."""
    body = {"model": model, "prompt": prompt, **fields}
    async with session.post(
        fake.base_url + GENERATIONS_PATH, json=body, headers=AUTH if headers is None else headers
    ) as response:
        return response.status, await response.json(), response


def group(max_images: int) -> dict[str, Any]:
    return {
        "sequential_image_generation": "auto",
        "sequential_image_generation_options": {"max_images": max_images},
    }


def assert_jpeg(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
        image.load()


def assert_error(body: dict[str, Any], response: aiohttp.ClientResponse, code: str) -> None:
    error = body["error"]
    assert set(error) == {"code", "message", "param", "type"}
    assert error["code"] == code
    assert error["type"] == TYPES[response.status]
    assert error["message"].endswith(f"Request ID: {response.headers['X-Request-Id']}")


async def read_sse(response: aiohttp.ClientResponse) -> list[tuple[str | None, str]]:
    """(event, data) for each frame of an SSE body."""
    frames, event = [], None
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            frames.append((event, line.removeprefix("data: ")))
            event = None
    return frames


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}])
async def test_wrong_or_missing_key_is_401_with_ark_body(
    fake: FakeArk, session: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    """A missing or wrong key gets the live 401 AuthenticationError body."""
    status, body, response = await generate(fake, session, headers=headers)
    request_id = response.headers["X-Request-Id"]
    assert status == 401
    assert body == {
        "error": {
            "code": "AuthenticationError",
            "message": "the API key or AK/SK in the request is missing or invalid. "
            f"request id: {request_id}",
            "param": "",
            "type": "Unauthorized",
        }
    }
    assert fake.requests[-1].outcome == "error:AuthenticationError"


async def test_url_result_downloads_a_jpeg(fake: FakeArk, session: aiohttp.ClientSession) -> None:
    """A text-to-image call returns a signed-looking URL on the fake that serves a JPEG."""
    status, body, _ = await generate(fake, session, unknown_field=1)
    assert status == 200
    assert body["model"] == SEEDREAM_4_0.id
    assert isinstance(body["created"], int)
    [item] = body["data"]
    assert item["size"] == "2048x2048"
    assert body["usage"] == {
        "generated_images": 1,
        "output_tokens": 2048 * 2048 // 256,
        "total_tokens": 2048 * 2048 // 256,
    }
    url = item["url"]
    assert url.startswith(fake.base_url + "/images/")
    assert "X-Tos-Expires=86400&" in url
    async with session.get(url) as response:
        assert response.status == 200
        assert response.content_type == "image/jpeg"
        assert_jpeg(await response.read())
    assert fake.downloads == 1


async def test_b64_result_is_a_jpeg(fake: FakeArk, session: aiohttp.ClientSession) -> None:
    """response_format b64_json carries the JPEG's bytes in base64."""
    status, body, _ = await generate(fake, session, response_format="b64_json")
    assert status == 200
    [item] = body["data"]
    assert "url" not in item
    assert_jpeg(base64.b64decode(item["b64_json"]))


@pytest.mark.parametrize(
    ("model", "fields", "size"),
    [
        (SEEDREAM_4_0.id, {"size": "1K"}, "1024x1024"),
        (SEEDREAM_4_0.id, {"size": "4K"}, "4096x4096"),
        (SEEDREAM_4_0.id, {"size": "1600x600"}, "1600x600"),
        (SEEDREAM_4_5.id, {"size": "3750x1250"}, "3750x1250"),
        (SEEDREAM_4_5.id, {}, "2048x2048"),
        (SEEDREAM_3_0_T2I.id, {"seed": 7, "guidance_scale": 2.5}, "1024x1024"),
        (SEEDEDIT_3_0_I2I.id, {"image": "https://example.com/a.png"}, "1024x1024"),
        (SEEDEDIT_3_0_I2I.id, {"image": [PNG_URI], "size": "adaptive"}, "1024x1024"),
    ],
)
async def test_size_resolution(
    fake: FakeArk, session: aiohttp.ClientSession, model: str, fields: dict[str, Any], size: str
) -> None:
    """Keywords, WxH and missing sizes resolve to the reported size per model."""
    status, body, _ = await generate(fake, session, model=model, **fields)
    assert status == 200, body
    assert body["data"][0]["size"] == size


@pytest.mark.parametrize(
    ("model", "size"),
    [
        (SEEDREAM_4_5.id, "1500x1500"),
        (SEEDREAM_4_5.id, "1K"),
        (SEEDREAM_4_0.id, "800x800"),
        (SEEDREAM_4_0.id, "8000x400"),
        (SEEDREAM_3_0_T2I.id, "2K"),
        (SEEDEDIT_3_0_I2I.id, "1024x1024"),
    ],
)
async def test_size_rejected_per_model(
    fake: FakeArk, session: aiohttp.ClientSession, model: str, size: str
) -> None:
    """A size outside the model's rules is a 400 InvalidParameter naming size."""
    fields: dict[str, Any] = {"image": PNG_URI} if model == SEEDEDIT_3_0_I2I.id else {}
    status, body, response = await generate(fake, session, model=model, size=size, **fields)
    assert status == 400
    assert_error(body, response, "InvalidParameter")
    assert body["error"]["param"] == "size"


@pytest.mark.parametrize(
    ("model", "fields", "code", "param"),
    [
        (SEEDREAM_4_0.id, {"prompt": None}, "MissingParameter", "prompt"),
        ("", {}, "MissingParameter", "model"),
        (SEEDREAM_3_0_T2I.id, {"image": PNG_URI}, "InvalidParameter", "image"),
        (SEEDEDIT_3_0_I2I.id, {}, "InvalidParameter", "image"),
        (SEEDREAM_4_0.id, {"image": [PNG_URI] * 15}, "InvalidParameter", "image"),
        (SEEDREAM_4_0.id, {"image": "data:image/PNG;base64,AAAA"}, "InvalidParameter", "image"),
        (SEEDREAM_4_0.id, {"image": "ftp://x/y.png"}, "InvalidParameter", "image"),
        (SEEDREAM_3_0_T2I.id, {"seed": -2}, "InvalidParameter", "seed"),
        (
            SEEDEDIT_3_0_I2I.id,
            {"image": PNG_URI, "guidance_scale": 11},
            "InvalidParameter",
            "guidance_scale",
        ),
        (
            SEEDREAM_3_0_T2I.id,
            {"sequential_image_generation": "auto"},
            "InvalidParameter",
            "sequential_image_generation",
        ),
        (
            SEEDREAM_4_0.id,
            group(16),
            "InvalidParameter",
            "sequential_image_generation_options.max_images",
        ),
        (
            SEEDREAM_4_0.id,
            {"image": [PNG_URI] * 2, **group(14)},
            "InvalidParameter",
            "sequential_image_generation_options.max_images",
        ),
        (SEEDREAM_4_0.id, {"response_format": "png"}, "InvalidParameter", "response_format"),
        (SEEDREAM_3_0_T2I.id, {"stream": True}, "InvalidParameter", "stream"),
    ],
)
async def test_invalid_requests_are_400(
    fake: FakeArk,
    session: aiohttp.ClientSession,
    model: str,
    fields: dict[str, Any],
    code: str,
    param: str,
) -> None:
    """Each field rule of the spec rejects a bad request with the code and param Ark uses."""
    status, body, response = await generate(fake, session, model=model, **fields)
    assert status == 400
    assert_error(body, response, code)
    assert body["error"]["param"] == param


async def test_unknown_model_is_404(fake: FakeArk, session: aiohttp.ClientSession) -> None:
    """An unknown model id is 404 InvalidEndpointOrModel.NotFound."""
    status, body, response = await generate(fake, session, model="doubao-seedream-9-9")
    assert status == 404
    assert_error(body, response, "InvalidEndpointOrModel.NotFound")


async def test_request_log_records_the_call(fake: FakeArk, session: aiohttp.ClientSession) -> None:
    """The log keeps the body, headers, client request id, outcome and timings."""
    headers = {**AUTH, "X-Client-Request-Id": "client-42"}
    _, _, response = await generate(fake, session, "a cat", headers=headers, size="2K")
    [record] = fake.requests
    assert record.method == "POST"
    assert record.path == GENERATIONS_PATH
    assert record.body == {"model": SEEDREAM_4_0.id, "prompt": "a cat", "size": "2K"}
    assert record.header("authorization") == f"Bearer {KEY}"
    assert record.client_request_id == "client-42"
    assert record.request_id == response.headers["X-Request-Id"]
    assert (record.outcome, record.status, record.images) == ("ok", 200, 1)
    assert record.duration is not None
    assert record.duration >= 0
    assert record.received_at > 1e9
    assert (fake.generations, fake.images_generated) == (1, 1)


async def test_group_with_moderated_image(fake: FakeArk, session: aiohttp.ClientSession) -> None:
    """A moderated image in a non-stream group is an error item and the group goes on."""
    prompt = "three panels " + TRIGGER_MODERATE.format(1)
    status, body, _ = await generate(fake, session, prompt, size="1K", **group(3))
    assert status == 200
    first, failed, third = body["data"]
    assert first["size"] == third["size"] == "1024x1024"
    assert set(failed) == {"error"}
    assert failed["error"]["code"] == "OutputImageSensitiveContentDetected"
    assert failed["error"]["message"]
    assert body["usage"]["generated_images"] == 2
    assert body["usage"]["output_tokens"] == 2 * 1024 * 1024 // 256


async def test_stream_with_moderated_image(fake: FakeArk, session: aiohttp.ClientSession) -> None:
    """A stream sends one frame per image, a partial_failed one, completed with usage, [DONE]."""
    body = {
        "model": SEEDREAM_4_5.id,
        "prompt": "comic " + TRIGGER_MODERATE.format(1),
        "stream": True,
        "response_format": "b64_json",
        **group(3),
    }
    async with session.post(fake.base_url + GENERATIONS_PATH, json=body, headers=AUTH) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        frames = await read_sse(resp)
    events = [event for event, _ in frames]
    assert events == [
        "image_generation.partial_succeeded",
        "image_generation.partial_failed",
        "image_generation.partial_succeeded",
        "image_generation.completed",
        None,
    ]
    assert frames[-1][1] == "[DONE]"
    data = [json.loads(text) for _, text in frames[:-1]]
    assert [d.get("image_index") for d in data] == [0, 1, 2, None]
    assert all(
        d["type"] == e and d["model"] == SEEDREAM_4_5.id
        for d, e in zip(data, events[:-1], strict=True)
    )
    assert_jpeg(base64.b64decode(data[0]["b64_json"]))
    assert data[0]["size"] == "2048x2048"
    assert data[1]["error"]["code"] == "OutputImageSensitiveContentDetected"
    assert data[3]["usage"] == {
        "generated_images": 2,
        "output_tokens": 2 * 2048 * 2048 // 256,
        "total_tokens": 2 * 2048 * 2048 // 256,
    }


async def test_internal_error_stops_the_group(
    fake: FakeArk, session: aiohttp.ClientSession
) -> None:
    """An InternalServiceError at image 1 ends the group there."""
    prompt = "story " + TRIGGER_INTERNAL.format(1)
    status, body, _ = await generate(fake, session, prompt, **group(4))
    assert status == 200
    assert len(body["data"]) == 2
    assert "url" in body["data"][0]
    assert body["data"][1]["error"]["code"] == "InternalServiceError"
    assert body["usage"]["generated_images"] == 1


async def test_single_image_failure_fails_the_request(
    fake: FakeArk, session: aiohttp.ClientSession
) -> None:
    """Outside a group a moderated image is a 400 error, not an error item."""
    status, body, response = await generate(fake, session, TRIGGER_MODERATE.format(0))
    assert status == 400
    assert_error(body, response, "OutputImageSensitiveContentDetected")


async def test_count_trigger_makes_fewer_images(
    fake: FakeArk, session: aiohttp.ClientSession
) -> None:
    """[count:N] makes the model produce N images although more are allowed."""
    _, body, _ = await generate(fake, session, "set " + TRIGGER_COUNT.format(2), **group(5))
    assert len(body["data"]) == 2
    assert body["usage"]["generated_images"] == 2


async def test_error_trigger_quota_exceeded(fake: FakeArk, session: aiohttp.ClientSession) -> None:
    """[error:QuotaExceeded] is a 429 with that code."""
    prompt = TRIGGER_ERROR.format("QuotaExceeded")
    status, body, response = await generate(fake, session, prompt)
    assert status == 429
    assert_error(body, response, "QuotaExceeded")
    assert "Retry-After" not in response.headers
    assert fake.requests[-1].outcome == "error:QuotaExceeded"


@pytest.mark.parametrize("code", sorted(ERRORS))
async def test_every_spec_error_code_has_its_status(
    fake: FakeArk, session: aiohttp.ClientSession, code: str
) -> None:
    """Every code of the spec's error table comes back with its documented HTTP status."""
    status, body, _ = await generate(fake, session, TRIGGER_ERROR.format(code))
    assert status == ERRORS[code][0] == error_status(code)
    assert body["error"]["code"] == code
    assert body["error"]["type"] == TYPES[status]


async def test_retry_after_trigger(fake: FakeArk, session: aiohttp.ClientSession) -> None:
    """[retry-after:S] adds a Retry-After header to the error response."""
    prompt = TRIGGER_ERROR.format("ServerOverloaded") + TRIGGER_RETRY_AFTER.format(1)
    status, _, response = await generate(fake, session, prompt)
    assert status == 429
    assert response.headers["Retry-After"] == "1"


async def test_bad_trigger_is_rejected(fake: FakeArk, session: aiohttp.ClientSession) -> None:
    """A malformed trigger word is a 400 so a typo in a test does not pass silently."""
    status, body, _ = await generate(fake, session, TRIGGER_ERROR.format("NoSuchCode"))
    assert status == 400
    assert body["error"]["param"] == "prompt"


async def test_drop_closes_the_connection(fake: FakeArk, session: aiohttp.ClientSession) -> None:
    """[drop] closes the connection without a response and the log says dropped."""
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await generate(fake, session, "x " + TRIGGER_DROP)
    assert fake.requests[-1].outcome == "dropped"
    assert fake.requests[-1].ended is not None


async def test_stream_drop_after_frames(fake: FakeArk, session: aiohttp.ClientSession) -> None:
    """[drop:N] cuts a stream after N image frames."""
    body = {
        "model": SEEDREAM_4_0.id,
        "prompt": TRIGGER_DROP_AFTER.format(1),
        "stream": True,
        **group(3),
    }
    async with session.post(fake.base_url + GENERATIONS_PATH, json=body, headers=AUTH) as resp:
        assert resp.status == 200
        first = await resp.content.readuntil(b"\n\n")
        assert first.startswith(b"event: image_generation.partial_succeeded\n")
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.content.read()
    assert fake.requests[-1].outcome == "dropped"


async def test_client_timeout_is_logged_as_disconnect(
    fake: FakeArk, session: aiohttp.ClientSession
) -> None:
    """A client giving up during [latency:S] is logged as client_disconnected."""
    with pytest.raises(TimeoutError):
        async with session.post(
            fake.base_url + GENERATIONS_PATH,
            json={"model": SEEDREAM_4_0.id, "prompt": TRIGGER_LATENCY.format(5)},
            headers=AUTH,
            timeout=aiohttp.ClientTimeout(total=0.2),
        ):
            pass
    record = fake.requests[-1]
    for _ in range(100):
        if record.outcome != "pending":
            break
        await asyncio.sleep(0.01)
    assert record.outcome == "client_disconnected"


async def test_latency_delays_the_answer(fake: FakeArk, session: aiohttp.ClientSession) -> None:
    """The global latency holds each generation back."""
    fake.latency = 0.2
    await generate(fake, session)
    duration = fake.requests[-1].duration
    assert duration is not None
    assert duration >= 0.2


async def test_script_is_consumed_in_order(fake: FakeArk, session: aiohttp.ClientSession) -> None:
    """Scripted outcomes answer the next valid requests in order, then normal service resumes."""
    fake.script(
        FakeError("ModelAccountRpmRateLimitExceeded", retry_after=1),
        "drop",
        FakeOK(count=2, moderate=(0,)),
        "InternalServiceError",
    )
    assert fake.scripted == 4
    status, body, response = await generate(fake, session)
    assert status == 429
    assert body["error"]["code"] == "ModelAccountRpmRateLimitExceeded"
    assert response.headers["Retry-After"] == "1"
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await generate(fake, session)
    status, body, _ = await generate(fake, session, **group(4))
    assert [("error" in item) for item in body["data"]] == [True, False]
    status, body, _ = await generate(fake, session)
    assert status == 500
    assert body["error"]["type"] == "InternalServerError"
    status, _, _ = await generate(fake, session)
    assert status == 200
    assert fake.scripted == 0
    outcomes = [r.outcome for r in fake.requests]
    assert outcomes == [
        "error:ModelAccountRpmRateLimitExceeded",
        "dropped",
        "ok",
        "error:InternalServiceError",
        "ok",
    ]


async def test_invalid_requests_do_not_consume_the_script(
    fake: FakeArk, session: aiohttp.ClientSession
) -> None:
    """A request rejected by the key check keeps the scripted outcome for the next one."""
    fake.script(FakeDrop(), FakeError("QuotaExceeded"))
    await generate(fake, session, headers={})
    assert fake.scripted == 2


def test_unknown_scripted_code_is_refused() -> None:
    """FakeError refuses a code outside the spec's table unless given a status."""
    with pytest.raises(ValueError, match="NoSuchCode"):
        FakeError("NoSuchCode")
    assert FakeError("NoSuchCode", status=503).status == 503


async def test_b64_bytes_makes_large_real_jpegs(session: aiohttp.ClientSession) -> None:
    """b64_bytes yields a valid JPEG of exactly that many bytes."""
    async with FakeArk(api_key=KEY, b64_bytes=300_000) as fake:
        _, body, _ = await generate(fake, session, response_format="b64_json")
    data = base64.b64decode(body["data"][0]["b64_json"])
    assert len(data) == 300_000
    assert_jpeg(data)


@pytest.mark.parametrize("size", [800, 1000, 65_540, 65_541, 131_077, 3 * 1024 * 1024])
def test_padded_jpeg_sizes(size: int) -> None:
    """Padding hits the exact byte count across segment boundaries."""
    data = padded_jpeg(size)
    assert len(data) == size
    assert_jpeg(data)


async def test_healthz_and_request_id(fake: FakeArk, session: aiohttp.ClientSession) -> None:
    """/healthz answers 200 and every response has an X-Request-Id, 404s included."""
    async with session.get(fake.base_url + "/healthz") as response:
        assert response.status == 200
        assert response.headers["X-Request-Id"]
    async with session.get(fake.base_url + "/nowhere") as response:
        assert response.status == 404
        assert response.headers["X-Request-Id"]


async def test_run_fake_ark_serves_until_cancelled(session: aiohttp.ClientSession) -> None:
    """run_fake_ark serves on the given port until its task is cancelled."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    task = asyncio.create_task(run_fake_ark(port=port, api_key=KEY))
    url = f"http://127.0.0.1:{port}/healthz"
    for _ in range(100):
        try:
            async with session.get(url) as response:
                assert response.status == 200
                break
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.02)
    else:
        pytest.fail("run_fake_ark never answered")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
