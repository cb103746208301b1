"""`sia.providers.http`: what an error answer of either provider becomes, and the helpers.

Every answer is pinned to its error class, its gRPC status and the number of
upstream requests it costs: a caller's mistake is answered after one request,
a transient failure is retried. The providers run over an in-process client.
"""

from __future__ import annotations

import base64
import os
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import structlog

from sia.domain import GeneratedImage, GenerationRequest, GenerationResult, OnImage
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
from sia.providers.ark import ArkProvider
from sia.providers.http import HttpProvider, client_request_id, decode_b64_image, with_retry_after
from sia.providers.openai import OpenAIProvider
from sia.providers.retry import RetryPolicy
from sia.rpc.errors import status_code_of
from tests.providers.arrivals import Arrivals
from tests.providers.scripted import Reply, ScriptedClient, json_reply, text_reply

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

MAX_RETRIES = 2
HTML_502 = "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"

INVALID = grpc.StatusCode.INVALID_ARGUMENT
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries follow at once, so retried cases cost no waiting."""
    monkeypatch.setattr(RetryPolicy, "delay", lambda *_: 0.0)


def ark_error(code: str, status: int) -> Reply:
    return json_reply({"error": {"code": code, "message": f"{code} happened"}}, status)


def openai_error(code: str, status: int) -> Reply:
    return json_reply({"error": {"code": code, "message": "x", "type": "y"}}, status)


#: (case, answer, error class, gRPC status, upstream requests: 3 is all of MAX_RETRIES + 1)
ARK_CASES = [
    ("unknown 400 code", ark_error("SomethingNew", 400), UpstreamRejected, INVALID, 1),
    ("plain-text 400", text_reply(400, "Bad Request"), UpstreamRejected, INVALID, 1),
    ("HTML 502", text_reply(502, HTML_502, "text/html"), UpstreamUnavailable, UNAVAILABLE, 3),
    ("unknown 503 code", ark_error("SomethingNew", 503), UpstreamUnavailable, UNAVAILABLE, 3),
    ("unknown 429 code", ark_error("SomethingNew", 429), UpstreamRateLimited, EXHAUSTED, 3),
    ("quota", ark_error("QuotaExceeded", 429), UpstreamQuotaExceeded, EXHAUSTED, 1),
    (
        "HTML 401",
        text_reply(401, "<html>401</html>", "text/html"),
        ProviderMisconfigured,
        PRECONDITION,
        1,
    ),
    ("unknown 404 code", ark_error("SomethingNew", 404), ProviderMisconfigured, PRECONDITION, 1),
    ("403 account", ark_error("AccessDenied", 403), ProviderMisconfigured, PRECONDITION, 1),
    # A model the account lacks fails that call only: the key is fine, readiness stays.
    ("model not open", ark_error("ModelNotOpen", 404), ModelUnavailable, PRECONDITION, 1),
    (
        "model not found",
        ark_error("InvalidEndpointOrModel.NotFound", 404),
        ModelUnavailable,
        PRECONDITION,
        1,
    ),
    (
        "model disabled",
        ark_error("InvalidEndpointOrModel.ModelIDAccessDisabled", 404),
        ModelUnavailable,
        PRECONDITION,
        1,
    ),
    ("200 not JSON", text_reply(200, "<html>ok</html>"), UpstreamUnavailable, UNAVAILABLE, 3),
    ("200 JSON list", json_reply([1, 2]), UpstreamUnavailable, UNAVAILABLE, 3),
    (
        "200 error only",
        json_reply({"error": {"code": "SomethingNew"}}),
        UpstreamUnavailable,
        UNAVAILABLE,
        3,
    ),
]

OPENAI_CASES = [
    ("unknown 400 code", openai_error("something_new", 400), UpstreamRejected, INVALID, 1),
    ("plain-text 400", text_reply(400, "Bad Request"), UpstreamRejected, INVALID, 1),
    ("HTML 502", text_reply(502, HTML_502, "text/html"), UpstreamUnavailable, UNAVAILABLE, 3),
    ("plain-text 408", text_reply(408, "timeout"), UpstreamUnavailable, UNAVAILABLE, 3),
    ("plain-text 429", text_reply(429, "slow down"), UpstreamRateLimited, EXHAUSTED, 3),
    ("quota", openai_error("insufficient_quota", 429), UpstreamQuotaExceeded, EXHAUSTED, 1),
    ("plain-text 401", text_reply(401, "no"), ProviderMisconfigured, PRECONDITION, 1),
    ("model not found", openai_error("model_not_found", 404), ModelUnavailable, PRECONDITION, 1),
    # The images of a 200 may be billed already: an unreadable one is not asked for again.
    ("200 not JSON", text_reply(200, "<html>ok</html>"), UpstreamUnavailable, UNAVAILABLE, 1),
    ("200 without data", json_reply({"created": 1}), UpstreamUnavailable, UNAVAILABLE, 1),
]


def _cases(provider: type[HttpProvider], cases: list[Any]) -> Iterator[Any]:
    for name, reply, error, status, calls in cases:
        yield pytest.param(provider, reply, error, status, calls, id=f"{provider.provider}-{name}")


def _request(provider: type[HttpProvider]) -> GenerationRequest:
    model = "gpt-image-1" if provider is OpenAIProvider else "doubao-seedream-4-0-250828"
    return GenerationRequest(prompt="a cat", model=model, size="1024x1024")


@pytest.mark.parametrize(
    ("provider", "reply", "error", "status", "calls"),
    [*_cases(ArkProvider, ARK_CASES), *_cases(OpenAIProvider, OPENAI_CASES)],
)
async def test_error_answer_class_status_and_upstream_calls(
    provider: type[HttpProvider],
    reply: Reply,
    error: type[SiaError],
    status: grpc.StatusCode,
    calls: int,
) -> None:
    """Each error answer raises its class, maps to its gRPC status, after so many requests."""
    client = ScriptedClient(reply)
    health: list[str | None] = []
    subject = provider(
        "http://up.invalid", "k", max_retries=MAX_RETRIES, client=client, on_health=health.append
    )
    with pytest.raises(SiaError) as caught:
        await subject.generate(_request(provider), timeout=30)
    exc = caught.value
    assert (type(exc).__name__, status_code_of(exc), len(client.sent)) == (
        error.__name__,
        status,
        calls,
    )
    assert exc.metadata["provider"] == provider.provider
    assert bool(health) == (error is ProviderMisconfigured)


@pytest.mark.parametrize(
    ("provider", "reply"),
    [
        (ArkProvider, ark_error("ModelNotOpen", 404)),
        (OpenAIProvider, openai_error("model_not_found", 404)),
    ],
)
async def test_a_model_the_account_lacks_names_the_model(
    provider: type[HttpProvider], reply: Reply
) -> None:
    """ModelUnavailable says which model, in its message and its metadata (ErrorInfo)."""
    request = _request(provider)
    subject = provider("http://up.invalid", "k", client=ScriptedClient(reply))
    with pytest.raises(ModelUnavailable) as caught:
        await subject.generate(request, timeout=30)
    assert caught.value.metadata["model"] == request.model
    assert request.model in caught.value.message
    assert caught.value.reason == "MODEL_NOT_ENABLED"


async def test_text_error_body_reaches_the_message() -> None:
    """A body that is not the API's error JSON is quoted (its start) in the error."""
    client = ScriptedClient(text_reply(400, "size must be 1K, 2K or 4K"))
    subject = ArkProvider("http://up.invalid", "k", client=client)
    with pytest.raises(UpstreamRejected) as caught:
        await subject.generate(_request(ArkProvider), timeout=30)
    assert "size must be 1K, 2K or 4K" in caught.value.message
    assert caught.value.metadata["upstream_code"] == "HTTP400"


