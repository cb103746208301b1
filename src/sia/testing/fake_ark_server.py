"""The fake Ark server: Ark's answers, streams, images and scripted outcomes.

`FakeArk` is the shared core of `fake_upstream` plus what is Ark's own: the
routes, the key check's error, group and stream answers, the palette JPEGs and
their download URLs. `fake_ark` is its manual and command; `fake_ark_requests`
holds the error table and the request checks.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import random
import secrets
import time
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

import orjson
from aiohttp import web
from PIL import Image

from sia.models import ARK_MODELS
from sia.testing import fake_upstream
from sia.testing.fake_ark_requests import ERRORS, ArkReject, Job, http_type, validate
from sia.testing.fake_upstream import (
    DROPPED,
    FakeUpstream,
    Outcome,
    Plan,
    RecordedRequest,
    trigger_pattern,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from typing_extensions import Unpack

    from sia.models import ModelSpec
    from sia.testing.fake_upstream import ServerOptions

GENERATIONS_PATH = "/api/v3/images/generations"

TRIGGER_MODERATE = "[moderate:{}]"
TRIGGER_INTERNAL = "[internal:{}]"
TRIGGER_COUNT = "[count:{}]"
TRIGGER_DROP = "[drop]"
TRIGGER_DROP_AFTER = "[drop:{}]"

_MODERATED = "OutputImageSensitiveContentDetected"
_SUCCEEDED = "image_generation.partial_succeeded"
_INTERNAL = "InternalServiceError"


@dataclass(frozen=True, slots=True)
class FakeOK:
    """Answer normally; set fields override the prompt's trigger words."""

    count: int | None = None
    moderate: tuple[int, ...] = ()
    internal: int | None = None
    latency: float | None = None


class FakeError(fake_upstream.FakeError):
    """Fail the whole request with an Ark error code (status from ERROR_STATUS unless given)."""

    __slots__ = ()
    reject = ArkReject


@dataclass(frozen=True, slots=True)
class FakeDrop:
    """Close the connection without a response (streams: after `after_images` frames)."""

    after_images: int = 0
    latency: float | None = None


@dataclass(slots=True)
class _Plan(Plan):
    """Ark's trigger words on top of the shared ones."""

    moderate: set[int] = field(default_factory=set)
    internal: int | None = None
    count: int | None = None
    drop: int | None = None


_PALETTE = [(r * 85, g * 85, b * 85) for r in range(4) for g in range(4) for b in range(4)]
_JSON = "application/json"
_TOS_QUERY = (
    "?X-Tos-Algorithm=TOS4-HMAC-SHA256&X-Tos-Credential=fake%2F{date}%2Fcn-beijing%2Ftos%2Frequest"
    "&X-Tos-Date={date}T000000Z&X-Tos-Expires=86400&X-Tos-Signature={sig}&X-Tos-SignedHeaders=host"
)


def _json(value: Any) -> str:
    """Compact JSON text (orjson: the fake shares the benchmark machine with SIA)."""
    return orjson.dumps(value).decode()


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


