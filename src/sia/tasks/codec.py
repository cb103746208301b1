"""JSON forms of the domain types a task backend stores: requests and results.

Every backend (SQLite and Redis) keeps a task's request and result as
text, so the encoding lives here once. Enums become their string values,
tuples become lists, datetimes become ISO 8601 in UTC. A stored result never
holds image bytes: the runner puts them in the blob store first, and encoding
an image that still carries `data` is refused.
"""

from __future__ import annotations

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
