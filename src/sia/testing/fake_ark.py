"""A fake Volcengine Ark image server: the real wire format over real HTTP.

Integration tests run SIA against it, benchmarks use it as the upstream, and
people start it by hand (`python -m sia.testing.fake_ark --port 18080`). It
follows shared/ark-api.md field by field and checks requests against the model
catalogue of `sia.models`.

    async with FakeArk(api_key="test-key") as fake:   # binds 127.0.0.1, port 0
        fake.base_url                                  # "http://127.0.0.1:<port>"
        fake.requests[-1].body                         # the request log

Routes: `POST /api/v3/images/generations` (the Ark API), `GET /images/<name>.jpeg`
(what result URLs point at) and `GET /healthz`. Every response carries
`X-Request-Id`. Images are real JPEGs, 64x64 solid colours rendered once and
cached; the `size` field reports the requested size all the same.

Trigger words in the prompt script an outcome without any configuration (the
constants `TRIGGER_*` below hold them as format strings):

    [moderate:N]      image N (from 0; also "1,3") fails OutputImageSensitiveContentDetected;
                      a group continues
    [internal:N]      image N fails InternalServiceError and the group stops there
    [count:N]         the model "decides" to make N images (at most max_images)
    [error:CODE]      the whole request fails with CODE and its status (ERROR_STATUS)
    [retry-after:S]   adds `Retry-After: S` to that error response
    [latency:S]       answer after S seconds (a stream spreads them over its images)
    [drop]            close the connection without a response
    [drop:N]          streams: close the connection after N image frames (else like [drop])

A request without `sequential_image_generation: "auto"` makes one image; when
that image fails and the request is not a stream, the whole request fails with
the image's error (400 or 500). Groups report failed images as `data` items
`{"error": {...}}` with HTTP 200, or as `partial_failed` frames when streaming.

Scripting: `fake.script(*outcomes)` queues outcomes, one taken by each
generation request that passes the key check and validation, in order; they
override the prompt's trigger words. When the queue is empty normal behaviour
resumes.

    fake.script(
        FakeError("ModelAccountRpmRateLimitExceeded", retry_after=1),  # a 429
        FakeDrop(),                           # "drop" works too
        FakeOK(count=2, moderate=(1,)),        # "ok" works too
        "QuotaExceeded",                      # any other string is an error code
    )

The request log `fake.requests` holds a `RecordedRequest` per call of the API
route (body, headers, times, request ids) with its `outcome`: "ok", "error:<code>",
"dropped", "client_disconnected" (the client went away first) or "cancelled"
(the fake closed while it ran). It keeps the last `max_records` or more.

Latency: errors answer at once unless the prompt or the outcome gives one;
everything else waits `fake.latency` seconds per request plus
`fake.image_latency` per image attempted.

`b64_bytes=N` makes every image (b64_json payloads and URL downloads) one cached
real JPEG of exactly N bytes: a small picture padded with JPEG comment segments.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import io
import random
import re
import secrets
import signal
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Final, NoReturn

import orjson
from aiohttp import web
from PIL import Image

from sia.logs import configure_logging, get_logger
from sia.models import (
    ADAPTIVE,
    ARK_MODELS,
    KEYWORD_DIMENSIONS,
    MAX_GROUP_IMAGES,
    SEEDREAM_4_5,
    ModelSpec,
    parse_dimensions,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

DEFAULT_API_KEY = "fake-key"
GENERATIONS_PATH = "/api/v3/images/generations"

TRIGGER_MODERATE = "[moderate:{}]"
TRIGGER_INTERNAL = "[internal:{}]"
TRIGGER_COUNT = "[count:{}]"
TRIGGER_ERROR = "[error:{}]"
TRIGGER_RETRY_AFTER = "[retry-after:{}]"
TRIGGER_LATENCY = "[latency:{}]"
TRIGGER_DROP = "[drop]"
TRIGGER_DROP_AFTER = "[drop:{}]"

#: How a logged request ended, besides "error:<code>".
OK: Final = "ok"
DROPPED: Final = "dropped"
CLIENT_DISCONNECTED: Final = "client_disconnected"
CANCELLED: Final = "cancelled"  # the fake itself was closing
PENDING: Final = "pending"

_MODERATED = "OutputImageSensitiveContentDetected"
_SUCCEEDED = "image_generation.partial_succeeded"
_INTERNAL = "InternalServiceError"

#: Every error code of the spec's table (section 4): HTTP status and message.
ERRORS: Mapping[str, tuple[int, str]] = {
    "MissingParameter": (400, "The request is missing a required parameter."),
    "InvalidParameter": (400, "A parameter specified in the request is not valid."),
    "InvalidEndpoint.ClosedEndpoint": (400, "The endpoint is closed."),
    "InputTextSensitiveContentDetected": (400, "The input text may contain sensitive content."),
    "InputImageSensitiveContentDetected": (400, "The input image may contain sensitive content."),
    "InputImageSensitiveContentDetected.PrivacyInformation": (
        400,
        "The input image may contain private information.",
    ),
    "InputImageSensitiveContentDetected.PolicyViolation": (
        400,
        "The input image may violate the usage policy.",
    ),
    "OutputImageSensitiveContentDetected": (400, "The image may contain sensitive content."),
    "SensitiveContentDetected": (400, "The request may contain sensitive content."),
    "InputImageRiskDetection": (400, "The input image failed the risk check."),
    "OutputImageRiskDetection": (400, "The output image failed the risk check."),
    "InputTextRiskDetection": (400, "The input text failed the risk check."),
    "AuthenticationError": (401, "the API key or AK/SK in the request is missing or invalid."),
    "AccountOverdueError": (403, "The account has an overdue balance."),
    "AccessDenied": (403, "You do not have access to the requested resource."),
    "OperationDenied.ServiceNotOpen": (403, "The model service is not activated."),
    "InvalidEndpointOrModel.NotFound": (404, "The model or endpoint does not exist."),
    "ModelNotOpen": (404, "The model is not activated for this account."),
    "InvalidEndpointOrModel.ModelIDAccessDisabled": (404, "Access to this model is disabled."),
    "ModelAccountIpmRateLimitExceeded": (429, "The images-per-minute limit was exceeded."),
    "RateLimitExceeded.EndpointRPMExceeded": (429, "The endpoint's RPM limit was exceeded."),
    "RateLimitExceeded.EndpointTPMExceeded": (429, "The endpoint's TPM limit was exceeded."),
    "ModelAccountRpmRateLimitExceeded": (429, "The model's RPM limit was exceeded."),
    "APIAccountRpmRateLimitExceeded": (429, "The account's RPM limit was exceeded."),
    "AccountRateLimitExceeded": (429, "The account's rate limit was exceeded."),
    "RequestBurstTooFast": (429, "The request rate rose too fast."),
    "ServerOverloaded": (429, "The service is overloaded; try again later."),
    "QuotaExceeded": (429, "The free quota is used up."),
    "SetLimitExceeded": (429, "The safe-experience limit set for this model was reached."),
    "InternalServiceError": (500, "The service encountered an unexpected internal error."),
}
ERROR_STATUS: Mapping[str, int] = {code: status for code, (status, _) in ERRORS.items()}


def _http_type(status: int) -> str:
    """Ark's `type` for a status: the class name, e.g. "TooManyRequests"."""
    try:
        return HTTPStatus(status).phrase.replace(" ", "")
    except ValueError:
        return "Error"


