"""The offline provider: deterministic placeholder images rendered locally.

It needs no key and no network. Each image is a soft gradient with a few
blurred shapes, the prompt set in Noto Sans CJK (so a Chinese prompt is as
readable as an English one) and a footer naming the model, size and seed. The
same request always yields the same bytes, which makes this the provider for
demos, tests and load runs. A group's images are rendered one after another,
the simulated latency spread over them, and each goes to the caller's
`on_image` as it is done, as a streamed upstream's would. Pillow's errors stay
in this module.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import math
import random
from importlib import resources
from typing import TYPE_CHECKING, Literal, TypeAlias

from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

from sia.domain import GeneratedImage, GenerationResult, Usage
from sia.errors import InvalidArgument
from sia.logs import get_logger
from sia.models import ADAPTIVE, ARK_MODELS, KEYWORD_DIMENSIONS, parse_dimensions

if TYPE_CHECKING:
    from collections.abc import Mapping

    from sia.domain import GenerationRequest, OnImage
    from sia.models import ModelSpec

log = get_logger(__name__)

ImageFormat = Literal["jpeg", "png"]
Font: TypeAlias = ImageFont.FreeTypeFont | ImageFont.ImageFont

_CONTENT_TYPES: Mapping[str, str] = {"jpeg": "image/jpeg", "png": "image/png"}
_ADAPTIVE_DIMENSIONS = (1024, 1024)
# The collection's faces are JP, KR, SC, TC, HK; index 2 draws hanzi the Simplified Chinese way.
_FONT_PACKAGE, _FONT_FILE, _FONT_INDEX = "noto_cjk_sans_otc", "NotoSansCJK-Regular.ttc", 2
_MAX_PROMPT_CHARS = 1000
_SKETCH_SIDE = 256
_SMOOTH_SIDE = 1024
_BILINEAR = Image.Resampling.BILINEAR
_DARKEN = [round(v * 0.5) for v in range(256)] * 3
_WHITE = (255, 255, 255)


def dimensions(size: str) -> tuple[int, int]:
    """(width, height) in pixels for a validated size: a keyword, `WxH` or `adaptive`."""
    if size == ADAPTIVE:
        return _ADAPTIVE_DIMENSIONS
    dims = KEYWORD_DIMENSIONS.get(size) or parse_dimensions(size)
    if dims is None:
        raise InvalidArgument.field("size", f"{size!r} is neither a size keyword nor WxH")
    return dims


def effective_seed(request: GenerationRequest) -> int:
    """The request's seed, or one derived from the prompt when it is unset (None or -1)."""
    if request.seed is not None and request.seed != -1:
        return request.seed
    digest = hashlib.sha256(request.prompt.encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


@functools.cache
def _font_path() -> str | None:
    try:
        resource = resources.files(_FONT_PACKAGE) / _FONT_FILE
    except ModuleNotFoundError:
        return None
    return str(resource) if resource.is_file() else None


@functools.lru_cache(maxsize=32)
def prompt_font(size: int) -> Font:
    """The text font at `size` pixels: Noto Sans CJK SC, else Pillow's default font."""
    path = _font_path()
    if path is not None:
        try:
            # BASIC layout keeps the output independent of whether libraqm is present.
            return ImageFont.truetype(
                path, size, index=_FONT_INDEX, layout_engine=ImageFont.Layout.BASIC
            )
        except OSError as exc:
            log.warning("offline_font_unusable", path=path, error=str(exc))
    else:
        log.warning("offline_font_missing", package=_FONT_PACKAGE)
    # Pillow's default font has no CJK glyphs: such a prompt shows as boxes, but still renders.
    return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=8192)
def _advance(font: Font, char: str) -> float:
    # Measuring a whole line per added character is quadratic, and slow for CFF glyphs;
    # the BASIC layout only adds advances (Noto CJK has no `kern` table), so cache them.
    return font.getlength(char)


