"""The OpenAI-compatible image API on the HTTP port, through the official `openai` SDK."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest
from aiohttp import web
from PIL import Image

from sia import errors
from sia.app import App
from sia.http import common
from sia.http.common import ImagesFailed, status_of
from sia.http.openai_api import OpenAIApi
from tests.access.helpers import app_key
from tests.helpers import TEST_SIZE, MakeSettings


def client_for(app: App, key: str = "none") -> openai.AsyncOpenAI:
    """An OpenAI client whose base URL is the app's /v1, without retries."""
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{app.http_port}/v1", api_key=key, max_retries=0
    )


@pytest.fixture
async def client(app: App) -> AsyncIterator[openai.AsyncOpenAI]:
    """An OpenAI client for the running app (no keys: open in development)."""
    async with client_for(app) as sdk:
        yield sdk


def dimensions(data: bytes) -> str:
    """`WIDTHxHEIGHT` of an encoded image."""
    with Image.open(io.BytesIO(data)) as img:
        return f"{img.width}x{img.height}"


async def test_generate_b64_json(client: openai.AsyncOpenAI) -> None:
    """response_format b64_json answers the image bytes, in OpenAI's shape."""
    answer = await client.images.generate(
        prompt="a cat", size=TEST_SIZE, response_format="b64_json", user="ignored"
    )
    assert answer.created > 0
    assert answer.data is not None
    assert len(answer.data) == 1
    assert answer.data[0].b64_json is not None
    assert dimensions(base64.b64decode(answer.data[0].b64_json)) == TEST_SIZE
    assert answer.usage is not None


async def test_generate_url_is_downloadable(client: openai.AsyncOpenAI) -> None:
    """response_format url answers a signed link to the HTTP port that serves the image."""
    answer = await client.images.generate(prompt="a dog", size=TEST_SIZE, response_format="url")
    assert answer.data is not None
    url = answer.data[0].url
    assert url is not None
    assert "signature=" in url
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200
        assert dimensions(await resp.read()) == TEST_SIZE


async def test_generate_n_makes_a_group(client: openai.AsyncOpenAI) -> None:
    """n=2 asks for a sequential group of two images."""
    answer = await client.images.generate(
        prompt="two views of a house", n=2, size=TEST_SIZE, response_format="b64_json"
    )
    assert answer.data is not None
    assert len(answer.data) == 2
    assert all(image.b64_json for image in answer.data)


async def test_models_list(app: App, client: openai.AsyncOpenAI) -> None:
    """/v1/models lists the provider's catalogue; /v1/models/{id} finds one or 404s."""
    page = await client.models.list()
    ids = [model.id for model in page.data]
    assert ids == sorted(app.service.defaults.models)
    assert all(model.owned_by == "sia" and model.object == "model" for model in page.data)
    found = await client.models.retrieve(ids[0])
    assert found.id == ids[0]
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("no-such-model")


async def test_bad_size_names_the_param(client: openai.AsyncOpenAI) -> None:
    """A bad size is a 400 whose error names the `size` param."""
    with pytest.raises(openai.BadRequestError) as caught:
        await client.images.generate(prompt="a cat", size="10x10")
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["param"] == "size"
    assert body["type"] == "invalid_request_error"
    assert body["code"] == "invalid_argument"
    assert "size" in body["message"]


async def test_bad_n_maps_to_n(client: openai.AsyncOpenAI) -> None:
    """A group too large for the model is reported against OpenAI's `n`, not max_images."""
    with pytest.raises(openai.BadRequestError) as caught:
        await client.images.generate(prompt="a cat", n=99, size=TEST_SIZE)
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["param"] == "n"


async def test_keys_enforced(make_settings: MakeSettings) -> None:
    """With keys, a wrong key is a 401; a key over its rpm gets a 429 with Retry-After."""
    async with App(make_settings()) as app:
        key = await app_key(app, "limited", requests_per_minute=1)
        async with client_for(app, "sia_" + "x" * 43) as wrong:
            with pytest.raises(openai.AuthenticationError):
                await wrong.images.generate(prompt="a cat", size=TEST_SIZE)
            with pytest.raises(openai.AuthenticationError):
                await wrong.models.list()
        async with client_for(app, key) as sdk:
            await sdk.images.generate(prompt="a cat", size=TEST_SIZE)
            with pytest.raises(openai.RateLimitError) as caught:
                await sdk.images.generate(prompt="a cat", size=TEST_SIZE)
        retry_after = caught.value.response.headers["Retry-After"]
        assert int(retry_after) >= 1
        assert isinstance(caught.value.body, dict)
        assert caught.value.body["code"] == "quota_exceeded"