class FakeArk(FakeUpstream[_Plan]):
    """The fake Ark server: the shared core plus Ark's answers, streams and images."""

    generations_path = GENERATIONS_PATH
    name = "fake-ark"
    bad_trigger_code = "InvalidParameter"
    error_type = FakeError
    named_outcomes: ClassVar[Mapping[str, Callable[[], Outcome]]] = {"ok": FakeOK, "drop": FakeDrop}
    triggers = trigger_pattern("moderate", "internal", "count", "drop")
    max_body = 256 * 1024 * 1024  # reference images travel as data URIs

    def __init__(
        self,
        *,
        image_latency: float = 0.0,
        b64_bytes: int | None = None,
        models: Mapping[str, ModelSpec] = ARK_MODELS,
        **options: Unpack[ServerOptions],
    ) -> None:
        super().__init__(**options)
        self.image_latency = image_latency
        self.models = models
        self._ids = 0
        self._id_prefix = "02" + secrets.token_hex(4)
        self._blob = padded_jpeg(b64_bytes) if b64_bytes else None
        self._images: dict[int, tuple[bytes, str]] = {}
        self._date = (0, "")
        self.app.router.add_get("/images/{name}", self._download)
        self.app.router.add_get("/healthz", self._healthz)

    def _new_request_id(self) -> str:
        self._ids += 1
        return f"{self._id_prefix}{self._ids:012d}"

    def _new_plan(self) -> _Plan:
        return _Plan()

    def _trigger(self, plan: _Plan, word: str, arg: str) -> None:
        if word == "moderate":
            plan.moderate.update(int(n) for n in arg.split(","))
        elif word == "internal":
            plan.internal = int(arg)
        elif word == "count":
            plan.count = int(arg)
        else:
            plan.drop = int(arg) if arg else 0

    def _apply_ok(self, plan: _Plan, outcome: Outcome) -> None:
        if isinstance(outcome, FakeDrop):
            plan.drop = outcome.after_images
        elif isinstance(outcome, FakeOK):
            plan.drop = None
            plan.count = plan.count if outcome.count is None else outcome.count
            plan.moderate = set(outcome.moderate) or plan.moderate
            plan.internal = plan.internal if outcome.internal is None else outcome.internal

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

    def _error_response(self, record: RecordedRequest, exc: fake_upstream.Reject) -> web.Response:
        # Ark spells the request id differently in its authentication errors.
        label = "request id" if exc.code == "AuthenticationError" else "Request ID"
        error = {
            "code": exc.code,
            "message": f"{exc.args[0]} {label}: {record.request_id}",
            "param": exc.param or "",
            "type": http_type(exc.status),
        }
        return web.Response(
            status=exc.status,
            body=_json({"error": error}).encode(),
            content_type=_JSON,
            headers=self._headers(record, exc.retry_after),
        )

    def _drop(self, request: web.Request, record: RecordedRequest) -> NoReturn:
        record.outcome = DROPPED
        if request.transport is not None:
            request.transport.close()
        # aiohttp treats a cancelled handler as a client that went away: no response, no log.
        raise asyncio.CancelledError

    async def _generate(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        if self._refused_key(request) is not None:
            raise ArkReject("AuthenticationError")
        try:
            record.body = orjson.loads(await request.read())
        except ValueError:
            raise ArkReject("InvalidParameter", "The request body is not valid JSON.") from None
        job = validate(self.models, record.body)
        plan = await self._plan(job.prompt)
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
                raise ArkReject(code)
            else:
                items.append(_json({"error": {"code": code, "message": ERRORS[code][1]}}))
        body = (
            f'{{"model":{_json(job.model)},"created":{created},"data":[{",".join(items)}],'
            f'"usage":{_json(self._usage(record, job, images))}}}'
        )
        self._succeeded(record)
        return web.Response(body=body.encode(), content_type=_JSON, headers=self._headers(record))

    async def _stream(
        self,
        request: web.Request,
        record: RecordedRequest,
        job: Job,
        plan: _Plan,
        *,
        attempts: int,
        total: float,
    ) -> web.StreamResponse:
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        response = web.StreamResponse(headers=headers | self._headers(record))
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
            record.frames_sent.append(time.monotonic())
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
        self._succeeded(record)
        return response

    def _frame(
        self, request: web.Request, record: RecordedRequest, job: Job, plan: _Plan, index: int
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
        self, request: web.Request, record: RecordedRequest, job: Job, index: int, created: int
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

    def _usage(self, record: RecordedRequest, job: Job, images: int) -> dict[str, int]:
        """The `usage` object; also counts the images as generated."""
        record.images = images
        self.images_generated += images
        tokens = images * job.width * job.height // 256
        return {"generated_images": images, "output_tokens": tokens, "total_tokens": tokens}
