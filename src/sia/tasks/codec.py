"""JSON forms of the domain types a task backend stores: requests and results.

Every backend (SQLite and Redis) keeps a task's request and result as
text, so the encoding lives here once. Enums become their string values,
tuples become lists, datetimes become ISO 8601 in UTC. A stored result never
holds image bytes: the runner puts them in the blob store first, and encoding
an image that still carries `data` is refused.

The cursors of `TaskBackend.list` live here too: a position (the backend's
own sort key of the last task seen) and that task's id, as JSON in URL-safe
base64, so a client can only hand them back.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime
from typing import Any

from sia.domain import (
    GeneratedImage,
    GenerationRequest,
    GenerationResult,
    ImageError,
    ResponseFormat,
    Usage,
)
from sia.errors import InvalidArgument

#: Far longer than any cursor this module writes; a longer page_token is refused unread.
_MAX_CURSOR = 512


def request_to_json(request: GenerationRequest) -> str:
    """The stored form of `request`."""
    return json.dumps(
        {
            "prompt": request.prompt,
            "model": request.model,
            "size": request.size,
            "response_format": request.response_format.value,
            "watermark": request.watermark,
            "images": list(request.images),
            "seed": request.seed,
            "guidance_scale": request.guidance_scale,
            "max_images": request.max_images,
            "request_id": request.request_id,
            "webhook_url": request.webhook_url,
            "webhook_images": request.webhook_images,
        }
    )


def request_from_json(text: str) -> GenerationRequest:
    """The request stored as `text` by `request_to_json`."""
    data = json.loads(text)
    return GenerationRequest(
        prompt=data["prompt"],
        model=data["model"],
        size=data["size"],
        response_format=ResponseFormat(data.get("response_format", ResponseFormat.URL)),
        watermark=data.get("watermark"),
        images=tuple(data.get("images", ())),
        seed=data.get("seed"),
        guidance_scale=data.get("guidance_scale"),
        max_images=data.get("max_images"),
        request_id=data.get("request_id", ""),
        webhook_url=data.get("webhook_url", ""),
        webhook_images=data.get("webhook_images", False),
    )


def result_to_json(result: GenerationResult) -> str:
    """The stored form of `result`; raises ValueError if an image still holds bytes."""
    return json.dumps(
        {
            "model": result.model,
            "images": [_image_to_dict(image) for image in result.images],
            "usage": {
                "generated_images": result.usage.generated_images,
                "output_tokens": result.usage.output_tokens,
            },
            "created_at": to_iso(result.created_at),
        }
    )


def result_from_json(text: str) -> GenerationResult:
    """The result stored as `text` by `result_to_json`."""
    data = json.loads(text)
    usage = data.get("usage", {})
    return GenerationResult(
        model=data["model"],
        images=tuple(_image_from_dict(image) for image in data["images"]),
        usage=Usage(
            generated_images=usage.get("generated_images", 0),
            output_tokens=usage.get("output_tokens", 0),
        ),
        created_at=from_iso(data["created_at"]),
    )


def to_iso(moment: datetime) -> str:
    """`moment` as fixed-width ISO 8601 in UTC, so stored strings sort by time."""
    if moment.tzinfo is None:
        raise ValueError("naive datetimes cannot be stored; use sia.domain.utcnow()")
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def from_iso(text: str) -> datetime:
    """The UTC datetime written by `to_iso`."""
    return datetime.fromisoformat(text).astimezone(UTC)


def cursor_to_text(position: str, task_id: str) -> str:
    """The opaque page token that resumes a listing after (`position`, `task_id`)."""
    raw = json.dumps([position, task_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def cursor_from_text(text: str) -> tuple[str, str]:
    """The (position, task_id) of a token made by `cursor_to_text`.

    Raises sia.errors.InvalidArgument naming "page_token" for anything else.
    """
    if len(text) > _MAX_CURSOR:
        raise bad_cursor()
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
        pair = json.loads(raw)
    except (binascii.Error, ValueError) as exc:  # JSON's and UTF-8's errors are ValueErrors
        raise bad_cursor() from exc
    if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
        raise bad_cursor()
    return pair[0], pair[1]


def bad_cursor() -> InvalidArgument:
    """The error for a page token that no listing made."""
    return InvalidArgument.field("page_token", "is not a next_page_token from a previous page")


def _image_to_dict(image: GeneratedImage) -> dict[str, Any]:
    if image.data:
        raise ValueError(f"image {image.index} still holds bytes; put them in the blob store")
    error = image.error
    return {
        "index": image.index,
        "url": image.url,
        "size": image.size,
        "content_type": image.content_type,
        "blob_key": image.blob_key,
        "error": None if error is None else {"code": error.code, "message": error.message},
    }


def _image_from_dict(data: dict[str, Any]) -> GeneratedImage:
    error = data.get("error")
    return GeneratedImage(
        index=data["index"],
        url=data.get("url", ""),
        size=data.get("size", ""),
        content_type=data.get("content_type", ""),
        blob_key=data.get("blob_key", ""),
        error=None if error is None else ImageError(error["code"], error["message"]),
    )