def test_retry_after_is_kept_for_retried_errors_only() -> None:
    """Retry-After reaches rate limits (also for the caller) and failures, not final errors."""
    headers = {"Retry-After": "3"}
    limited = with_retry_after(UpstreamRateLimited("x"), headers)
    assert isinstance(limited, UpstreamRateLimited)
    assert (limited.upstream_retry_after, limited.retry_after) == (3.0, 3.0)
    failed = with_retry_after(UpstreamUnavailable("x"), {"Retry-After": "1.5"})
    assert isinstance(failed, UpstreamUnavailable)
    assert (failed.upstream_retry_after, failed.retry_after) == (1.5, 1.5)  # RetryInfo, exactly
    quota = with_retry_after(UpstreamQuotaExceeded("x"), headers)
    assert isinstance(quota, UpstreamQuotaExceeded)
    assert quota.retry_after is None
    bare = with_retry_after(UpstreamRateLimited("x"), {})
    assert isinstance(bare, UpstreamRateLimited)
    assert bare.upstream_retry_after is None
    assert bare.retry_after == UpstreamRateLimited.retry_after  # the class's own default


def test_client_request_id_is_the_bound_id_when_usable() -> None:
    """The request id, else the task id, else a fresh one for what a header cannot carry."""
    bound = REQUEST_ID.set("rid-1")
    try:
        assert client_request_id() == "rid-1"
    finally:
        REQUEST_ID.reset(bound)
    with structlog.contextvars.bound_contextvars(task_id="task-9"):
        assert client_request_id() == "task-9"
    for unusable in ("x" * 513, "naïve", "line\nbreak"):
        bound = REQUEST_ID.set(unusable)
        try:
            assert client_request_id() not in {unusable, ""}
        finally:
            REQUEST_ID.reset(bound)


