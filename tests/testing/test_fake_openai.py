"""The fake OpenAI images server, driven directly over loopback HTTP."""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from PIL import Image

from sia.testing.fake_openai import (
    GENERATIONS_PATH,
    TRIGGER_ERROR,
    TRIGGER_RETRY_AFTER,
    FakeError,
    FakeOpenAI,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

KEY = "sk-test-0123456789abcdefghij"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=KEY) as server:
        yield server


async def post(
    fake: FakeOpenAI,
    session: aiohttp.ClientSession,
    headers: dict[str, str] | None = None,
    **body: Any,
) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    """POST a generation (model gpt-image-1 unless given) and return status, JSON and response."""
    body = {"model": "gpt-image-1", "prompt": "a red fox", **body}
    async with session.post(
        fake.base_url + GENERATIONS_PATH, json=body, headers=AUTH if headers is None else headers
    ) as response:
        return response.status, await response.json(), response


def picture(data: bytes) -> tuple[str | None, tuple[int, int]]:
    with Image.open(io.BytesIO(data)) as image:
        return image.format, image.size


async def test_missing_or_wrong_key_is_401(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    """No key gets code null, a wrong one invalid_api_key with the key masked, as OpenAI does."""
    status, body, response = await post(fake, session, headers={})
    assert status == 401
    assert body["error"]["code"] is None
    assert response.headers["x-request-id"].startswith("req_")
    wrong = "sk-wrong-9876543210zyxwvuts"
    status, body, _ = await post(fake, session, headers={"Authorization": f"Bearer {wrong}"})
    assert status == 401
    error = body["error"]
    assert (error["code"], error["type"], error["param"]) == (
        "invalid_api_key",
        "invalid_request_error",
        None,
    )
    assert "sk-" in error["message"]
    assert error["message"].endswith("vuts.")
    assert wrong not in error["message"]
    assert fake.requests[-1].outcome == "error:invalid_api_key"


@pytest.mark.parametrize(("fmt", "pil"), [("png", "PNG"), ("jpeg", "JPEG")])
async def test_gpt_image_is_b64_with_usage(
    fake: FakeOpenAI, session: aiohttp.ClientSession, fmt: str, pil: str
) -> None:
    """gpt-image answers n base64 images of the requested size and format, with usage."""
    status, body, _ = await post(fake, session, n=2, size="1024x1536", output_format=fmt)
    assert status == 200
    assert (body["size"], body["output_format"], body["quality"]) == ("1024x1536", fmt, "medium")
    assert len(body["data"]) == 2
    assert picture(base64.b64decode(body["data"][0]["b64_json"])) == (pil, (1024, 1536))
    assert body["usage"]["output_tokens"] == 2 * 1584
    assert fake.requests[-1].images == 2


async def test_dall_e_url_and_b64(fake: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    """DALL-E answers a URL served by the fake, or base64 with dall-e-3's revised prompt."""
    _, body, _ = await post(fake, session, model="dall-e-2", size="512x512")
    url = body["data"][0]["url"]
    async with session.get(url) as response:
        assert response.content_type == "image/png"
        assert picture(await response.read()) == ("PNG", (512, 512))
    assert fake.downloads == 1
    status, body, _ = await post(fake, session, model="dall-e-3", response_format="b64_json")
    assert status == 200
    [item] = body["data"]
    assert item["revised_prompt"]
    assert picture(base64.b64decode(item["b64_json"])) == ("PNG", (1024, 1024))
    assert "usage" not in body


@pytest.mark.parametrize(
    ("fields", "status", "code", "param"),
    [
        ({"response_format": "url"}, 400, "unknown_parameter", "response_format"),
        ({"seed": 7}, 400, "unknown_parameter", "seed"),
        ({"n": 11}, 400, "invalid_value", "n"),
        ({"model": "dall-e-3", "n": 2}, 400, "invalid_value", "n"),
        ({"size": "2048x2048"}, 400, "invalid_value", "size"),
        ({"model": "dall-e-2", "output_format": "png"}, 400, "unknown_parameter", "output_format"),
        ({"prompt": ""}, 400, "missing_required_parameter", "prompt"),
        ({"model": "gpt-image-9"}, 404, "model_not_found", None),
    ],
)
async def test_invalid_requests(
    fake: FakeOpenAI,
    session: aiohttp.ClientSession,
    fields: dict[str, Any],
    status: int,
    code: str,
    param: str | None,
) -> None:
    """Each rule answers the status, code and param the real API uses."""
    got, body, _ = await post(fake, session, **fields)
    assert got == status
    assert (body["error"]["code"], body["error"]["param"]) == (code, param)


async def test_error_trigger_and_script(fake: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    """[error:CODE] with [retry-after:S] fails with Retry-After; scripted outcomes go first."""
    prompt = TRIGGER_ERROR.format("rate_limit_exceeded") + TRIGGER_RETRY_AFTER.format(2)
    status, body, response = await post(fake, session, prompt=prompt)
    assert status == 429
    assert body["error"]["type"] == "requests"
    assert response.headers["Retry-After"] == "2"
    fake.script(FakeError("server_error"), "ok")
    status, _, _ = await post(fake, session, prompt=prompt)
    assert status == 500
    status, _, _ = await post(fake, session, prompt=prompt)
    assert status == 200
    assert [r.outcome for r in fake.requests] == [
        "error:rate_limit_exceeded",
        "error:server_error",
        "ok",
    ]
    with pytest.raises(ValueError, match="no_such_code"):
        FakeError("no_such_code")
