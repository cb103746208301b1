"""A fake OpenAI Images API server: the real wire format over real HTTP.

Tests run the `openai` provider against it. It follows the OpenAI wire notes
of docs/providers.md for `POST /v1/images/generations` (no streaming, no edits)
and checks requests against `sia.providers.openai.OPENAI_MODELS`; the server,
the request log and scripting are `fake_upstream`'s.

    async with FakeOpenAI(api_key="test-key") as fake:   # binds 127.0.0.1, port 0
        fake.base_url                                     # "http://127.0.0.1:<port>"
        fake.requests[-1].body                            # the request log

Images are real solid-colour pictures at the size reported: PNG (or the
`output_format` asked for) in base64 for gpt-image models; for DALL-E a URL
on the fake itself (`GET /images/<name>.png`) or base64 per `response_format`.
Every response carries `x-request-id`. Unknown parameters are refused, as the
real API does, so a client sending `seed` or `watermark` finds out.

Trigger words in the prompt script an outcome:

    [error:CODE]      fail with CODE of `ERRORS` (its status, type and message)
    [retry-after:S]   add `Retry-After: S` to that error response
    [latency:S]       answer after S seconds (else `fake.latency`)

`fake.script(*outcomes)` queues outcomes (`FakeOK`, `FakeError`, "ok" or an
error code), one taken by each request that passes the key check and
validation; they override the trigger words. The log `fake.requests` holds a
`RecordedRequest` per generation call, its `outcome` one of "ok",
"error:<code>", "client_disconnected" or "cancelled".
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from aiohttp import web
from PIL import Image

from sia.models import parse_dimensions
from sia.providers.openai import OPENAI_MODELS
from sia.testing import fake_upstream
from sia.testing.fake_upstream import (
    DEFAULT_API_KEY,
    TRIGGER_ERROR,
    TRIGGER_LATENCY,
    TRIGGER_RETRY_AFTER,
    FakeUpstream,
    Plan,
    RecordedRequest,
    Reject,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from typing_extensions import Unpack

    from sia.models import ModelSpec
    from sia.testing.fake_upstream import Outcome, ServerOptions

__all__ = [
    "DEFAULT_API_KEY",
    "ERRORS",
    "GENERATIONS_PATH",
    "TRIGGER_ERROR",
    "TRIGGER_LATENCY",
    "TRIGGER_RETRY_AFTER",
    "FakeError",
    "FakeOK",
    "FakeOpenAI",
    "error_status",
    "render",
]

GENERATIONS_PATH = "/v1/images/generations"

#: The error codes the fake can be told to answer with: HTTP status, `type` and message.
ERRORS: Mapping[str, tuple[int, str, str]] = {
    "content_policy_violation": (
        400,
        "invalid_request_error",
        "Your request was rejected as a result of our safety system. Your prompt may contain "
        "text that is not allowed by our safety system.",
    ),
    "moderation_blocked": (
        400,
        "image_generation_user_error",
        "Your request was rejected by the safety system.",
    ),
    "invalid_value": (400, "invalid_request_error", "Invalid value."),
    "billing_hard_limit_reached": (
        400,
        "invalid_request_error",
        "Billing hard limit has been reached",
    ),
    "invalid_api_key": (401, "invalid_request_error", "Incorrect API key provided."),
    "unsupported_country_region_territory": (
        403,
        "request_forbidden",
        "Country, region, or territory not supported",
    ),
    "model_not_found": (
        404,
        "invalid_request_error",
        "The model does not exist or you do not have access to it.",
    ),
    "rate_limit_exceeded": (429, "requests", "Rate limit reached for images per minute."),
    "insufficient_quota": (
        429,
        "insufficient_quota",
        "You exceeded your current quota, please check your plan and billing details.",
    ),
    "server_error": (
        500,
        "server_error",
        "The server had an error while processing your request. Sorry about that!",
    ),
}

_COMMON = frozenset({"model", "prompt", "n", "size", "quality", "user"})
_GPT_PARAMS = _COMMON | {"background", "moderation", "output_format", "output_compression"}
_DALLE_PARAMS = _COMMON | {"response_format", "style"}
_QUALITIES = {
    "gpt": {"auto", "low", "medium", "high"},
    "dall-e-3": {"standard", "hd"},
    "dall-e-2": {"standard"},
}
_MAX_PROMPT = {"gpt": 32000, "dall-e-3": 4000, "dall-e-2": 1000}
_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def error_status(code: str) -> int | None:
    """The HTTP status of an OpenAI error code of `ERRORS`; None if unknown."""
    known = ERRORS.get(code)
    return None if known is None else known[0]


@dataclass(frozen=True, slots=True)
class FakeOK:
    """Answer normally, after `latency` seconds if given."""

    latency: float | None = None


class _Reject(Reject):
    """The request fails with an OpenAI error body."""

    fallback_status = 400
    status_of = staticmethod(error_status)

    @staticmethod
    def message_of(code: str) -> str | None:
        known = ERRORS.get(code)
        return None if known is None else known[2]


class FakeError(fake_upstream.FakeError):
    """Fail with an error code of `ERRORS` (or another one given its `status`)."""

    __slots__ = ()
    reject = _Reject


@dataclass(frozen=True, slots=True)
class _Job:
    prompt: str
    family: str  # "gpt", "dall-e-3" or "dall-e-2"
    n: int
    width: int
    height: int
    fmt: str
    b64: bool
    quality: str


@functools.lru_cache(maxsize=64)
def render(width: int, height: int, fmt: str = "png") -> tuple[bytes, str]:
    """A solid-colour image of that size and format, and its base64 text (rendered once)."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (40, 120, 200)).save(buf, _FORMATS[fmt])
    data = buf.getvalue()
    return data, base64.b64encode(data).decode()


