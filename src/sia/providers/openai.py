"""The `openai` provider: OpenAI's Images API (gpt-image-1, gpt-image-1-mini, DALL-E).

It follows the "OpenAI wire notes" of docs/providers.md:

- one `POST {IMAGE_BASE_URL}/v1/images/generations` per attempt, with the API
  key as a bearer token and our request id as `X-Client-Request-Id`;
- a group is one call with `n` images (OpenAI has no model-chosen group size),
  which come to the caller's `on_image` once the whole answer is read;
- gpt-image models always answer in base64 and reject `response_format`, so it
  is sent to DALL-E models only; `seed`, `guidance_scale` and `watermark` are
  not OpenAI parameters and are never sent;
- moderation and parameter errors are the caller's, credential and account
  errors are this server's (readiness hears of them), a model the account
  lacks (`model_not_found`) fails that call only, quota errors are final, and
  rate limits and server errors are retried.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import orjson
from PIL import Image, UnidentifiedImageError

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
from sia.models import ModelSpec, parse_dimensions
from sia.providers.http import (
    HttpProvider,
    bad_answer,
    decode_b64_image,
    deliver_all,
    error_object,
    json_object,
    with_retry_after,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sia.domain import GenerationRequest, OnImage


PATH = "/v1/images/generations"
PROVIDER = "openai"
#: What gpt-image models are asked for: lossless, and the API's own default.
OUTPUT_FORMAT = "png"

#: Error codes (or types) that mean the account's quota or billing limit is used up.
QUOTA_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached"})
#: Codes that mean the model asked for is not open to this account: that call fails only.
MODEL_CODES = frozenset({"model_not_found"})
#: OpenAI's parameter names, as the fields of our API that carry them.
PARAM_FIELDS = {"n": "max_images"}

_GPT_SIZES = {"1024x1024", "1536x1024", "1024x1536", "auto"}
_EXTENSIONS = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}


def _spec(model_id: str, name: str, sizes: set[str], *, sequential: bool = True) -> ModelSpec:
    return ModelSpec(
        id=model_id,
        name=name,
        default_size="1024x1024",
        only_sizes=frozenset(sizes),
        sequential=sequential,
        max_images=10,  # the API's limit on `n`
        # `n` is an exact, billed count (Ark's max_images is only a cap): keep the default small.
        default_max_images=4,
    )


#: The OpenAI image models, by id.
OPENAI_MODELS: Mapping[str, ModelSpec] = {
    spec.id: spec
    for spec in (
        _spec("gpt-image-1", "GPT Image 1", _GPT_SIZES),
        _spec("gpt-image-1-mini", "GPT Image 1 mini", _GPT_SIZES),
        _spec("dall-e-3", "DALL-E 3", {"1024x1024", "1792x1024", "1024x1792"}, sequential=False),
        _spec("dall-e-2", "DALL-E 2", {"256x256", "512x512", "1024x1024"}),
    )
}


class OpenAIProvider(HttpProvider):
    """ImageProvider for OpenAI's Images API."""

    provider = PROVIDER

    @property
    def models(self) -> Mapping[str, ModelSpec]:
        """gpt-image-1, gpt-image-1-mini, dall-e-3 and dall-e-2."""
        return OPENAI_MODELS

    def encode_request(self, request: GenerationRequest) -> bytes:
        """The JSON body OpenAI expects for `request`."""
        return orjson.dumps(request_body(request))

    async def _attempt(
        self,
        request: GenerationRequest,
        body: bytes,
        headers: Mapping[str, str],
        on_image: OnImage,
    ) -> GenerationResult:
        answer = await self._client.fetch(PATH, body, headers)
        if answer.status >= 400:
            raise upstream_error(
                answer.status,
                answer.body,
                answer.headers,
                secret=self._secret,
                model=request.model,
            )
        # The images of an unreadable answer may already be billed: do not pay for them twice.
        payload = json_object(answer.body, answer.status, PROVIDER, final=True)
        return await deliver_all(parse_result(payload, request), on_image)


def request_body(request: GenerationRequest) -> dict[str, Any]:
    """The JSON body OpenAI expects for `request`."""
    body: dict[str, Any] = {
        "model": request.model,
        "prompt": request.prompt,
        "n": request.max_images if request.sequential else 1,
        "size": request.size,
    }
    if request.model.startswith("gpt-image"):
        body["output_format"] = OUTPUT_FORMAT
    else:
        body["response_format"] = request.response_format.value
    return body


