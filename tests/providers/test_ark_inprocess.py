"""The ark provider's wire behaviour through an in-process HTTP client (no sockets).

Each test hands `ArkProvider` a `ScriptedClient` and checks what it sends and
how it reads what comes back; tests/providers/test_ark.py runs the same
provider over real HTTP against the fake Ark.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from PIL import Image

from sia.domain import GenerationRequest, ResponseFormat
from sia.errors import UpstreamRateLimited, UpstreamUnavailable
from sia.logs import REQUEST_ID
from sia.providers.ark import PATH, ArkProvider
from sia.providers.retry import RetryPolicy
from tests.providers.arrivals import Arrivals
from tests.providers.scripted import Reply, ScriptedClient, json_reply, sse_reply

KEY = "ark-inprocess-key-81c2"
TIMEOUT = 30.0
SEEDREAM_4 = "doubao-seedream-4-0-250828"


def ark(client: ScriptedClient, *, max_retries: int = 2) -> ArkProvider:
    """An Ark provider sending through `client`."""
    return ArkProvider("http://ark.invalid", KEY, max_retries=max_retries, client=client)


def request(prompt: str = "a cat", **fields: Any) -> GenerationRequest:
    values: dict[str, Any] = {"model": SEEDREAM_4, "size": "2K", **fields}
    return GenerationRequest(prompt=prompt, **values)


def png(width: int = 8, height: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(buf, format="PNG")
    return buf.getvalue()


def single(**item: Any) -> Reply:
    """Ark's answer with one image."""
    return json_reply(
        {
            "model": SEEDREAM_4,
            "created": 1,
            "data": [{"size": "2048x2048", **item}],
            "usage": {"generated_images": 1, "output_tokens": 16384, "total_tokens": 16384},
        }
    )


async def test_single_image_request_and_answer() -> None:
    """One POST with Ark's fields, our key and request id; the URL comes back with its size."""
    client = ScriptedClient(single(url="https://ark.invalid/a.jpeg"))
    provider = ark(client)
    bound = REQUEST_ID.set("rid-ark-1")
    try:
        result = await provider.generate(request(watermark=False, seed=5), timeout=TIMEOUT)
    finally:
        REQUEST_ID.reset(bound)
    [sent] = client.sent
    assert sent.path == PATH == "/api/v3/images/generations"
    assert sent.body == {
        "model": SEEDREAM_4,
        "prompt": "a cat",
        "size": "2K",
        "response_format": "url",
        "watermark": False,
        "sequential_image_generation": "disabled",
    }  # no seed: Seedream 4.0 does not take one
    assert sent.headers == {"Authorization": f"Bearer {KEY}", "X-Client-Request-Id": "rid-ark-1"}
    [image] = result.images
    assert (image.url, image.size, image.content_type) == (
        "https://ark.invalid/a.jpeg",
        "2048x2048",
        "image/jpeg",
    )
    assert (result.model, result.usage.generated_images, result.usage.output_tokens) == (
        SEEDREAM_4,
        1,
        16384,
    )


async def test_b64_image_is_decoded_and_sniffed() -> None:
    """A b64_json answer becomes the image's bytes with their content type."""
    data = png()
    client = ScriptedClient(single(b64_json=base64.b64encode(data).decode()))
    result = await ark(client).generate(
        request(response_format=ResponseFormat.B64_JSON), timeout=TIMEOUT
    )
    assert client.sent[0].body["response_format"] == "b64_json"
    [image] = result.images
    assert (image.data, image.content_type, image.url) == (data, "image/png", "")


async def test_references_one_as_string_several_as_list() -> None:
    """One reference image is sent as a string, several as a list."""
    client = ScriptedClient(single(url="u"))
    provider = ark(client)
    await provider.generate(request(images=("https://x.invalid/a.png",)), timeout=TIMEOUT)
    await provider.generate(request(images=("https://x.invalid/a.png", "b")), timeout=TIMEOUT)
    assert [s.body["image"] for s in client.sent] == [
        "https://x.invalid/a.png",
        ["https://x.invalid/a.png", "b"],
    ]