def _wrap(text: str, font: Font, width: float, limit: int) -> list[str]:
    """Break `text` into lines no wider than `width`, at spaces where it has them.

    Stops once it has more than `limit` lines: the caller cannot show the rest.
    """
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line, line_width = "", 0.0
        for char in paragraph:
            advance = _advance(font, char)
            if not line or line_width + advance <= width:
                line, line_width = line + char, line_width + advance
                continue
            cut = line.rfind(" ")
            if char != " " and cut > 0:
                lines.append(line[:cut])
                line = line[cut + 1 :] + char
            else:
                lines.append(line.rstrip())
                line = char.lstrip()
            if len(lines) > limit:
                return lines
            line_width = sum(_advance(font, c) for c in line)
        lines.append(line)
    return lines


def _layout(text: str, width: int, height: int, base: int) -> tuple[Font, list[str], int]:
    """The largest of a few font sizes at which `text` fits; truncated at the smallest."""
    for size in (base, base * 3 // 4, base // 2, base // 3):
        font = prompt_font(max(size, 10))
        line_height = max(1, round(font.getbbox("国Ag")[3] * 1.3))
        fits = max(1, height // line_height)
        lines = _wrap(text, font, width, fits)
        if len(lines) <= fits:
            return font, lines, line_height
    lines = lines[:fits]
    lines[-1] = lines[-1][: max(0, len(lines[-1]) - 1)] + "…"
    return font, lines, line_height


def _shade(image: Image.Image, box: tuple[int, int, int, int]) -> None:
    """Darken a region of `image` in place so white text on it stays readable."""
    left, top = max(box[0], 0), max(box[1], 0)
    right, bottom = min(box[2], image.width), min(box[3], image.height)
    if right > left and bottom > top:
        image.paste(image.crop((left, top, right, bottom)).point(_DARKEN), (left, top))


def _background(rng: random.Random, width: int, height: int) -> Image.Image:
    """A gradient with blurred shapes, drawn small and scaled up so 4K stays cheap."""
    scale = _SKETCH_SIDE / max(width, height)
    small = (max(1, round(width * scale)), max(1, round(height * scale)))
    colours = [tuple(rng.randrange(40, 256) for _ in range(3)) for _ in range(3)]
    gradient = Image.linear_gradient("L") if rng.random() < 0.6 else Image.radial_gradient("L")
    gradient = gradient.transpose(rng.choice(list(Image.Transpose))).resize(small)
    sketch = ImageOps.colorize(gradient, black=colours[0], white=colours[1], mid=colours[2])
    draw = ImageDraw.Draw(sketch)
    for _ in range(rng.randint(3, 6)):
        x, y = rng.uniform(0, small[0]), rng.uniform(0, small[1])
        r = rng.uniform(0.05, 0.25) * max(small)
        fill = tuple(rng.randrange(256) for _ in range(3))
        shape = draw.ellipse if rng.random() < 0.6 else draw.rectangle
        shape((x - r, y - r, x + r, y + r), fill=fill)
    sketch = sketch.filter(ImageFilter.GaussianBlur(radius=_SKETCH_SIDE / 64))
    # Bilinear up to ~1K, then nearest: blocks of a few pixels are invisible in a blur, and
    # a 4K bilinear upscale alone costs more than the rest of the render.
    step = max(1, math.ceil(max(width, height) / _SMOOTH_SIDE))
    smooth = sketch.resize((math.ceil(width / step), math.ceil(height / step)), _BILINEAR)
    return smooth.resize((width, height), Image.Resampling.NEAREST) if step > 1 else smooth


def _draw_labels(image: Image.Image, footer: str, caption: str) -> None:
    """The footer strip across the bottom and, for a group, an `n / N` tag top right."""
    draw, short = ImageDraw.Draw(image), min(image.size)
    margin, font = max(4, short // 16), prompt_font(max(10, short // 40))
    strip = round(font.getbbox("国Ag")[3] * 1.8)
    _shade(image, (0, image.height - strip, image.width, image.height))
    draw.text((margin, image.height - strip * 0.8), footer, font=font, fill=_WHITE)
    if caption:
        pad = strip // 2
        left = image.width - margin - round(font.getlength(caption)) - 2 * pad
        _shade(image, (left, margin, image.width - margin, margin + strip))
        draw.text((left + pad, margin + strip * 0.2), caption, font=font, fill=_WHITE)


def _draw_prompt(image: Image.Image, prompt: str) -> None:
    """The prompt, wrapped and centred on a darkened panel above the footer."""
    text = "".join(c if c.isprintable() or c == "\n" else " " for c in prompt).strip()
    if not text:
        return
    width, short = image.width, min(image.size)
    margin = max(4, short // 16)
    usable = image.height - short // 20 - 4 * margin
    font, lines, line_height = _layout(text, width - 4 * margin, usable, short // 14)
    block = line_height * (len(lines) - 1) + round(font.getbbox("国Ag")[3])
    top = (image.height - short // 20 - block) // 2
    widest = max(font.getlength(line) for line in lines)
    left, right = round((width - widest) / 2), round((width + widest) / 2)
    _shade(image, (left - margin, top - margin, right + margin, top + block + margin))
    draw = ImageDraw.Draw(image)
    for row, line in enumerate(lines):
        x = (width - font.getlength(line)) / 2
        draw.text((x, top + row * line_height), line, font=font, fill=_WHITE)


def render(
    request: GenerationRequest, *, index: int = 0, image_format: ImageFormat = "jpeg"
) -> GeneratedImage:
    """Image `index` of `request`; the same arguments always give the same bytes."""
    width, height = dimensions(request.size)
    count = request.max_images if request.max_images is not None else 1
    seed = effective_seed(request)
    key = f"{request.model}\0{width}x{height}\0{seed}\0{index}\0{request.prompt}".encode()
    # The generator picks colours and shapes, nothing secret.
    rng = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))  # noqa: S311
    image = _background(rng, width, height)
    footer = f"SIA offline · {request.model} · {width}x{height} · seed {seed}"
    _draw_labels(image, footer, f"{index + 1} / {count}" if count > 1 else "")
    _draw_prompt(image, request.prompt[:_MAX_PROMPT_CHARS])
    out = io.BytesIO()
    if image_format == "png":
        image.save(out, format="PNG", compress_level=1)
    else:
        image.save(out, format="JPEG", quality=85)
    return GeneratedImage(
        index=index,
        data=out.getvalue(),
        size=f"{width}x{height}",
        content_type=_CONTENT_TYPES[image_format],
    )


class OfflineProvider:
    """An `ImageProvider` that draws each image locally; no key, no network."""

    def __init__(
        self,
        *,
        image_format: ImageFormat = "jpeg",
        latency: float = 0.0,
        models: Mapping[str, ModelSpec] = ARK_MODELS,
    ) -> None:
        self._format: ImageFormat = image_format
        self._latency = latency
        self._models = models

    @property
    def name(self) -> str:
        """Short name shown in health answers and metrics."""
        return "offline"

    @property
    def models(self) -> Mapping[str, ModelSpec]:
        """The models this provider serves, by id."""
        return self._models

    async def generate(
        self, request: GenerationRequest, *, timeout: float, on_image: OnImage | None = None
    ) -> GenerationResult:
        """Render the request's images one by one in a thread, each after its share of
        the simulated latency, awaiting `on_image` with each as it is done."""
        width, height = dimensions(request.size)
        count = request.max_images if request.max_images is not None else 1
        images: list[GeneratedImage] = []
        async with asyncio.timeout(timeout):
            for index in range(count):
                await asyncio.sleep(self._latency / count)
                image = await asyncio.to_thread(self._render, request, index)
                images.append(image)
                if on_image is not None:
                    await on_image(image)
        return GenerationResult(
            model=request.model,
            images=tuple(images),
            usage=Usage(generated_images=count, output_tokens=count * width * height // 256),
        )

    async def aclose(self) -> None:
        """Nothing to release; present for the protocol."""

    def _render(self, request: GenerationRequest, index: int) -> GeneratedImage:
        try:
            return render(request, index=index, image_format=self._format)
        except (OSError, ValueError) as exc:
            raise InvalidArgument.field(
                "size", f"the offline provider cannot render {request.size}: {exc}"
            ) from exc