def parse_result(payload: Mapping[str, Any], request: GenerationRequest) -> GenerationResult:
    """The result of a successful answer."""
    items = payload.get("data")
    if not isinstance(items, list):
        raise bad_answer(PROVIDER, "it has no `data` list", final=True)
    size = next(
        (s for s in (str(payload.get("size") or ""), request.size) if parse_dimensions(s)), ""
    )
    images = tuple(_image(index, item, size) for index, item in enumerate(items))
    usage = payload.get("usage")
    tokens = usage.get("output_tokens") if isinstance(usage, dict) else None
    return GenerationResult(
        model=request.model,
        images=images,
        usage=Usage(
            generated_images=sum(1 for image in images if image.ok),
            output_tokens=tokens if isinstance(tokens, int) else 0,
        ),
    )


def _image(index: int, item: Any, size: str) -> GeneratedImage:
    if not isinstance(item, dict):
        return GeneratedImage(index=index, error=ImageError("BadResponse", "not an object"))
    if b64 := item.get("b64_json"):
        try:
            data = decode_b64_image(b64)
        except (ValueError, TypeError):
            return GeneratedImage(index=index, error=ImageError("BadResponse", "bad base64"))
        return GeneratedImage(
            index=index, data=data, size=size or image_size(data), content_type=sniff(data)
        )
    if url := item.get("url"):
        url = str(url)
        path = url.partition("?")[0].lower()
        kind = next((t for ext, t in _EXTENSIONS.items() if path.endswith(ext)), "image/png")
        return GeneratedImage(index=index, url=url, size=size, content_type=kind)
    return GeneratedImage(index=index, error=ImageError("BadResponse", "no b64_json or url"))


def sniff(data: bytes) -> str:
    """The content type of image bytes by their magic number ("" when unknown)."""
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return ""


def image_size(data: bytes) -> str:
    """`WxH` read from the image header (Pillow decodes no pixels for this), or ""."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        return ""
    return f"{width}x{height}"


def upstream_error(
    status: int, raw: bytes, headers: Mapping[str, str], *, secret: str = "", model: str = ""
) -> SiaError:
    """The error-tree exception for an OpenAI error answer to a request for `model`;
    `secret` is masked in messages."""
    error = error_object(raw)
    code = str(error.get("code") or "")
    kind = str(error.get("type") or "")
    message = str(error.get("message") or "").strip() or f"HTTP {status}"
    if secret:  # an upstream message must never carry our key on to a client or a log
        message = message.replace(secret, "***")
    meta = {
        "provider": PROVIDER,
        "upstream_code": code or str(status),
        "upstream_request_id": headers.get("x-request-id", ""),
    }
    if code in QUOTA_CODES or kind in QUOTA_CODES:
        return UpstreamQuotaExceeded(
            f"the openai account's quota or billing limit is used up ({code or kind}): {message}",
            metadata=meta,
        )
    if code in MODEL_CODES:
        return ModelUnavailable(
            f"the model {model!r} is not available to this server's openai account ({code}); "
            "ask for another model, or the operator to enable this one",
            metadata={**meta, "model": model},
        )
    if status in (401, 403, 404):  # a 404 without a model code: a wrong IMAGE_BASE_URL
        what = "IMAGE_BASE_URL" if status == 404 else "credentials or account"
        return ProviderMisconfigured(
            f"the openai provider refused this server's {what}: {message} "
            "(the server is misconfigured; not your request)",
            metadata=meta,
        )
    if status == 429:
        limited = UpstreamRateLimited(
            f"the openai provider is rate limiting this service ({code or status}); retry later",
            metadata=meta,
        )
        return with_retry_after(limited, headers)
    if 400 <= status < 500 and status != 408:
        if content_refused(code):
            return UpstreamRejected(
                "prompt",
                f"rejected by the provider's safety system ({code}): {message}",
                metadata=meta,
            )
        param = str(error.get("param") or "prompt")
        return UpstreamRejected(
            PARAM_FIELDS.get(param, param),
            f"rejected by the provider ({code or status}): {message}",
            metadata=meta,
        )
    failed = UpstreamUnavailable(
        f"the openai provider failed (HTTP {status}, {code or kind or 'no code'}); retry later",
        metadata=meta,
    )
    return with_retry_after(failed, headers)
