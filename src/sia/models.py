"""The model catalogue: what each image model accepts.

The limits come from Volcengine Ark's image API (docs/providers.md, "Ark wire notes"):
size keywords versus `WxH`, total pixel range, aspect-ratio range, how many
reference images, and which optional fields a model honours. Validation uses
them to reject a request the upstream would reject, before any work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

ADAPTIVE = "adaptive"

#: Pixel dimensions the offline provider uses for each size keyword.
KEYWORD_DIMENSIONS: Mapping[str, tuple[int, int]] = {
    "1K": (1024, 1024),
    "2K": (2048, 2048),
    "4K": (4096, 4096),
}

#: Most reference images plus generated images in one sequential request.
MAX_GROUP_IMAGES = 15

#: Most characters of a client's value that an error message repeats.
MAX_ECHO_CHARS = 64

# ASCII digits only: str.isdigit also takes superscript and full-width digits, which
# int() refuses or the upstream does not understand; no leading zeros either.
_DIMENSIONS = re.compile(r"([1-9][0-9]*)x([1-9][0-9]*)", re.ASCII | re.IGNORECASE)


def echo(value: str) -> str:
    """`value` quoted for an error message, cut to MAX_ECHO_CHARS with an ellipsis."""
    if len(value) > MAX_ECHO_CHARS:
        value = value[:MAX_ECHO_CHARS] + "…"
    return repr(value)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The request rules of one model.

    `max_images` is the most images one sequential request may ask for;
    `default_max_images` is what an unset `max_images` means (None: as many as
    allowed, which suits Ark, where it is only a cap).
    """

    id: str
    name: str
    default_size: str
    size_keywords: frozenset[str] = frozenset()
    min_pixels: int = 0
    max_pixels: int = 0
    min_ratio: float = 1 / 16
    max_ratio: float = 16.0
    min_reference_images: int = 0
    max_reference_images: int = 0
    sequential: bool = False
    seed: bool = False
    guidance_scale: bool = False
    only_sizes: frozenset[str] = field(default_factory=frozenset)
    max_images: int = MAX_GROUP_IMAGES
    default_max_images: int | None = None

    def check_size(self, size: str) -> str | None:
        """None when `size` is valid for this model, else what is wrong with it."""
        if self.only_sizes:
            if size in self.only_sizes:
                return None
            return f"{self.id} accepts only size {', '.join(sorted(self.only_sizes))}"
        if size in KEYWORD_DIMENSIONS:
            if size in self.size_keywords:
                return None
            keywords = ", ".join(sorted(self.size_keywords)) or "none"
            return f"{self.id} does not accept {echo(size)} (keywords it accepts: {keywords})"
        dims = parse_dimensions(size)
        if dims is None:
            return f"{echo(size)} is neither a size keyword nor WxH in pixels"
        width, height = dims
        pixels = width * height
        if not self.min_pixels <= pixels <= self.max_pixels:
            return (
                f"{size} is {pixels:,} pixels; {self.id} needs "
                f"{self.min_pixels:,} to {self.max_pixels:,}"
            )
        ratio = width / height
        if not self.min_ratio <= ratio <= self.max_ratio:
            return f"{size} has aspect ratio {ratio:.3g}; {self.id} needs 1/16 to 16"
        return None


def parse_dimensions(size: str) -> tuple[int, int] | None:
    """(width, height) for a `WxH` string of positive ASCII integers, else None."""
    match = _DIMENSIONS.fullmatch(size)
    return None if match is None else (int(match[1]), int(match[2]))


SEEDREAM_4_0 = ModelSpec(
    id="doubao-seedream-4-0-250828",
    name="Seedream 4.0",
    default_size="2048x2048",
    size_keywords=frozenset({"1K", "2K", "4K"}),
    min_pixels=1280 * 720,
    max_pixels=4096 * 4096,
    max_reference_images=14,
    sequential=True,
)
SEEDREAM_4_5 = ModelSpec(
    id="doubao-seedream-4-5-251128",
    name="Seedream 4.5",
    default_size="2048x2048",
    size_keywords=frozenset({"2K", "4K"}),
    min_pixels=2560 * 1440,
    max_pixels=4096 * 4096,
    max_reference_images=14,
    sequential=True,
)
SEEDREAM_3_0_T2I = ModelSpec(
    id="doubao-seedream-3-0-t2i-250415",
    name="Seedream 3.0 text-to-image",
    default_size="1024x1024",
    min_pixels=512 * 512,
    max_pixels=2048 * 2048,
    min_ratio=0.0,
    max_ratio=float("inf"),
    seed=True,
    guidance_scale=True,
)
SEEDEDIT_3_0_I2I = ModelSpec(
    id="doubao-seededit-3-0-i2i-250628",
    name="SeedEdit 3.0 image-to-image",
    default_size=ADAPTIVE,
    only_sizes=frozenset({ADAPTIVE}),
    min_reference_images=1,
    max_reference_images=1,
    seed=True,
    guidance_scale=True,
)

#: The models of Volcengine Ark's image API, by id.
ARK_MODELS: Mapping[str, ModelSpec] = {
    m.id: m for m in (SEEDREAM_4_0, SEEDREAM_4_5, SEEDREAM_3_0_T2I, SEEDEDIT_3_0_I2I)
}
