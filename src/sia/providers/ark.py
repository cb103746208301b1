"""The `ark` provider: Volcengine Ark's image generation API (Seedream, SeedEdit).

It follows the "Ark wire notes" of docs/providers.md field by field:

- one `POST {IMAGE_BASE_URL}/api/v3/images/generations` per attempt, with the
  API key as a bearer token and our request id as `X-Client-Request-Id`;
- `seed` and `guidance_scale` only for the models that take them, `watermark`
  only when the caller set it, `image` as a string for one reference and a
  list for several;
- sequential groups use `stream: true` and are assembled from the
  `partial_succeeded`, `partial_failed` and `completed` events, so one
  moderated image does not cost the others (the official SDK stops there);
  each image goes to the caller's `on_image` as its event arrives;
- every documented error code maps to one class of the error tree; rate
  limits and server errors are retried (never once a streamed image has
  arrived), and credential or account errors mark the provider unfit for
  readiness until a later call succeeds; a model the account has not enabled
  fails that call only (any client may ask for any catalogue model).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import orjson

from sia.domain import GeneratedImage, GenerationResult, ImageError, Usage
from sia.errors import (
    ModelUnavailable,
    ProviderMisconfigured,
    SiaError,
    UpstreamQuotaExceeded,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamUnavailable,
    content_refused,
)
from sia.logs import get_logger
from sia.models import ARK_MODELS, parse_dimensions
from sia.providers.http import (
    HttpProvider,
    bad_answer,
    decode_b64_image,
    deliver_all,
    error_object,
    json_object,
    with_retry_after,
)
from sia.providers.sse import SSEParser

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping

    from sia.domain import GenerationRequest, OnImage
    from sia.models import ModelSpec

log = get_logger("sia.providers.ark")

PATH = "/api/v3/images/generations"
PROVIDER = "ark"

#: 429 codes that mean a quota or spending limit, not a rate: retrying will not help.
QUOTA_CODES = frozenset({"QuotaExceeded", "SetLimitExceeded"})
#: 429 codes besides the `*RateLimitExceeded*` family; all are retried.
RATE_CODES = frozenset({"RequestBurstTooFast", "ServerOverloaded"})
#: Code prefixes of the 400s that reject a parameter.
PARAMETER_CODES = ("MissingParameter", "InvalidParameter")
#: Code prefixes that mean the model (or endpoint) asked for is not open to this account:
#: that call fails, the instance stays ready.
MODEL_CODES = ("InvalidEndpointOrModel", "ModelNotOpen", "InvalidEndpoint.ClosedEndpoint")
#: HTTP statuses and codes that mean this server's own key or account was refused.
MISCONFIGURED_STATUSES = frozenset({401, 403, 404})
MISCONFIGURED_CODES = (
    "AuthenticationError",
    "AccountOverdueError",
    "AccessDenied",
    "OperationDenied",
)
#: Ark's parameter names, as the fields of our API that carry them.
PARAM_FIELDS = {"image": "images", "sequential_image_generation_options": "max_images"}

_REQUEST_ID_IN_MESSAGE = re.compile(r"request id:\s*([\w-]+)", re.IGNORECASE)


class ArkProvider(HttpProvider):
    """ImageProvider for Volcengine Ark."""

    provider = PROVIDER

    @property
    def models(self) -> Mapping[str, ModelSpec]:
        """Seedream 4.0, 4.5, 3.0 and SeedEdit 3.0."""
        return ARK_MODELS

    def encode_request(self, request: GenerationRequest) -> bytes:
        """The JSON body Ark expects for `request`."""
        return orjson.dumps(request_body(request, self.models[request.model]))

    async def _attempt(
        self,
        request: GenerationRequest,
        body: bytes,
        headers: Mapping[str, str],
        on_image: OnImage,
    ) -> GenerationResult:
        # One path for single images and groups: a group answers text/event-stream, and
        # a single image may too (tolerated), so the body is read as the answer says.
        async with self._client.stream(PATH, body, headers) as answer:
            if answer.status >= 400:
                raw = await answer.read()
                raise upstream_error(answer.status, raw, answer.headers, model=request.model)
            if answer.content_type == "text/event-stream":
                return await _read_stream(answer.chunks(), answer.headers, request, on_image)
            payload = json_object(await answer.read(), answer.status, PROVIDER, final=False)
        # The connection is back in the pool before the caller sees the images.
        return await deliver_all(parse_result(payload, request), on_image)


def request_body(request: GenerationRequest, spec: ModelSpec) -> dict[str, Any]:
    """The JSON body Ark expects for `request` (docs/providers.md, "Ark wire notes")."""
    body: dict[str, Any] = {
        "model": request.model,
        "prompt": request.prompt,
        "size": request.size,
        "response_format": request.response_format.value,
    }
    if request.images:
        body["image"] = request.images[0] if len(request.images) == 1 else list(request.images)
    if request.watermark is not None:
        body["watermark"] = request.watermark
    if spec.seed and request.seed is not None:
        body["seed"] = request.seed
    if spec.guidance_scale and request.guidance_scale is not None:
        body["guidance_scale"] = request.guidance_scale
    if request.sequential:
        body["sequential_image_generation"] = "auto"
        body["sequential_image_generation_options"] = {"max_images": request.max_images}
        body["stream"] = True
    elif spec.sequential:
        body["sequential_image_generation"] = "disabled"
    return body


def parse_result(payload: Mapping[str, Any], request: GenerationRequest) -> GenerationResult:
    """The result of a non-streamed answer; a top-level error without images raises."""
    items = payload.get("data") or []
    if not items and isinstance(payload.get("error"), dict):
        raise _from_error_body(200, payload["error"], "", request.model)
    images = tuple([_image(index, item) for index, item in enumerate(items)])
    return GenerationResult(
        model=str(payload.get("model") or request.model),
        images=images,
        usage=_usage(payload.get("usage"), images),
    )


async def _read_stream(
    chunks: AsyncIterator[bytes],
    headers: Mapping[str, str],
    request: GenerationRequest,
    on_image: OnImage,
) -> GenerationResult:
    """Assemble a group from SSE events, awaiting `on_image` with each image as it arrives.

    Errors after the first image are not retried: that image is already the
    caller's (and billed).
    """
    parser = SSEParser()
    images: dict[int, GeneratedImage] = {}
    usage: Mapping[str, Any] | None = None
    model = request.model

    async def handle(data: str) -> bool:
        """Apply one event's data; True when the stream is over."""
        nonlocal usage, model
        if data.strip() == "[DONE]":
            return True
        event = orjson.loads(data)
        model = str(event.get("model") or model)
        kind = event.get("type", "")
        if kind.endswith(("partial_succeeded", "partial_failed")):
            index = int(event.get("image_index", len(images)))
            image = images[index] = _image(index, event)
            await on_image(image)
        elif kind.endswith("completed"):
            usage = event.get("usage") or {}
        elif isinstance(event.get("error"), dict):
            if not images:
                request_id = headers.get("X-Request-Id", "")
                raise _from_error_body(500, event["error"], request_id, request.model)
            log.warning("ark_stream_error", images_received=len(images), error=event["error"])
            return True  # keep the images already paid for; never retry a started group
        return False

    try:
        done = False
        async for chunk in chunks:
            for event in parser.feed(chunk):
                if event.data and await handle(event.data):
                    done = True
                    break  # nothing after the end reaches the caller
            if done:
                break
        else:
            for event in parser.close():
                if event.data:
                    await handle(event.data)
    except UpstreamUnavailable as exc:
        if not images:
            raise
        # The connection broke mid-group: keep what arrived rather than pay for it twice.
        log.warning(
            "ark_stream_broken",
            images_received=len(images),
            error=exc.metadata.get("upstream_code", ""),
        )
    except orjson.JSONDecodeError as exc:
        raise bad_answer(PROVIDER, "a stream event is not JSON", final=bool(images)) from exc
    if not images:
        raise bad_answer(PROVIDER, "the stream ended without images", final=False)
    ordered = tuple(images[i] for i in sorted(images))
    return GenerationResult(model=model, images=ordered, usage=_usage(usage, ordered))