def event(kind: str, index: int, **fields: Any) -> dict[str, Any]:
    return {"type": f"image_generation.{kind}", "model": SEEDREAM_4, "image_index": index, **fields}


async def test_streamed_group_keeps_a_moderated_image_as_an_error() -> None:
    """A group is one streamed call; its events, cut anywhere, give images in order."""
    failed = {"code": "OutputImageSensitiveContentDetected", "message": "moderated"}
    client = ScriptedClient(
        sse_reply(
            event("partial_succeeded", 0, url="https://ark.invalid/0.jpeg", size="2048x2048"),
            event("partial_failed", 1, error=failed),
            event("partial_succeeded", 2, url="https://ark.invalid/2.jpeg", size="2048x2048"),
            {"type": "image_generation.completed", "usage": {"generated_images": 2}},
            "[DONE]",
        )
    )
    result = await ark(client).generate(request(max_images=3), timeout=TIMEOUT)
    [sent] = client.sent
    assert sent.body["stream"] is True
    assert sent.body["sequential_image_generation"] == "auto"
    assert sent.body["sequential_image_generation_options"] == {"max_images": 3}
    assert [i.index for i in result.images] == [0, 1, 2]
    assert [i.url for i in result.images] == [
        "https://ark.invalid/0.jpeg",
        "",
        "https://ark.invalid/2.jpeg",
    ]
    assert result.images[1].error is not None
    assert result.images[1].error.code == "OutputImageSensitiveContentDetected"
    assert result.usage.generated_images == 2


async def test_group_broken_after_an_image_keeps_it_and_is_not_retried() -> None:
    """A connection lost after the first image ends the group with that image, in one call."""
    client = ScriptedClient(
        sse_reply(event("partial_succeeded", 0, url="u0", size="2048x2048"), broken=True)
    )
    result = await ark(client).generate(request(max_images=3), timeout=TIMEOUT)
    assert [i.url for i in result.images] == ["u0"]
    assert len(client.sent) == 1


async def test_stream_error_before_any_image_is_retried() -> None:
    """An error event before the first image fails the attempt, which is retried."""
    error = {"error": {"code": "InternalServiceError", "message": "oops"}}
    good = sse_reply(event("partial_succeeded", 0, url="u0", size="2048x2048"), "[DONE]")
    client = ScriptedClient(sse_reply(error), good)
    result = await ark(client).generate(request(max_images=2), timeout=TIMEOUT)
    assert [i.url for i in result.images] == ["u0"]
    assert len(client.sent) == 2


async def test_rate_limit_waits_retry_after_with_the_same_request_id() -> None:
    """A 429 with Retry-After: 0 is retried at once, under the same client request id."""
    limited = json_reply({"error": {"code": "ServerOverloaded"}}, 429, Retry_After="0")
    client = ScriptedClient(limited, single(url="u"))
    result = await ark(client).generate(request(), timeout=TIMEOUT)
    assert result.images[0].url == "u"
    first, second = client.sent
    assert first.headers["X-Client-Request-Id"] == second.headers["X-Client-Request-Id"]


async def test_rate_limit_every_time_passes_retry_after_on() -> None:
    """A 429 on every attempt is UpstreamRateLimited carrying the upstream's Retry-After."""
    limited = json_reply({"error": {"code": "ServerOverloaded"}}, 429, Retry_After="0")
    client = ScriptedClient(limited)
    with pytest.raises(UpstreamRateLimited) as caught:
        await ark(client, max_retries=2).generate(request(), timeout=TIMEOUT)
    assert caught.value.upstream_retry_after == 0
    assert caught.value.retry_after == 0.001
    assert len(client.sent) == 3


async def test_unreachable_upstream_is_retried_then_unavailable() -> None:
    """A connection that cannot be made is retried, then UpstreamUnavailable."""
    client = ScriptedClient(Reply(unreachable=True))
    with pytest.raises(UpstreamUnavailable):
        await ark(client, max_retries=1).generate(request(), timeout=TIMEOUT)
    assert len(client.sent) == 2


async def test_aclose_closes_the_client_it_was_given() -> None:
    """The provider owns the client it was handed."""
    client = ScriptedClient(single(url="u"))
    provider = ark(client)
    await provider.aclose()
    assert client.closed
    assert KEY not in repr(provider)