async def test_oversized_body_is_413(make_settings: MakeSettings) -> None:
    """A body over GRPC_MAX_MESSAGE_MB is refused with 413 in OpenAI's shape."""
    async with App(make_settings(grpc_max_message_mb=4)) as app:
        body = io.BytesIO(json.dumps({"prompt": "x" * (5 * 1024 * 1024)}).encode())
        url = f"http://127.0.0.1:{app.http_port}/v1/images/generations"
        async with (
            aiohttp.ClientSession() as http,
            http.post(url, data=body, headers={"Content-Type": "application/json"}) as resp,
        ):
            assert resp.status == 413
            assert (await resp.json())["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b""])
async def test_bad_json_is_400(app: App, body: bytes) -> None:
    """A body that is no JSON object is a 400."""
    url = f"http://127.0.0.1:{app.http_port}/v1/images/generations"
    async with aiohttp.ClientSession() as http, http.post(url, data=body) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["type"] == "invalid_request_error"
        assert resp.headers["X-Request-Id"]


async def test_edit_with_uploaded_png(client: openai.AsyncOpenAI) -> None:
    """images.edit sends a PNG that becomes the reference image."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, "PNG")
    answer = await client.images.edit(
        image=("ref.png", buffer.getvalue(), "image/png"),
        prompt="make it blue",
        size=TEST_SIZE,
        response_format="b64_json",
    )
    assert answer.data is not None
    assert answer.data[0].b64_json is not None
    assert dimensions(base64.b64decode(answer.data[0].b64_json)) == TEST_SIZE


async def test_edit_form_fields_are_parsed_from_text(app: App) -> None:
    """Multipart fields are text: n, seed, guidance_scale and watermark are read from it;
    a body that is no valid multipart is a 400, not a crash."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, "PNG")
    form = aiohttp.FormData()
    form.add_field("image", buffer.getvalue(), filename="ref.png", content_type="image/png")
    for name, value in (
        ("prompt", "blue"),
        ("size", TEST_SIZE),
        ("watermark", "false"),
        ("guidance_scale", "5.5"),
        ("seed", "7"),
        ("response_format", "b64_json"),
    ):
        form.add_field(name, value)
    url = f"http://127.0.0.1:{app.http_port}/v1/images/edits"
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=form) as resp:
            assert resp.status == 200, await resp.text()
        form = aiohttp.FormData()
        form.add_field("image", buffer.getvalue(), filename="ref.png", content_type="image/png")
        form.add_field("prompt", "blue")
        form.add_field("watermark", "maybe")
        async with http.post(url, data=form) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["param"] == "watermark"
        no_boundary = {"Content-Type": "multipart/form-data"}
        async with http.post(url, data=b"--x\r\n", headers=no_boundary) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "invalid_argument"


async def test_rest_calls_are_refused_once_shutdown_begins(app: App) -> None:
    """As gRPC calls are: a 503 with Retry-After, so a client retries on another instance."""
    app.readiness.begin_shutdown()
    url = f"http://127.0.0.1:{app.http_port}/v1/images/generations"
    async with aiohttp.ClientSession() as http, http.post(url, json={"prompt": "x"}) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert (await resp.json())["error"]["code"] == "shutting_down"


async def test_edit_refuses_a_file_that_is_no_image(client: openai.AsyncOpenAI) -> None:
    """A file of no image format is a 400 naming `image`."""
    with pytest.raises(openai.BadRequestError) as caught:
        await client.images.edit(
            image=("notes.txt", b"hello", "text/plain"), prompt="x", size=TEST_SIZE
        )
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["param"] == "image"


def error_response(exc: errors.SiaError, request_id: str) -> web.Response:
    """The error answer, fields spelt as OpenAI's clients spell them."""
    return common.error_response(exc, request_id, OpenAIApi.PARAMS)


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (errors.InvalidArgument.field("max_images", "too many"), 400),
        (errors.Unauthenticated(), 401),
        (errors.ModelNotAllowed("m"), 403),
        (errors.TaskNotFound("t"), 404),
        (errors.RequestIdReused("r", "t"), 409),
        (errors.ModelUnavailable("off"), 400),
        (errors.ProviderMisconfigured("the upstream refused the server's key"), 503),
        (ImagesFailed("OutputImageSensitiveContentDetected", "moderated"), 400),
        (ImagesFailed("InvalidImage", "bad base64"), 502),
        (errors.ImageStoreUnavailable("the image store is unavailable"), 503),
        (errors.QueueFull(3), 429),
        (errors.ShuttingDown(), 503),
        (errors.DeadlineExceeded("late"), 504),
        (errors.ConfigError("secret path /etc/x"), 500),
    ],
)
def test_error_table(exc: errors.SiaError, status: int) -> None:
    """Each branch of the error tree gets its status; a 500 shows no internals."""
    assert status_of(exc)[0] == status
    response = error_response(exc, "rid")
    assert response.status == status
    assert response.body is not None
    assert isinstance(response.body, bytes)
    error = json.loads(response.body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if status == 500:
        assert "secret" not in error["message"]
    if status == 400 and isinstance(exc, errors.InvalidArgument):
        assert error["param"] == "n"
        assert error["message"] == "n: too many"  # spelt as the client spells it
    # After these the images may have been made and billed: OpenAI's SDKs must not resend.
    not_retried = status in (500, 502, 504) or isinstance(exc, errors.ImageStoreUnavailable)
    assert (response.headers.get("X-Should-Retry") == "false") == not_retried


def test_retry_after_rounds_up() -> None:
    """Retry-After is whole seconds, rounded up; none for a limit that never passes."""
    quota = errors.QuotaExceeded("key:a", "requests_per_minute", "1 per minute", 1.2)
    assert error_response(quota, "r").headers["Retry-After"] == "2"
    never = errors.QuotaExceeded("key:a", "images_per_day", "too many", float("inf"))
    assert "Retry-After" not in error_response(never, "r").headers
    assert error_response(errors.ShuttingDown(), "r").headers["Retry-After"] == "1"
