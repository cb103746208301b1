"""Keyword arguments to request messages, shared by the sync and asyncio clients.

Reference images may be URLs or data URIs (sent as they are), file paths or bytes
(sent as data URIs whose image/* type is read from the file's first bytes).
"""

from __future__ import annotations

import base64
import os
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from sia.api.image.v1 import image_service_pb2 as pb
from sia.client.results import TaskStatus

if TYPE_CHECKING:
    from collections.abc import Sequence

#: A reference image: an http(s) URL or data URI, a file path, or the file's bytes.
ImageInput = str | bytes | os.PathLike[str]

ResponseFormat = Literal["url", "b64_json"]
Period = Literal["today", "month"]

_FORMATS: dict[str, pb.ResponseFormat.ValueType] = {
    "url": pb.RESPONSE_FORMAT_URL,
    "b64_json": pb.RESPONSE_FORMAT_B64_JSON,
}
_PERIODS: dict[str, pb.UsagePeriod.ValueType] = {
    "today": pb.USAGE_PERIOD_TODAY,
    "month": pb.USAGE_PERIOD_MONTH,
}
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


def image_type(data: bytes) -> str:
    """The image/* subtype of an image file's bytes; ValueError when it is none we know."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for signature, kind in _SIGNATURES:
        if data.startswith(signature):
            return kind
    raise ValueError("not a PNG, JPEG, WebP, BMP, TIFF or GIF image")


def image_reference(image: ImageInput) -> str:
    """What the request's `images` field holds for one reference image."""
    if isinstance(image, str) and image.startswith(("http://", "https://", "data:")):
        return image
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    encoded = base64.b64encode(data).decode("ascii")
    return f"data:image/{image_type(data)};base64,{encoded}"


def generate_request(
    prompt: str,
    *,
    model: str = "",
    size: str = "",
    images: Sequence[ImageInput] = (),
    seed: int | None = None,
    guidance_scale: float | None = None,
    response_format: ResponseFormat | None = None,
    watermark: bool | None = None,
    request_id: str = "",
    webhook_url: str = "",
) -> pb.GenerateImageRequest:
    request = pb.GenerateImageRequest(
        prompt=prompt,
        model=model,
        size=size,
        images=[image_reference(image) for image in images],
        request_id=request_id,
        webhook_url=webhook_url,
    )
    if seed is not None:
        request.seed = seed
    if guidance_scale is not None:
        request.guidance_scale = guidance_scale
    if response_format is not None:
        request.response_format = _FORMATS[response_format]
    if watermark is not None:
        request.watermark = watermark
    return request


def group_request(
    prompt: str,
    *,
    model: str = "",
    size: str = "",
    images: Sequence[ImageInput] = (),
    max_images: int | None = None,
    response_format: ResponseFormat | None = None,
    watermark: bool | None = None,
    request_id: str = "",
    webhook_url: str = "",
    webhook_each_image: bool = False,
) -> pb.GenerateSequentialImagesRequest:
    request = pb.GenerateSequentialImagesRequest(
        prompt=prompt,
        model=model,
        size=size,
        images=[image_reference(image) for image in images],
        request_id=request_id,
        webhook_url=webhook_url,
        webhook_each_image=webhook_each_image,
    )
    if max_images is not None:
        request.max_images = max_images
    if response_format is not None:
        request.response_format = _FORMATS[response_format]
    if watermark is not None:
        request.watermark = watermark
    return request


def list_request(
    status: TaskStatus | str | None, page_size: int, page_token: str
) -> pb.ListImageTasksRequest:
    request = pb.ListImageTasksRequest(page_size=page_size, page_token=page_token)
    if status is not None:
        request.status = TaskStatus(status).to_proto()
    return request


def usage_request(
    period: Period | None, start_date: date | str | None, end_date: date | str | None
) -> pb.GetUsageRequest:
    request = pb.GetUsageRequest(
        start_date=_day(start_date),
        end_date=_day(end_date),
    )
    if period is not None:
        request.period = _PERIODS[period]
    return request


def _day(day: date | str | None) -> str:
    if day is None:
        return ""
    return day.isoformat() if isinstance(day, date) else day