def test_b64_images_decode_canonical_and_line_broken_base64() -> None:
    """Canonical base64 (the fast path) and base64 with line breaks give the same bytes."""
    data = os.urandom(300_001)
    text = base64.b64encode(data).decode()
    assert decode_b64_image(text) == data
    assert decode_b64_image(base64.encodebytes(data).decode()) == data  # 76-column lines


@pytest.mark.parametrize("text", ["abc", "not base64 at all!", "ab=c", "é" * 8])
def test_b64_images_refuse_what_is_not_base64(text: str) -> None:
    """Text that is not base64 raises ValueError (binascii.Error is one)."""
    with pytest.raises(ValueError):
        decode_b64_image(text)


class HalfwayProvider(HttpProvider):
    """Each attempt hands over one image, then fails in a way that is otherwise retried."""

    provider = "halfway"
    attempts = 0

    def encode_request(self, request: GenerationRequest) -> bytes:
        return b"{}"

    async def _attempt(
        self,
        request: GenerationRequest,
        body: bytes,
        headers: Mapping[str, str],
        on_image: OnImage,
    ) -> GenerationResult:
        self.attempts += 1
        await on_image(GeneratedImage(index=0, url="u0"))
        raise UpstreamUnavailable("lost after the first image")


async def test_an_attempt_that_handed_over_an_image_is_never_retried() -> None:
    """Whatever a provider's attempt raises once on_image has fired is final."""
    provider = HalfwayProvider("http://halfway.invalid", "k", client=ScriptedClient(Reply()))
    arrivals = Arrivals()
    with pytest.raises(UpstreamUnavailable) as caught:
        await provider.generate(_request(ArkProvider), timeout=30, on_image=arrivals)
    assert caught.value.final
    assert (provider.attempts, arrivals.indexes) == (1, [0])


async def test_an_on_image_error_keeps_readiness_and_its_own_traceback() -> None:
    """The callback's error is raised as is, not chained to anything of the provider's;
    the upstream answered, so a misconfiguration reported earlier is cleared."""
    health: list[str | None] = []
    answer = json_reply({"data": [{"url": "u0"}], "usage": {"generated_images": 1}})
    provider = ArkProvider(
        "http://ark.invalid", "k", client=ScriptedClient(answer), on_health=health.append
    )
    error = RuntimeError("the store is full")
    with pytest.raises(RuntimeError) as caught:
        await provider.generate(_request(ArkProvider), timeout=30, on_image=Arrivals(error))
    assert caught.value is error
    assert error.__cause__ is None
    assert error.__context__ is None
    assert health == [None]