def _image(index: int, item: Mapping[str, Any]) -> GeneratedImage:
    error = item.get("error")
    if isinstance(error, dict):
        return GeneratedImage(
            index=index,
            error=ImageError(str(error.get("code", "Unknown")), str(error.get("message", ""))),
        )
    size = str(item.get("size") or "")
    if b64 := item.get("b64_json"):
        try:
            data = decode_b64_image(b64)
        except (ValueError, TypeError):
            return GeneratedImage(index=index, error=ImageError("InvalidImage", "bad base64"))
        return GeneratedImage(index=index, data=data, size=size, content_type=_sniff(data))
    return GeneratedImage(
        index=index, url=str(item.get("url", "")), size=size, content_type="image/jpeg"
    )


def _sniff(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "image/jpeg"  # Ark's output format


def _usage(raw: Any, images: tuple[GeneratedImage, ...]) -> Usage:
    """Usage as reported, or computed as Ark bills it (sum of w*h / 256) when missing."""
    if isinstance(raw, dict) and "generated_images" in raw:
        return Usage(int(raw.get("generated_images", 0)), int(raw.get("output_tokens", 0)))
    ok = [image for image in images if image.ok]
    pixels = sum(w * h for w, h in filter(None, (parse_dimensions(i.size) for i in ok)))
    return Usage(len(ok), pixels // 256)


def upstream_error(
    status: int, raw: bytes, headers: Mapping[str, str], *, model: str = ""
) -> SiaError:
    """The error-tree exception for an Ark error answer to a request for `model`
    (docs/providers.md, "Ark wire notes")."""
    error = error_object(raw, code=f"HTTP{status}")
    exc = _from_error_body(status, error, headers.get("X-Request-Id", ""), model)
    return with_retry_after(exc, headers)


def _from_error_body(
    status: int, error: Mapping[str, Any], request_id: str, model: str = ""
) -> SiaError:
    """Classify by the error code first (the status is a fallback), as the spec's table does."""
    code = str(error.get("code") or f"HTTP{status}")
    message = str(error.get("message") or "").strip()
    if not request_id and (found := _REQUEST_ID_IN_MESSAGE.search(message)):
        request_id = found.group(1)
    meta = {"provider": PROVIDER, "upstream_code": code, "upstream_request_id": request_id}
    if code in QUOTA_CODES:
        return UpstreamQuotaExceeded(
            f"the ark account's quota or spending limit is used up ({code}): {message}",
            metadata=meta,
        )
    if status == 429 or "RateLimitExceeded" in code or code in RATE_CODES:
        return UpstreamRateLimited(
            f"the ark provider is rate limiting this service ({code}); retry later",
            metadata=meta,
        )
    if code.startswith(MODEL_CODES):
        return ModelUnavailable(
            f"the model {model!r} is not available to this server's ark account ({code}); "
            "ask for another model, or the operator to enable this one",
            metadata={**meta, "model": model},
        )
    if status in MISCONFIGURED_STATUSES or code.startswith(MISCONFIGURED_CODES):
        return ProviderMisconfigured(
            f"the server is misconfigured: the ark provider refused its credentials or "
            f"account ({code}); this is not a problem with your request",
            metadata=meta,
        )
    if content_refused(code):
        field = "images" if code.startswith("InputImage") else "prompt"
        return UpstreamRejected(
            field, f"rejected by the provider's content check ({code}): {message}", metadata=meta
        )
    if status == 400 or code.startswith(PARAMETER_CODES):
        param = str(error.get("param") or code.partition(".")[2] or "request")
        return UpstreamRejected(
            PARAM_FIELDS.get(param, param),
            f"rejected by the provider ({code}): {message}",
            metadata=meta,
        )
    return UpstreamUnavailable(
        f"the ark provider failed (HTTP {status}, {code}); retry later", metadata=meta
    )
