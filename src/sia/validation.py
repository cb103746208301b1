"""Request validation: turns what a client sent into a `GenerationRequest`.

Every check runs before any work, and every problem is reported at once, each
naming the field as the client spells it (`images[2]`, `max_images`).
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import io
import math
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pybase64
from PIL import Image, UnidentifiedImageError

from sia.domain import GenerationRequest, ResponseFormat
from sia.errors import FieldViolation, InvalidArgument, ReferencesBusy
from sia.models import MAX_GROUP_IMAGES, ModelSpec, echo

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

MAX_PROMPT_CHARS = 4000
MAX_WEBHOOK_URL_CHARS = 2048
MAX_REFERENCE_IMAGES = 14
MAX_REFERENCE_BYTES = 10 * 1024 * 1024
MAX_REFERENCE_PIXELS = 36_000_000
MIN_REFERENCE_SIDE = 15
MAX_URL_CHARS = 4096
MAX_MODEL_CHARS = 128
MAX_SIZE_CHARS = 32
SEED_RANGE = (-1, 2_147_483_647)
GUIDANCE_RANGE = (1.0, 10.0)

#: Reference image formats the upstream accepts, by the name in the data URI.
REFERENCE_FORMATS: Mapping[str, str] = {
    "jpeg": "JPEG",
    "jpg": "JPEG",
    "png": "PNG",
    "webp": "WEBP",
    "bmp": "BMP",
    "tiff": "TIFF",
    "gif": "GIF",
}

_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
# What urlsplit would strip or pass on silently: whitespace and control characters.
_URL_UNSAFE = re.compile(r"[\s\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Defaults:
    """Server-side defaults and the model catalogue that validation checks against."""

    model: str
    size: str
    models: Mapping[str, ModelSpec]


#: Longest task id looked up: ours are 29 characters (`domain.new_task_id`), and a
#: bound keeps an unknown id short enough to echo in the NOT_FOUND answer.
MAX_TASK_ID_CHARS = 64
#: Task list pages: the default size and the most.
PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
#: Longest page token accepted (ours are far shorter).
MAX_PAGE_TOKEN_CHARS = 512


def validate_task_id(value: str) -> str:
    """A task id to look up, stripped; InvalidArgument naming `task_id` when empty or long."""
    value = value.strip()
    if not value:
        raise InvalidArgument.field("task_id", "must not be empty")
    if len(value) > MAX_TASK_ID_CHARS:
        raise InvalidArgument.field(
            "task_id", f"is {len(value)} characters; at most {MAX_TASK_ID_CHARS}"
        )
    return value


def validate_page(size: int | None, token: str) -> int:
    """The page size of a task listing (None: the default); InvalidArgument naming
    `page_size` or `page_token` when out of range or too long for a token of ours."""
    size = PAGE_SIZE if size is None else size
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise InvalidArgument.field("page_size", f"must be in [1, {MAX_PAGE_SIZE}]; got {size}")
    if len(token) > MAX_PAGE_TOKEN_CHARS:
        raise InvalidArgument.field("page_token", "is not a token this server gave")
    return size


def validate_request(
    defaults: Defaults,
    *,
    prompt: str,
    model: str = "",
    size: str = "",
    response_format: ResponseFormat = ResponseFormat.URL,
    watermark: bool | None = None,
    images: Sequence[str] = (),
    seed: int | None = None,
    guidance_scale: float | None = None,
    max_images: int | None = None,
    sequential: bool = False,
    request_id: str = "",
    webhook_url: str = "",
    webhook_images: bool = False,
) -> GenerationRequest:
    """A validated, fully resolved request, or InvalidArgument listing every bad field.

    `webhook_url` is only measured here; what it may point at is the webhooks'
    check, at submission (sia.webhooks.urls).
    """
    problems: list[FieldViolation] = []

    def bad(name: str, description: str) -> None:
        problems.append(FieldViolation(name, description))

    prompt = prompt.strip()
    if not prompt:
        bad("prompt", "must not be empty")
    elif len(prompt) > MAX_PROMPT_CHARS:
        bad("prompt", f"is {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are allowed")

    model = model.strip() or defaults.model
    spec = defaults.models.get(model)
    if len(model) > MAX_MODEL_CHARS:
        bad("model", f"is {len(model)} characters; at most {MAX_MODEL_CHARS}")
    elif spec is None:
        bad("model", f"unknown model {echo(model)}; known: {', '.join(sorted(defaults.models))}")

    size = size.strip()
    if len(size) > MAX_SIZE_CHARS:
        bad("size", f"is {len(size)} characters; at most {MAX_SIZE_CHARS}")
    elif spec is not None:
        if not size:
            size = defaults.size if spec.check_size(defaults.size) is None else spec.default_size
        elif (problem := spec.check_size(size)) is not None:
            bad("size", problem)

    if len(images) > MAX_REFERENCE_IMAGES:
        # Counted first: too many references are refused without reading any of them.
        bad("images", f"{len(images)} reference images; at most {MAX_REFERENCE_IMAGES}")
    else:
        for index, ref in enumerate(images):
            if (problem := check_reference_image(ref)) is not None:
                bad(f"images[{index}]", problem)
        if spec is not None and not (
            spec.min_reference_images <= len(images) <= spec.max_reference_images
        ):
            bad("images", _reference_count_rule(spec, len(images)))

    if sequential:
        if spec is not None and not spec.sequential:
            bad("model", f"{spec.id} does not support sequential image generation")
        limit = MAX_GROUP_IMAGES if spec is None else spec.max_images
        if max_images is None:
            wanted = (
                limit
                if spec is None or spec.default_max_images is None
                else spec.default_max_images
            )
            max_images = max(1, min(wanted, MAX_GROUP_IMAGES - len(images)))
        elif not 1 <= max_images <= limit:
            bad("max_images", f"is {max_images}; must be between 1 and {limit}")
        elif len(images) + max_images > MAX_GROUP_IMAGES:
            bad(
                "max_images",
                f"{len(images)} reference images plus max_images {max_images} exceed "
                f"{MAX_GROUP_IMAGES}",
            )

    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        bad("seed", f"is {seed}; must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}")
    if guidance_scale is not None and not (
        math.isfinite(guidance_scale) and GUIDANCE_RANGE[0] <= guidance_scale <= GUIDANCE_RANGE[1]
    ):
        bad("guidance_scale", f"is {guidance_scale}; must be between 1 and 10")
    if request_id and not _REQUEST_ID.fullmatch(request_id):
        bad("request_id", "must be 1 to 128 printable ASCII characters without spaces")
    problems += _webhook_problems(webhook_url.strip(), webhook_images)

    if problems:
        raise InvalidArgument(problems)
    return GenerationRequest(
        prompt=prompt,
        model=model,
        size=size,
        response_format=response_format,
        watermark=watermark,
        images=tuple(images),
        seed=seed,
        guidance_scale=guidance_scale,
        max_images=max_images if sequential else None,
        request_id=request_id,
        webhook_url=webhook_url.strip(),
        webhook_images=webhook_images,
    )


def _webhook_problems(url: str, each_image: bool) -> list[FieldViolation]:
    if len(url) > MAX_WEBHOOK_URL_CHARS:
        limit = MAX_WEBHOOK_URL_CHARS
        return [FieldViolation("webhook_url", f"is {len(url)} characters; at most {limit}")]
    if each_image and not url:
        return [FieldViolation("webhook_each_image", "needs webhook_url")]
    return []


def _reference_count_rule(spec: ModelSpec, count: int) -> str:
    if spec.max_reference_images == 0:
        return f"{spec.id} takes no reference images; got {count}"
    if spec.min_reference_images == spec.max_reference_images:
        return f"{spec.id} takes exactly {spec.min_reference_images} reference image; got {count}"
    return f"{spec.id} takes at most {spec.max_reference_images} reference images; got {count}"


def check_reference_image(ref: str) -> str | None:
    """None when `ref` is an acceptable reference image, else what is wrong with it."""
    if ref.startswith("data:"):
        return _check_data_uri(ref)
    if len(ref) > MAX_URL_CHARS:
        return f"URL is longer than {MAX_URL_CHARS} characters"
    wrong = "must be an http(s) URL or a data:image/<format>;base64, URI"
    if _URL_UNSAFE.search(ref):
        return f"{wrong}; found a space or control character"
    try:
        # urlsplit refuses bad IPv6 brackets and NFKC-unsafe hosts; .port a bad port.
        parts = urlsplit(ref)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        _ = parts.port
    except ValueError:
        return f"{wrong}; this one does not parse"
    return None if ok else wrong


def _check_data_uri(ref: str) -> str | None:
    # From the header and the length alone first: a payload is decoded only once it may be
    # acceptable, and only a small one here, on the caller's thread (see check_images).
    parts = _data_uri_parts(ref)
    if isinstance(parts, str):
        return parts
    fmt, start = parts
    least = (len(ref) - start) * 3 // 4 - 2  # base64: 3 bytes per 4 characters, minus padding
    if least > MAX_REFERENCE_BYTES:
        return f"image is at least {least:,} bytes; at most {MAX_REFERENCE_BYTES:,}"
    return _decode_data_uri(ref, fmt, start) if len(ref) <= INLINE_DECODE_CHARS else None


#: Decoded bytes of all data-URI references in one request.
MAX_REFERENCE_TOTAL_BYTES = 32 * 1024 * 1024
#: Data URIs up to this length are decoded where validated; longer ones by check_images,
#: in a thread, so a 10 MB image does not hold the event loop.
INLINE_DECODE_CHARS = 64 * 1024
_DATA_URI_HEADER = re.compile(r"data:image/(?P<fmt>[^;,]+);base64,")
_MAX_HEADER_CHARS = 64
#: Pillow tries only the parsers of formats the upstream accepts (and can still say which).
_PILLOW_FORMATS = sorted(set(REFERENCE_FORMATS.values()))


def check_reference_total(images: Sequence[str]) -> int:
    """The decoded bytes the data URIs among `images` imply by their length (URLs count 0),
    or InvalidArgument naming `images` when that passes MAX_REFERENCE_TOTAL_BYTES."""
    total = sum(len(ref) * 3 // 4 for ref in images if ref.startswith("data:"))
    if total > MAX_REFERENCE_TOTAL_BYTES:
        raise InvalidArgument.field(
            "images",
            f"reference images total about {total:,} bytes; at most {MAX_REFERENCE_TOTAL_BYTES:,}",
        )
    return total


async def check_images(images: Sequence[str]) -> None:
    """Decode and parse, in a thread, the data URIs that validate_request left for later
    (longer than INLINE_DECODE_CHARS); InvalidArgument naming each bad `images[i]`."""
    deferred = [
        (index, ref)
        for index, ref in enumerate(images)
        if len(ref) > INLINE_DECODE_CHARS and ref.startswith("data:")
    ]
    if not deferred:
        return
    problems = await asyncio.to_thread(_decode_each, deferred)
    if problems:
        raise InvalidArgument(problems)


def _decode_each(refs: list[tuple[int, str]]) -> list[FieldViolation]:
    # One at a time: a request holds at most one decoded image.
    problems = []
    for index, ref in refs:
        parts = _data_uri_parts(ref)
        problem = parts if isinstance(parts, str) else _decode_data_uri(ref, *parts)
        if problem is not None:
            problems.append(FieldViolation(f"images[{index}]", problem))
    return problems


def _data_uri_parts(ref: str) -> tuple[str, int] | str:
    """(format, where the payload starts), or what is wrong with the header."""
    match = _DATA_URI_HEADER.match(ref, 0, _MAX_HEADER_CHARS)
    if match is None:
        return "malformed data URI; expected data:image/<format>;base64,<data>"
    fmt = match["fmt"]
    if fmt not in REFERENCE_FORMATS:
        return (
            f"unsupported image format {fmt!r}; use one of "
            f"{', '.join(sorted(set(REFERENCE_FORMATS) - {'jpg'}))} (lower case)"
        )
    return fmt, match.end()


def _decode_data_uri(ref: str, fmt: str, start: int) -> str | None:
    try:
        data = pybase64.b64decode(ref[start:], validate=True)
    except (binascii.Error, ValueError):
        return "data URI payload is not valid base64"
    if len(data) > MAX_REFERENCE_BYTES:
        return f"image is {len(data):,} bytes; at most {MAX_REFERENCE_BYTES:,}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=_PILLOW_FORMATS) as img:
                actual, (width, height) = img.format, img.size
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        return f"data URI payload is not a readable {fmt} image"
    if actual != REFERENCE_FORMATS[fmt]:
        return f"data URI says {fmt} but the payload is {actual or 'unknown'}"
    if min(width, height) < MIN_REFERENCE_SIDE:
        return f"image is {width}x{height}; each side must be at least {MIN_REFERENCE_SIDE} px"
    if not 1 / 16 <= width / height <= 16:
        return f"image is {width}x{height}; aspect ratio must be between 1/16 and 16"
    if width * height > MAX_REFERENCE_PIXELS:
        return f"image is {width}x{height}; at most {MAX_REFERENCE_PIXELS:,} pixels"
    return None


#: Decoded bytes of data-URI references that calls and submissions in flight may hold
#: together (each holds about five times its share: message, strings, upstream body).
REFERENCE_BYTES_IN_FLIGHT = 64 * 1024 * 1024


class ByteBudget:
    """At most `limit` bytes held at once; a claim past it is refused, never queued."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    @contextlib.contextmanager
    def claim(self, size: int) -> Iterator[None]:
        """Hold `size` bytes for the block, or raise ReferencesBusy when they would not fit."""
        if self.held + size > self.limit:
            raise ReferencesBusy(
                f"reference images of other calls fill this instance's {self.limit:,} bytes "
                "for them; retry shortly",
                metadata={"limit_bytes": str(self.limit)},
            )
        self.held += size
        try:
            yield
        finally:
            self.held -= size