def error_status(code: str) -> int | None:
    """The HTTP status of an Ark error code, suffixes like `.prompt` included; None if unknown."""
    while code:
        if code in ERRORS:
            return ERRORS[code][0]
        code = code.rpartition(".")[0]
    return None


@dataclass(frozen=True, slots=True)
class FakeOK:
    """Answer normally; set fields override the prompt's trigger words."""

    count: int | None = None
    moderate: tuple[int, ...] = ()
    internal: int | None = None
    latency: float | None = None


@dataclass(frozen=True, slots=True)
class FakeError:
    """Fail the whole request with an Ark error code (status from ERROR_STATUS unless given)."""

    code: str
    message: str | None = None
    retry_after: float | None = None
    status: int | None = None
    param: str = ""
    latency: float | None = None

    def __post_init__(self) -> None:
        if self.status is None and error_status(self.code) is None:
            raise ValueError(f"unknown Ark error code {self.code!r}; pass status=")


@dataclass(frozen=True, slots=True)
class FakeDrop:
    """Close the connection without a response (streams: after `after_images` frames)."""

    after_images: int = 0
    latency: float | None = None


Outcome = FakeOK | FakeError | FakeDrop


@dataclass(slots=True)
class RecordedRequest:
    """One request to an API route, as received, and how it ended."""

    received: float  # time.monotonic()
    received_at: float  # time.time()
    method: str
    path: str
    headers: dict[str, str]
    request_id: str
    client_request_id: str | None
    body: Any = None
    outcome: str = PENDING
    status: int | None = None
    images: int = 0
    ended: float | None = None  # time.monotonic()

    def header(self, name: str) -> str | None:
        """A request header by case-insensitive name."""
        lowered = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == lowered), None)

    @property
    def duration(self) -> float | None:
        """Seconds from arrival to the end, once ended."""
        return None if self.ended is None else self.ended - self.received


