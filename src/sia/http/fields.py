"""Request fields of the REST routes into the domain: JSON values checked for their
type (naming the field when wrong), form text parsed, and the shared mapping of
OpenAI-style generation fields to a validated `GenerationRequest`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from sia import errors
from sia.domain import ResponseFormat
from sia.validation import validate_request

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sia.domain import GenerationRequest
    from sia.validation import Defaults


def field(name: str, description: str) -> errors.InvalidArgument:
    """The error for one bad field."""
    return errors.InvalidArgument.field(name, description)


class FieldAsSent(errors.InvalidArgument):
    """A bad field named exactly as the client sent it: its name is not respelt (a
    client sending SIA's `max_images` is told about `max_images`, not about `n`)."""


def generation_request(
    defaults: Defaults, body: dict[str, Any], images: Sequence[str], **extra: Any
) -> GenerationRequest:
    """A validated request from OpenAI-style JSON fields (`n`, `response_format`, `size`,
    `seed`, `guidance_scale`, `watermark`); `extra` goes to validate_request as is."""
    n = body.get("n")
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise field("n", f"must be a positive integer; got {n!r}")
    fmt = body.get("response_format") or "url"
    if fmt not in ("url", "b64_json"):
        raise field("response_format", f"must be 'url' or 'b64_json'; got {fmt!r}")
    size = text(body, "size")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise field("seed", "must be an integer")
    guidance = body.get("guidance_scale")
    if guidance is not None and (
        isinstance(guidance, bool) or not isinstance(guidance, (int, float))
    ):
        raise field("guidance_scale", "must be a number")
    watermark = body.get("watermark")
    if watermark is not None and not isinstance(watermark, bool):
        raise field("watermark", "must be true or false")
    return validate_request(
        defaults,
        prompt=text(body, "prompt"),
        model=text(body, "model"),
        size="" if size == "auto" else size,
        response_format=ResponseFormat(fmt),
        watermark=watermark,
        images=images,
        seed=seed,
        guidance_scale=None if guidance is None else float(guidance),
        max_images=n if n > 1 else None,
        sequential=n > 1,
        **extra,
    )


def text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise field(name, "must be a string")
    return value


def integer(name: str, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise field(name, f"must be an integer; got {str(value)[:32]!r}") from None


def number(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise field(name, f"must be a number; got {str(value)[:32]!r}") from None
    if not math.isfinite(number):
        raise field(name, f"must be a finite number; got {str(value)[:32]!r}")
    return number


def boolean(name: str, value: Any) -> bool:
    text = str(value).strip().lower()
    if text in ("true", "1"):
        return True
    if text in ("false", "0"):
        return False
    raise field(name, f"must be true or false; got {str(value)[:32]!r}")
