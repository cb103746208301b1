"""A fake OpenAI Images API server: the real wire format over real HTTP.

Tests run the `openai` provider against it. It follows shared/ark-api.md
section 6 for `POST /v1/images/generations` (no streaming, no edits) and
checks requests against `sia.providers.openai.OPENAI_MODELS`.

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
`sia.testing.fake_ark.RecordedRequest` per generation call, its `outcome` one
of "ok", "error:<code>", "client_disconnected" or "cancelled".
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
import re
import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from PIL import Image

from sia.models import parse_dimensions
from sia.providers.openai import OPENAI_MODELS
from sia.testing.fake_ark import CANCELLED, CLIENT_DISCONNECTED, OK, PENDING, RecordedRequest

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sia.models import ModelSpec

DEFAULT_API_KEY = "fake-key"
GENERATIONS_PATH = "/v1/images/generations"

TRIGGER_ERROR = "[error:{}]"
TRIGGER_RETRY_AFTER = "[retry-after:{}]"
TRIGGER_LATENCY = "[latency:{}]"

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
_TRIGGER = re.compile(r"\[(error|retry-after|latency):([^\]\s]*)\]")


@dataclass(frozen=True, slots=True)
class FakeOK:
    """Answer normally, after `latency` seconds if given."""

    latency: float | None = None


@dataclass(frozen=True, slots=True)
class FakeError:
    """Fail with an error code of `ERRORS`."""

    code: str
    retry_after: float | None = None
    latency: float | None = None

    def __post_init__(self) -> None:
        if self.code not in ERRORS:
            raise ValueError(f"unknown error code {self.code!r}; known: {', '.join(ERRORS)}")


class _Reject(Exception):
    """The request fails with an OpenAI error body."""

    def __init__(
        self, code: str | None, message: str = "", param: str | None = None, status: int = 400
    ) -> None:
        status, self.type, default = ERRORS.get(code or "", (status, "invalid_request_error", ""))
        super().__init__(message or default)
        self.code, self.param, self.status = code, param, status
        self.retry_after: str | None = None


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


class FakeOpenAI:
    """The fake OpenAI images server: configuration, request log, script, and the aiohttp app."""

    def __init__(
        self,
        *,
        api_key: str | None = DEFAULT_API_KEY,
        latency: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
        models: Mapping[str, ModelSpec] = OPENAI_MODELS,
    ) -> None:
        self.api_key = api_key
        self.latency = latency
        self.models = models
        self.host = host
        self.requests: list[RecordedRequest] = []
        self.generations = 0
        self.downloads = 0
        self._port = port
        self._script: deque[FakeOK | FakeError] = deque()
        self._runner: web.AppRunner | None = None
        self._closing = False
        self.app = web.Application()
        self.app.router.add_post(GENERATIONS_PATH, self._generations)
        self.app.router.add_get("/images/{name}", self._download)
        self.app.on_response_prepare.append(self._stamp)

    @property
    def base_url(self) -> str:
        """Where clients reach the fake, e.g. "http://127.0.0.1:18081"."""
        return f"http://{self.host}:{self._port}"

    def script(self, *outcomes: FakeOK | FakeError | str) -> None:
        """Queue outcomes for the next valid generation requests, one each, in order."""
        for item in outcomes:
            if isinstance(item, str):
                self._script.append(FakeOK() if item == "ok" else FakeError(item))
            else:
                self._script.append(item)

    async def __aenter__(self) -> FakeOpenAI:
        runner = web.AppRunner(
            self.app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5
        )
        await runner.setup()
        await web.TCPSite(runner, self.host, self._port).start()
        self._runner, self._closing = runner, False
        self._port = runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            self._closing = True
            await runner.cleanup()

    async def _stamp(self, _: web.Request, response: web.StreamResponse) -> None:
        response.headers.setdefault("x-request-id", "req_" + secrets.token_hex(16))

    async def _download(self, request: web.Request) -> web.Response:
        dims = parse_dimensions(request.match_info["name"].removesuffix(".png").rpartition("-")[2])
        if dims is None or max(dims) > 4096:
            return web.Response(status=404, text="BlobNotFound")
        self.downloads += 1
        return web.Response(body=render(*dims)[0], content_type="image/png")

    async def _generations(self, request: web.Request) -> web.Response:
        record = RecordedRequest(
            received=time.monotonic(),
            received_at=time.time(),
            method=request.method,
            path=request.path,
            headers=dict(request.headers),
            request_id="req_" + secrets.token_hex(16),
            client_request_id=request.headers.get("X-Client-Request-Id"),
        )
        self.requests.append(record)
        try:
            return await self._generate(request, record)
        except _Reject as exc:
            record.outcome, record.status = f"error:{exc.code}", exc.status
            error = {"message": exc.args[0], "type": exc.type, "param": exc.param, "code": exc.code}
            headers = {"x-request-id": record.request_id}
            if exc.retry_after is not None:
                headers["Retry-After"] = exc.retry_after
            return web.json_response({"error": error}, status=exc.status, headers=headers)
        except (asyncio.CancelledError, ConnectionResetError):
            if record.outcome == PENDING:
                record.outcome = CANCELLED if self._closing else CLIENT_DISCONNECTED
            raise asyncio.CancelledError from None
        finally:
            record.ended = time.monotonic()

    async def _generate(self, request: web.Request, record: RecordedRequest) -> web.Response:
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if self.api_key is not None and (scheme.lower() != "bearer" or key != self.api_key):
            if not key:
                raise _Reject(None, "You didn't provide an API key.", status=401)
            raise _Reject("invalid_api_key", f"Incorrect API key provided: {_mask(key)}.")
        try:
            record.body = json.loads(await request.read())
        except ValueError:
            raise _Reject(None, "We could not parse the JSON body of your request.") from None
        job = self._validate(record.body)
        error, retry_after, latency = self._plan(job.prompt)
        if self._script:
            outcome = self._script.popleft()
            latency = latency if outcome.latency is None else outcome.latency
            error = None
            if isinstance(outcome, FakeError):
                error = _Reject(outcome.code)
                if outcome.retry_after is not None:
                    retry_after = f"{outcome.retry_after:g}"
        if error is not None:
            error.retry_after = retry_after
            await asyncio.sleep(latency or 0.0)
            raise error
        await asyncio.sleep(self.latency if latency is None else latency)
        record.outcome, record.status, record.images = OK, 200, job.n
        self.generations += 1
        headers = {"x-request-id": record.request_id}
        return web.json_response(self._answer(request, job), headers=headers)

    @staticmethod
    def _plan(prompt: str) -> tuple[_Reject | None, str | None, float | None]:
        """The error, Retry-After and latency the prompt's trigger words ask for."""
        error, retry_after, latency = None, None, None
        for match in _TRIGGER.finditer(prompt):
            word, arg = match[1], match[2]
            if word == "error" and arg in ERRORS:
                error = _Reject(arg)
            elif word != "error" and re.fullmatch(r"\d+(\.\d+)?", arg):
                if word == "latency":
                    latency = float(arg)
                else:
                    retry_after = arg
            else:
                raise _Reject("invalid_value", f"fake-openai: bad trigger {match[0]}", "prompt")
        return error, retry_after, latency

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