# on_image: each image as the attempt has it, never from an attempt that is retried.


def two_images() -> Reply:
    return sse_reply(
        event("partial_succeeded", 0, url="u0", size="2048x2048"),
        event("partial_succeeded", 1, url="u1", size="2048x2048"),
        {"type": "image_generation.completed", "usage": {"generated_images": 2}},
        "[DONE]",
    )


async def test_on_image_never_fires_for_a_retried_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attempts that fail before any image (an error event, a 500) deliver nothing;
    the attempt that succeeds delivers each image once."""
    monkeypatch.setattr(RetryPolicy, "delay", lambda *_: 0.0)
    error_event = sse_reply({"error": {"code": "InternalServiceError", "message": "oops"}})
    server_error = json_reply({"error": {"code": "InternalServiceError"}}, 500)
    client = ScriptedClient(error_event, server_error, two_images())
    arrivals = Arrivals()
    result = await ark(client).generate(request(max_images=2), timeout=TIMEOUT, on_image=arrivals)
    assert len(client.sent) == 3
    assert arrivals.indexes == [0, 1]
    assert arrivals.images == list(result.images)


async def test_after_a_streamed_image_the_attempt_is_final() -> None:
    """An error event, a broken connection or an unreadable event after the first image
    is never retried: the image already went to on_image."""
    image = event("partial_succeeded", 0, url="u0", size="2048x2048")
    error = {"error": {"code": "InternalServiceError", "message": "oops"}}
    for reply in (sse_reply(image, error), sse_reply(image, broken=True)):
        client = ScriptedClient(reply, two_images())
        arrivals = Arrivals()
        result = await ark(client).generate(
            request(max_images=3), timeout=TIMEOUT, on_image=arrivals
        )
        assert [i.url for i in result.images] == ["u0"]
        assert (arrivals.images, len(client.sent)) == (list(result.images), 1)
    client = ScriptedClient(sse_reply(image, "{not json"), two_images())
    arrivals = Arrivals()
    with pytest.raises(UpstreamUnavailable) as caught:
        await ark(client).generate(request(max_images=3), timeout=TIMEOUT, on_image=arrivals)
    assert caught.value.final
    assert (arrivals.indexes, len(client.sent)) == ([0], 1)


async def test_on_image_gets_the_images_of_a_whole_answer_in_order() -> None:
    """A single image, and a group answered as one JSON body, reach on_image by index."""
    arrivals = Arrivals()
    result = await ark(ScriptedClient(single(url="u"))).generate(
        request(), timeout=TIMEOUT, on_image=arrivals
    )
    assert arrivals.images == list(result.images) == [result.images[0]]
    failed = {"error": {"code": "OutputImageSensitiveContentDetected", "message": "m"}}
    whole = json_reply({"model": SEEDREAM_4, "data": [{"url": "u0"}, failed, {"url": "u2"}]})
    arrivals = Arrivals()
    result = await ark(ScriptedClient(whole)).generate(
        request(max_images=3), timeout=TIMEOUT, on_image=arrivals
    )
    assert arrivals.indexes == [0, 1, 2]
    assert arrivals.images == list(result.images)
    assert [i.ok for i in arrivals.images] == [True, False, True]


@pytest.mark.parametrize(
    "error",
    [RuntimeError("the store is full"), UpstreamUnavailable("the store is unreachable")],
    ids=["foreign", "retryable"],
)
@pytest.mark.parametrize("streamed", [True, False], ids=["stream", "json"])
async def test_what_on_image_raises_ends_the_generation_as_is(
    error: Exception, streamed: bool
) -> None:
    """The callback's own error comes out of generate unchanged: not retried, and not
    taken for a broken stream whose images are kept."""
    client = ScriptedClient(two_images() if streamed else single(url="u"))
    arrivals = Arrivals(error=error)
    with pytest.raises(type(error)) as caught:
        await ark(client).generate(
            request(max_images=2 if streamed else None), timeout=TIMEOUT, on_image=arrivals
        )
    assert caught.value is error
    assert not getattr(error, "final", False)
    assert (arrivals.indexes, len(client.sent)) == ([0], 1)