def _mask(key: str) -> str:
    """A key as OpenAI quotes it back: the ends kept, the middle starred."""
    return key[:3] + "*" * (len(key) - 7) + key[-4:] if len(key) > 10 else "*" * len(key)


class FakeOpenAI(FakeUpstream[Plan]):
    """The fake OpenAI images server: the shared core plus OpenAI's checks and answers."""

    generations_path = GENERATIONS_PATH
    request_id_header = "x-request-id"
    name = "fake-openai"
    bad_trigger_code = "invalid_value"
    error_type = FakeError
    named_outcomes: ClassVar[Mapping[str, Callable[[], Outcome]]] = {"ok": FakeOK}

    def __init__(
        self,
        *,
        models: Mapping[str, ModelSpec] = OPENAI_MODELS,
        **options: Unpack[ServerOptions],
    ) -> None:
        super().__init__(**options)
        self.models = models
        self.app.router.add_get("/images/{name}", self._download)

    def _new_request_id(self) -> str:
        return "req_" + secrets.token_hex(16)

    def _new_plan(self) -> Plan:
        return Plan()

    def _error_response(self, record: RecordedRequest, exc: Reject) -> web.Response:
        kind = ERRORS.get(exc.code or "", (0, "invalid_request_error", ""))[1]
        error = {"message": exc.args[0], "type": kind, "param": exc.param, "code": exc.code}
        headers = self._headers(record, exc.retry_after)
        return web.json_response({"error": error}, status=exc.status, headers=headers)

    async def _download(self, request: web.Request) -> web.Response:
        dims = parse_dimensions(request.match_info["name"].removesuffix(".png").rpartition("-")[2])
        if dims is None or max(dims) > 4096:
            return web.Response(status=404, text="BlobNotFound")
        self.downloads += 1
        return web.Response(body=render(*dims)[0], content_type="image/png")

    async def _generate(self, request: web.Request, record: RecordedRequest) -> web.Response:
        key = self._refused_key(request)
        if key is not None:
            if not key:
                raise _Reject(None, "You didn't provide an API key.", status=401)
            raise _Reject("invalid_api_key", f"Incorrect API key provided: {_mask(key)}.")
        try:
            record.body = json.loads(await request.read())
        except ValueError:
            raise _Reject(None, "We could not parse the JSON body of your request.") from None
        job = self._validate(record.body)
        plan = await self._plan(job.prompt)
        await asyncio.sleep(self.latency if plan.latency is None else plan.latency)
        record.images = job.n
        self.images_generated += job.n
        self._succeeded(record)
        return web.json_response(self._answer(request, job), headers=self._headers(record))

    def _answer(self, request: web.Request, job: _Job) -> dict[str, Any]:
        b64 = render(job.width, job.height, job.fmt)[1]
        size = f"{job.width}x{job.height}"
        answer: dict[str, Any] = {"created": int(time.time())}
        if job.family == "gpt":
            tokens = 1056 if job.width == job.height else 1584  # medium quality
            prompt_tokens = max(1, len(job.prompt) // 4)
            answer.update(
                background="opaque",
                data=[{"b64_json": b64}] * job.n,
                output_format=job.fmt,
                quality="medium" if job.quality == "auto" else job.quality,
                size=size,
                usage={
                    "input_tokens": prompt_tokens,
                    "input_tokens_details": {"image_tokens": 0, "text_tokens": prompt_tokens},
                    "output_tokens": tokens * job.n,
                    "total_tokens": prompt_tokens + tokens * job.n,
                },
            )
            return answer
        items = []
        for _ in range(job.n):
            if job.b64:
                item = {"b64_json": b64}
            else:
                name = f"img-{secrets.token_hex(8)}-{size}.png"
                expiry = time.strftime("%Y-%m-%dT%H%%3A%M%%3A%SZ", time.gmtime(time.time() + 3600))
                sig = secrets.token_urlsafe(24)
                item = {"url": f"http://{request.host}/images/{name}?se={expiry}&sp=r&sig={sig}"}
            if job.family == "dall-e-3":
                item["revised_prompt"] = "A detailed rendering of: " + job.prompt
            items.append(item)
        answer["data"] = items
        return answer

    def _validate(self, body: Any) -> _Job:
        """The request as a job, or the `_Reject` the real API would answer."""
        if not isinstance(body, dict):
            raise _Reject(None, "The request body must be a JSON object.")
        model = body.get("model", "dall-e-2")  # the real API's default model
        spec = self.models.get(model) if isinstance(model, str) else None
        if spec is None:
            message = f"The model `{model}` does not exist or you do not have access to it."
            raise _Reject("model_not_found", message, status=404)
        family = "gpt" if model.startswith("gpt-image") else model
        allowed = _GPT_PARAMS if family == "gpt" else _DALLE_PARAMS
        for name in body:
            if name not in allowed:
                raise _Reject("unknown_parameter", f"Unknown parameter: '{name}'.", name)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            message = "Missing required parameter: 'prompt'."
            raise _Reject("missing_required_parameter", message, "prompt")
        limit = _MAX_PROMPT.get(family, 4000)
        if len(prompt) > limit:
            message = (
                f"Invalid 'prompt': string too long. Expected a string with maximum length "
                f"{limit}, but got a string with length {len(prompt)} instead."
            )
            raise _Reject("string_above_max_length", message, "prompt")
        n = body.get("n", 1)
        top = 1 if family == "dall-e-3" else 10
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= top:
            raise _Reject("invalid_value", f"Invalid 'n': must be an integer in [1, {top}].", "n")
        size = body.get("size", "auto" if family == "gpt" else "1024x1024")
        if size not in spec.only_sizes:
            supported = ", ".join(f"'{s}'" for s in sorted(spec.only_sizes))
            message = f"Invalid value: '{size}'. Supported values are: {supported}."
            raise _Reject("invalid_value", message, "size")
        width, height = parse_dimensions(size) or (1024, 1024)
        fmt = body.get("output_format", "png")
        response_format = body.get("response_format", "url")
        quality = body.get("quality", "auto" if family == "gpt" else "standard")
        for name, value, choices in (
            ("output_format", fmt, _FORMATS),
            ("response_format", response_format, ("url", "b64_json")),
            ("quality", quality, _QUALITIES.get(family, ())),
        ):
            if value not in choices:
                raise _Reject("invalid_value", f"Invalid value: '{value}'.", name)
        b64 = family == "gpt" or response_format == "b64_json"
        return _Job(prompt, family, n, width, height, fmt, b64, quality)