class _Reject(Exception):
    """The request fails with an Ark error body."""

    def __init__(
        self,
        code: str,
        message: str | None = None,
        param: str = "",
        *,
        status: int | None = None,
        retry_after: str | None = None,
    ) -> None:
        status = status or error_status(code) or 500
        super().__init__(message or ERRORS.get(code, (status, "The request failed."))[1])
        self.code, self.param, self.status, self.retry_after = code, param, status, retry_after


@dataclass(slots=True)
class _Plan:
    """What to do with one valid request: the trigger words merged with the script."""

    moderate: set[int] = field(default_factory=set)
    internal: int | None = None
    count: int | None = None
    error: _Reject | None = None
    retry_after: str | None = None
    latency: float | None = None
    drop: int | None = None


@dataclass(frozen=True, slots=True)
class _Job:
    """A validated generation request."""

    model: str
    prompt: str
    width: int
    height: int
    b64: bool
    stream: bool
    group: bool
    max_images: int


_TRIGGER = re.compile(
    r"\[(moderate|internal|count|error|retry-after|latency|drop)(?::([^\]\s]*))?\]"
)
_DATA_URI = re.compile(r"data:image/([^;,]{1,32});base64,")
_PALETTE = [(r * 85, g * 85, b * 85) for r in range(4) for g in range(4) for b in range(4)]


def _json(value: Any) -> str:
    """Compact JSON text (orjson: the fake shares the benchmark machine with SIA)."""
    return orjson.dumps(value).decode()


_JSON = "application/json"
_TOS_QUERY = (
    "?X-Tos-Algorithm=TOS4-HMAC-SHA256&X-Tos-Credential=fake%2F{date}%2Fcn-beijing%2Ftos%2Frequest"
    "&X-Tos-Date={date}T000000Z&X-Tos-Expires=86400&X-Tos-Signature={sig}&X-Tos-SignedHeaders=host"
)

_log = get_logger("sia.testing.fake_ark")


def _bad(param: str, why: str) -> _Reject:
    return _Reject("InvalidParameter", f"The parameter `{param}` {why}", param)


def _number(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also rejects NaN
        raise ValueError(text)
    return value


def _parse_triggers(prompt: str) -> _Plan:
    plan = _Plan()
    if "[" not in prompt:
        return plan
    for match in _TRIGGER.finditer(prompt):
        word, arg = match[1], match[2] or ""
        try:
            if word == "moderate":
                plan.moderate.update(int(n) for n in arg.split(","))
            elif word == "internal":
                plan.internal = int(arg)
            elif word == "count":
                plan.count = int(arg)
            elif word == "error":
                if error_status(arg) is None:
                    raise ValueError(arg)
                plan.error = _Reject(arg)
            elif word == "retry-after":
                _number(arg)
                plan.retry_after = arg
            elif word == "latency":
                plan.latency = _number(arg)
            else:
                plan.drop = int(arg) if arg else 0
        except ValueError:
            raise _Reject(
                "InvalidParameter", f"fake-ark: bad trigger {match[0]}", "prompt"
            ) from None
    return plan


def _apply(plan: _Plan, outcome: Outcome) -> None:
    """Let a scripted outcome override the trigger words."""
    if outcome.latency is not None:
        plan.latency = outcome.latency
    if isinstance(outcome, FakeError):
        retry = outcome.retry_after
        plan.error = _Reject(outcome.code, outcome.message, outcome.param, status=outcome.status)
        if retry is not None:
            plan.retry_after = str(int(retry)) if float(retry).is_integer() else str(retry)
    elif isinstance(outcome, FakeDrop):
        plan.error, plan.drop = None, outcome.after_images
    else:
        plan.error, plan.drop = None, None
        plan.count = plan.count if outcome.count is None else outcome.count
        plan.moderate = set(outcome.moderate) or plan.moderate
        plan.internal = plan.internal if outcome.internal is None else outcome.internal


def _outcome(item: Outcome | str) -> Outcome:
    if not isinstance(item, str):
        return item
    if item == "ok":
        return FakeOK()
    return FakeDrop() if item == "drop" else FakeError(item)


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def padded_jpeg(size: int) -> bytes:
    """A valid 64x64 JPEG of exactly `size` bytes, padded with comment segments.

    Sizes below the unpadded JPEG (about 700 bytes) or at most 3 bytes above it
    cannot be hit exactly and come back a little smaller.
    """
    jpeg = _jpeg((200, 120, 40))
    insert_at = 4 + int.from_bytes(jpeg[4:6], "big")  # after SOI and the JFIF APP0 segment
    missing = size - len(jpeg)
    rng = random.Random(size)  # noqa: S311 - filler bytes, not a secret
    segments = []
    while missing > 0:
        # A segment costs 4 bytes of marker and length; the last one may need to be bigger
        # than what is left, so never leave a remainder of 1 to 3 bytes.
        chunk = min(missing - 4, 65533 - 2)
        if 0 < missing - (chunk + 4) < 4:
            chunk -= 4
        if chunk < 0:
            break
        segments.append(b"\xff\xfe" + (chunk + 2).to_bytes(2, "big") + rng.randbytes(chunk))
        missing -= chunk + 4
    return jpeg[:insert_at] + b"".join(segments) + jpeg[insert_at:]


class FakeArk:
    """The fake Ark server: configuration, request log, script, and the aiohttp app."""

    def __init__(
        self,
        *,
        api_key: str | None = DEFAULT_API_KEY,
        latency: float = 0.0,
        image_latency: float = 0.0,
        b64_bytes: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        models: Mapping[str, ModelSpec] = ARK_MODELS,
        max_records: int | None = 10_000,
    ) -> None:
        self.api_key = api_key
        self.latency = latency
        self.image_latency = image_latency
        self.models = models
        self.max_records = max_records
        self.host = host
        self.requests: list[RecordedRequest] = []
        self.generations = 0  # requests answered with HTTP 200 (groups with failures too)
        self.images_generated = 0
        self.downloads = 0
        self._port = port
        self._script: deque[Outcome] = deque()
        self._ids = 0
        self._id_prefix = "02" + secrets.token_hex(4)
        self._blob = padded_jpeg(b64_bytes) if b64_bytes else None
        self._images: dict[int, tuple[bytes, str]] = {}
        self._date = (0, "")
        self._runner: web.AppRunner | None = None
        self._closing = False
        self.app = web.Application(client_max_size=256 * 1024 * 1024)
        # Another wire format (OpenAI images) would add its route here, reusing _Plan,
        # _image, the script and the log; only validation and rendering are Ark's own.
        self.app.router.add_post(GENERATIONS_PATH, self._ark_generations)
        self.app.router.add_get("/images/{name}", self._download)
        self.app.router.add_get("/healthz", self._healthz)
        self.app.on_response_prepare.append(self._stamp)

    @property
    def port(self) -> int:
        """The bound port once started (the one asked for before)."""
        return self._port

    @property
    def base_url(self) -> str:
        """Where clients reach the fake, e.g. "http://127.0.0.1:18080"."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host  # noqa: S104
        return f"http://[{host}]:{self._port}" if ":" in host else f"http://{host}:{self._port}"

    def script(self, *outcomes: Outcome | str) -> None:
        """Queue outcomes for the next valid generation requests, one each, in order."""
        self._script.extend(_outcome(o) for o in outcomes)

    @property
    def scripted(self) -> int:
        """How many scripted outcomes are still queued."""
        return len(self._script)

    def reset(self) -> None:
        """Forget the request log, the script and the counters."""
        self.requests.clear()
        self._script.clear()
        self.generations = self.images_generated = self.downloads = 0

    async def start(self) -> None:
        """Bind and serve; `base_url` is valid afterwards."""
        runner = web.AppRunner(
            self.app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._port, backlog=4096)
        await site.start()
        self._runner, self._closing = runner, False
        self._port = runner.addresses[0][1]

    async def close(self) -> None:
        """Stop serving, cancelling requests still in flight; idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            self._closing = True
            await runner.cleanup()

    async def __aenter__(self) -> FakeArk:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _new_request_id(self) -> str:
        self._ids += 1
        return f"{self._id_prefix}{self._ids:012d}"

    async def _stamp(self, _: web.Request, response: web.StreamResponse) -> None:
        if "X-Request-Id" not in response.headers:
            response.headers["X-Request-Id"] = self._new_request_id()

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _download(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        colour = name.removesuffix(".jpeg").rpartition("-")[2]
        if not (name.endswith(".jpeg") and colour.isdigit() and int(colour) < len(_PALETTE)):
            return web.Response(status=404, text="NoSuchKey")
        self.downloads += 1
        return web.Response(body=self._image(int(colour))[0], content_type="image/jpeg")

    def _image(self, colour: int) -> tuple[bytes, str]:
        """The JPEG of a palette colour and its base64 as a JSON string, rendered once."""
        if self._blob is not None:
            colour = 0  # one blob for every colour
        cached = self._images.get(colour)
        if cached is None:
            jpeg = self._blob or _jpeg(_PALETTE[colour])
            cached = self._images[colour] = (jpeg, _json(base64.b64encode(jpeg).decode()))
        return cached

    def _record(self, request: web.Request, request_id: str) -> RecordedRequest:
        record = RecordedRequest(
            received=time.monotonic(),
            received_at=time.time(),
            method=request.method,
            path=request.path,
            headers=dict(request.headers),
            request_id=request_id,
            client_request_id=request.headers.get("X-Client-Request-Id"),
        )
        if self.max_records is not None and len(self.requests) >= 2 * self.max_records:
            del self.requests[: len(self.requests) - self.max_records]
        self.requests.append(record)
        return record

    def _error(self, record: RecordedRequest, exc: _Reject) -> web.Response:
        if exc.code == "AuthenticationError":
            message = f"{exc.args[0]} request id: {record.request_id}"
        else:
            message = f"{exc.args[0]} Request ID: {record.request_id}"
        error = {
            "code": exc.code,
            "message": message,
            "param": exc.param,
            "type": _http_type(exc.status),
        }
        headers = {"X-Request-Id": record.request_id}
        if exc.retry_after is not None:
            headers["Retry-After"] = exc.retry_after
        record.outcome, record.status = f"error:{exc.code}", exc.status
        return web.Response(
            status=exc.status,
            body=_json({"error": error}).encode(),
            content_type=_JSON,
            headers=headers,
        )

    def _drop(self, request: web.Request, record: RecordedRequest) -> NoReturn:
        record.outcome = DROPPED
        if request.transport is not None:
            request.transport.close()
        # aiohttp treats a cancelled handler as a client that went away: no response, no log.
        raise asyncio.CancelledError

    async def _ark_generations(self, request: web.Request) -> web.StreamResponse:
        record = self._record(request, self._new_request_id())
        try:
            return await self._generate(request, record)
        except _Reject as exc:
            return self._error(record, exc)
        except (asyncio.CancelledError, ConnectionResetError):
            if record.outcome == PENDING:
                record.outcome = CANCELLED if self._closing else CLIENT_DISCONNECTED
            raise asyncio.CancelledError from None
        finally:
            record.ended = time.monotonic()

    async def _generate(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        scheme, _, key = auth.partition(" ")
        if self.api_key is not None and (scheme.lower() != "bearer" or key != self.api_key):
            raise _Reject("AuthenticationError")
        try:
            record.body = orjson.loads(await request.read())
        except ValueError:
            raise _Reject("InvalidParameter", "The request body is not valid JSON.") from None
        job = self._validate(record.body)
        plan = _parse_triggers(job.prompt)
        if self._script:
            _apply(plan, self._script.popleft())
        if plan.error is not None:
            plan.error.retry_after = plan.retry_after
            if plan.latency:
                await asyncio.sleep(plan.latency)
            raise plan.error

        attempts = job.max_images if job.group else 1
        if job.group and plan.count is not None:
            attempts = max(0, min(plan.count, attempts))
        if plan.internal is not None:
            attempts = min(attempts, plan.internal + 1)
        total = self.latency if plan.latency is None else plan.latency
        total += self.image_latency * attempts
        if job.stream:
            return await self._stream(request, record, job, plan, attempts=attempts, total=total)
        if total:
            await asyncio.sleep(total)
        if plan.drop is not None:
            self._drop(request, record)
        created = int(time.time())
        items, images = [], 0
        for index in range(attempts):
            code = self._image_error(plan, index)
            if code is None:
                items.append(self._item(request, record, job, index, created))
                images += 1
            elif not job.group:
                raise _Reject(code)
            else:
                items.append(_json({"error": {"code": code, "message": ERRORS[code][1]}}))
        body = (
            f'{{"model":{_json(job.model)},"created":{created},"data":[{",".join(items)}],'
            f'"usage":{_json(self._usage(record, job, images))}}}'
        )
        record.outcome, record.status = OK, 200
        self.generations += 1
        return web.Response(
            body=body.encode(), content_type=_JSON, headers={"X-Request-Id": record.request_id}
        )

    async def _stream(
        self,
        request: web.Request,
        record: RecordedRequest,
        job: _Job,
        plan: _Plan,
        *,
        attempts: int,
        total: float,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Request-Id": record.request_id,
            }
        )
        step = total / attempts if attempts else total
        images = 0
        for index in range(attempts):
            if step:
                await asyncio.sleep(step)
            if plan.drop == index:
                self._drop(request, record)
            event, tail = self._frame(request, record, job, plan, index)
            if event == _SUCCEEDED:
                images += 1
            frame = (
                f'{{"type":"{event}","model":{_json(job.model)},"created":{int(time.time())},'
                f'"image_index":{index},{tail}}}'
            )
            if not response.prepared:  # like Ark: headers come with the first image
                await response.prepare(request)
            await response.write(f"event: {event}\ndata: {frame}\n\n".encode())
        if attempts == 0 and step:
            await asyncio.sleep(step)
        if plan.drop is not None:
            self._drop(request, record)
        done = {
            "type": "image_generation.completed",
            "model": job.model,
            "created": int(time.time()),
            "usage": self._usage(record, job, images),
        }
        if not response.prepared:
            await response.prepare(request)
        await response.write(
            f"event: image_generation.completed\ndata: {_json(done)}\n\ndata: [DONE]\n\n".encode()
        )
        await response.write_eof()
        record.outcome, record.status = OK, 200
        self.generations += 1
        return response

    def _frame(
        self, request: web.Request, record: RecordedRequest, job: _Job, plan: _Plan, index: int
    ) -> tuple[str, str]:
        """The event type of stream image `index` and the JSON members that follow its index."""
        code = self._image_error(plan, index)
        if code is None:
            item = self._item(request, record, job, index, int(time.time()))
            return _SUCCEEDED, item[1:-1]  # the members of the data item, without braces
        error = _json({"code": code, "message": ERRORS[code][1]})
        return "image_generation.partial_failed", f'"error":{error}'

    @staticmethod
    def _image_error(plan: _Plan, index: int) -> str | None:
        if index == plan.internal:
            return _INTERNAL
        return _MODERATED if index in plan.moderate else None

    def _item(
        self, request: web.Request, record: RecordedRequest, job: _Job, index: int, created: int
    ) -> str:
        """One successful `data` item as JSON text."""
        colour = zlib.crc32(f"{index}:{job.prompt}".encode()) % len(_PALETTE)
        size = f'"size":"{job.width}x{job.height}"'
        if job.b64:
            return f'{{"b64_json":{self._image(colour)[1]},{size}}}'
        name = f"{record.request_id}-{index}-{colour}"
        if self._date[0] != created:
            self._date = (created, time.strftime("%Y%m%d", time.gmtime(created)))
        date = self._date[1]
        sig = hashlib.sha256(name.encode()).hexdigest()
        url = f"http://{request.host}/images/{name}.jpeg" + _TOS_QUERY.format(date=date, sig=sig)
        return f'{{"url":{_json(url)},{size}}}'

    def _usage(self, record: RecordedRequest, job: _Job, images: int) -> dict[str, int]:
        """The `usage` object; also counts the images as generated."""
        record.images = images
        self.images_generated += images
        tokens = images * job.width * job.height // 256
        return {"generated_images": images, "output_tokens": tokens, "total_tokens": tokens}

    def _validate(self, body: Any) -> _Job:
        """The request as a job, or the `_Reject` the real API would answer."""
        if not isinstance(body, dict):
            raise _Reject("InvalidParameter", "The request body must be a JSON object.")
        model, prompt = body.get("model"), body.get("prompt")
        if model is None or model == "":
            raise _Reject("MissingParameter", "The parameter `model` is required.", "model")
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
            raise _Reject("MissingParameter", "The parameter `prompt` is required.", "prompt")
        if not isinstance(model, str) or not isinstance(prompt, str):
            name = "model" if not isinstance(model, str) else "prompt"
            raise _Reject("InvalidParameter", f"The parameter `{name}` must be a string.", name)
        spec = self.models.get(model)
        if spec is None:
            message = (
                f"The model or endpoint {model} does not exist or you do not have access to it."
            )
            raise _Reject("InvalidEndpointOrModel.NotFound", message, "model")

        refs = self._references(spec, body.get("image"))
        size = body.get("size")
        size = spec.default_size if size is None else size
        if not isinstance(size, str):
            raise _bad("size", "must be a string.")
        problem = spec.check_size(size)
        if problem is not None:
            raise _bad("size", f"specified in the request is not valid: {problem}.")
        if size == ADAPTIVE:
            width, height = 1024, 1024
        else:
            width, height = KEYWORD_DIMENSIONS.get(size) or parse_dimensions(size) or (0, 0)

        group, max_images = self._sequential(spec, body, len(refs))
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise _bad("stream", "must be a boolean.")
        if stream and not spec.sequential:
            raise _bad("stream", f"is not supported by {spec.id}.")
        response_format = body.get("response_format")
        if response_format not in (None, "url", "b64_json"):
            raise _bad("response_format", "must be url or b64_json.")
        self._options(spec, body)
        return _Job(
            model=spec.id,
            prompt=prompt,
            width=width,
            height=height,
            b64=response_format == "b64_json",
            stream=bool(stream),
            group=group,
            max_images=max_images,
        )

    @staticmethod
    def _options(spec: ModelSpec, body: dict[str, Any]) -> None:
        """Check the optional fields a model honours; ignore the others like Ark."""
        seed, scale = body.get("seed"), body.get("guidance_scale")
        if spec.seed and seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise _bad("seed", "must be an integer.")
            if not -1 <= seed <= 2_147_483_647:
                raise _bad("seed", "must be in [-1, 2147483647].")
        if spec.guidance_scale and scale is not None:
            if isinstance(scale, bool) or not isinstance(scale, int | float):
                raise _bad("guidance_scale", "must be a number.")
            if not 1 <= scale <= 10:
                raise _bad("guidance_scale", "must be in [1, 10].")
        watermark = body.get("watermark")
        if watermark is not None and not isinstance(watermark, bool):
            raise _bad("watermark", "must be a boolean.")
        options = body.get("optimize_prompt_options")
        mode = options.get("mode") if isinstance(options, dict) else None
        if mode not in (None, "standard", "fast") or (
            mode == "fast" and spec.id == SEEDREAM_4_5.id
        ):
            raise _bad("optimize_prompt_options.mode", f"value {mode!r} is not supported.")

    @staticmethod
    def _references(spec: ModelSpec, image: Any) -> list[Any]:
        refs: list[Any] = [] if image is None else [image] if isinstance(image, str) else image
        if not isinstance(refs, list):
            raise _bad("image", "must be a string or a list of strings.")
        if refs and not spec.max_reference_images:
            raise _bad("image", f"is not supported by {spec.id}.")
        if not spec.min_reference_images <= len(refs) <= spec.max_reference_images:
            raise _bad(
                "image",
                f"takes {spec.min_reference_images} to {spec.max_reference_images} images "
                f"for {spec.id}, not {len(refs)}.",
            )
        for ref in refs:
            if not isinstance(ref, str):
                raise _bad("image", "must be a string or a list of strings.")
            if ref.startswith("data:"):
                match = _DATA_URI.match(ref)
                if match is None:
                    raise _bad("image", "must be a URL or data:image/<format>;base64,<data>.")
                if match[1] != match[1].lower():
                    raise _bad("image", f"format {match[1]!r} must be lowercase.")
            elif not ref.startswith(("http://", "https://")):
                raise _bad("image", "must be a URL or data:image/<format>;base64,<data>.")
        return refs

    @staticmethod
    def _sequential(spec: ModelSpec, body: dict[str, Any], refs: int) -> tuple[bool, int]:
        mode = body.get("sequential_image_generation")
        if mode in (None, "disabled"):
            return False, 1
        if mode != "auto":
            raise _bad("sequential_image_generation", "must be auto or disabled.")
        if not spec.sequential:
            raise _bad("sequential_image_generation", f"is not supported by {spec.id}.")
        options = body.get("sequential_image_generation_options")
        if options is not None and not isinstance(options, dict):
            raise _bad("sequential_image_generation_options", "must be an object.")
        max_images = (options or {}).get("max_images")
        if max_images is None:
            return True, MAX_GROUP_IMAGES - refs
        param = "sequential_image_generation_options.max_images"
        if isinstance(max_images, bool) or not isinstance(max_images, int):
            raise _bad(param, "must be an integer.")
        if not 1 <= max_images <= MAX_GROUP_IMAGES:
            raise _bad(param, f"must be in [1, {MAX_GROUP_IMAGES}].")
        if refs + max_images > MAX_GROUP_IMAGES:
            raise _bad(param, f"plus {refs} reference images exceeds {MAX_GROUP_IMAGES}.")
        return True, max_images


async def run_fake_ark(
    host: str = "127.0.0.1",
    port: int = 18080,
    api_key: str | None = DEFAULT_API_KEY,
    latency: float = 0.0,
    **options: Any,
) -> None:
    """Serve a FakeArk until cancelled; logs its base URL. `options` go to FakeArk."""
    options.setdefault("max_records", 1000)
    async with FakeArk(api_key=api_key, latency=latency, host=host, port=port, **options) as fake:
        _log.info("fake_ark_listening", base_url=fake.base_url, latency=latency)
        try:
            await asyncio.Event().wait()
        finally:
            _log.info("fake_ark_stopping", generations=fake.generations)


def main(argv: list[str] | None = None) -> None:
    """`python -m sia.testing.fake_ark`: serve until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="sia fake-ark", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18080)
    parser.add_argument("--api-key", default=DEFAULT_API_KEY)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--image-latency", type=float, default=0.0, help="seconds per image")
    parser.add_argument("--b64-bytes", type=int, default=None, help="bytes per image")
    args = parser.parse_args(argv)
    configure_logging()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


async def _serve(args: argparse.Namespace) -> None:
    """Run until Ctrl-C or SIGTERM, so scripts can stop it with a plain `kill`."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await run_fake_ark(
            args.host,
            args.port,
            args.api_key,
            args.latency,
            image_latency=args.image_latency,
            b64_bytes=args.b64_bytes,
        )


if __name__ == "__main__":
    main()
