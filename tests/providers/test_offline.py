"""Tests for the offline provider: sizes, formats, determinism, text and timing."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from typing import Any

import pytest
from PIL import Image, ImageChops, ImageFont

from sia.domain import GenerationRequest
from sia.errors import InvalidArgument
from sia.models import SEEDEDIT_3_0_I2I, SEEDREAM_3_0_T2I, SEEDREAM_4_0
from sia.providers import offline
from sia.providers.offline import OfflineProvider
from tests.providers.arrivals import Arrivals

CAT = "一只可爱的小猫在花园里玩耍"


def _request(**fields: Any) -> GenerationRequest:
    values: dict[str, Any] = {"prompt": CAT, "model": SEEDREAM_4_0.id, "size": "1280x720"}
    return GenerationRequest(**(values | fields))


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize(
    ("model", "size", "expected"),
    [
        (SEEDREAM_4_0.id, "1K", (1024, 1024)),
        (SEEDREAM_4_0.id, "1280x720", (1280, 720)),
        (SEEDREAM_3_0_T2I.id, "720x1280", (720, 1280)),
        (SEEDREAM_3_0_T2I.id, "3840x240", (3840, 240)),
        (SEEDEDIT_3_0_I2I.id, "adaptive", (1024, 1024)),
    ],
)
async def test_image_has_exact_pixel_size(model: str, size: str, expected: tuple[int, int]) -> None:
    """Keywords, WxH and adaptive each resolve to exactly the expected pixel size."""
    result = await OfflineProvider().generate(_request(model=model, size=size), timeout=10)
    (image,) = result.images
    assert _open(image.data).size == expected
    assert image.size == f"{expected[0]}x{expected[1]}"
    assert image.index == 0
    assert image.ok
    assert result.model == model


async def test_4k_keyword_renders_4096_square() -> None:
    """The 4K keyword gives a 4096x4096 image."""
    result = await OfflineProvider().generate(_request(size="4K"), timeout=30)
    assert _open(result.images[0].data).size == (4096, 4096)


@pytest.mark.parametrize(
    ("image_format", "pil_format", "content_type"),
    [("jpeg", "JPEG", "image/jpeg"), ("png", "PNG", "image/png")],
)
async def test_image_format(image_format: Any, pil_format: str, content_type: str) -> None:
    """The encoded bytes and the content type follow `image_format`."""
    provider = OfflineProvider(image_format=image_format)
    (image,) = (await provider.generate(_request(), timeout=10)).images
    assert image.content_type == content_type
    decoded = _open(image.data)
    assert decoded.format == pil_format
    assert decoded.size == (1280, 720)


async def test_same_request_gives_same_bytes() -> None:
    """Two providers render byte-identical images for the same request."""
    request = _request(seed=7)
    first = await OfflineProvider().generate(request, timeout=10)
    second = await OfflineProvider().generate(request, timeout=10)
    assert first.images[0].data == second.images[0].data


async def test_unset_seed_is_derived_from_the_prompt() -> None:
    """Without a seed (None or -1) the output depends on the prompt alone, deterministically."""
    provider = OfflineProvider()
    unset = await provider.generate(_request(seed=None), timeout=10)
    minus_one = await provider.generate(_request(seed=-1), timeout=10)
    other = await provider.generate(_request(seed=None, prompt="a lighthouse"), timeout=10)
    assert unset.images[0].data == minus_one.images[0].data
    assert unset.images[0].data != other.images[0].data


async def test_different_seed_gives_different_bytes() -> None:
    """Changing only the seed changes the image."""
    provider = OfflineProvider()
    one = await provider.generate(_request(seed=1), timeout=10)
    two = await provider.generate(_request(seed=2), timeout=10)
    assert one.images[0].data != two.images[0].data


async def test_sequential_request_yields_max_images_distinct_images() -> None:
    """A group request gives exactly max_images images, indexed 0..n-1, all different."""
    result = await OfflineProvider().generate(_request(max_images=3), timeout=10)
    assert [image.index for image in result.images] == [0, 1, 2]
    assert len({image.data for image in result.images}) == 3
    assert all(_open(image.data).size == (1280, 720) for image in result.images)


async def test_usage_counts_images_and_pixels() -> None:
    """Usage reports the image count and one output token per 256 pixels."""
    single = await OfflineProvider().generate(_request(), timeout=10)
    group = await OfflineProvider().generate(_request(max_images=3), timeout=10)
    assert single.usage.generated_images == 1
    assert single.usage.output_tokens == 1280 * 720 // 256
    assert group.usage.generated_images == 3
    assert group.usage.output_tokens == 3 * 1280 * 720 // 256


def test_prompt_font_has_chinese_glyphs() -> None:
    """The prompt font is Noto Sans CJK SC and draws every hanzi of the demo prompt."""
    font = offline.prompt_font(48)
    assert isinstance(font, ImageFont.FreeTypeFont)
    assert font.getname()[0] == "Noto Sans CJK SC"
    missing = bytes(font.getmask("\ue000"))  # a private-use code point: the .notdef box
    for char in CAT:
        mask = font.getmask(char)
        assert mask.getbbox() is not None
        assert bytes(mask) != missing, char


async def test_chinese_prompt_puts_ink_on_the_image() -> None:
    """A Chinese prompt changes the rendered image compared with an empty one."""
    provider = OfflineProvider(image_format="png")
    blank = await provider.generate(_request(prompt="", seed=3), timeout=10)
    cat = await provider.generate(_request(prompt=CAT, seed=3), timeout=10)
    diff = ImageChops.difference(_open(blank.images[0].data), _open(cat.images[0].data))
    changed = sum(diff.convert("L").histogram()[1:])
    assert changed > 1280 * 720 // 50


async def test_long_and_odd_prompts_render() -> None:
    """A very long prompt, control characters and emoji render without error."""
    provider = OfflineProvider()
    for prompt in ("猫" * 5000, "tab\tnul\x00 emoji 😀\nnew line", "word " * 800):
        result = await provider.generate(_request(prompt=prompt, size="1024x512"), timeout=10)
        assert _open(result.images[0].data).size == (1024, 512)


async def test_unencodable_size_raises_invalid_argument() -> None:
    """A size Pillow cannot encode becomes InvalidArgument on `size`, not a Pillow error."""
    with pytest.raises(InvalidArgument) as caught:
        await OfflineProvider().generate(_request(size="70000x16"), timeout=10)
    assert caught.value.violations[0].field == "size"


def test_unparseable_size_raises_invalid_argument() -> None:
    """A size that is neither a keyword, WxH nor adaptive is rejected on `size`."""
    with pytest.raises(InvalidArgument) as caught:
        offline.dimensions("huge")
    assert caught.value.violations[0].field == "size"


async def test_rendering_runs_off_the_event_loop_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU work runs in a worker thread, not on the loop's thread."""
    threads: list[threading.Thread] = []
    real_render = offline.render

    def spy(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread())
        return real_render(*args, **kwargs)

    monkeypatch.setattr(offline, "render", spy)
    await OfflineProvider().generate(_request(), timeout=10)
    assert threads
    assert threading.main_thread() not in threads


async def test_latency_is_awaited() -> None:
    """The simulated latency delays the result."""
    start = time.monotonic()
    await OfflineProvider(latency=0.2).generate(_request(), timeout=10)
    assert time.monotonic() - start >= 0.2


async def test_cancellation_is_prompt() -> None:
    """Cancelling a call that is waiting out its latency ends it at once."""
    task = asyncio.create_task(OfflineProvider(latency=5).generate(_request(), timeout=10))
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.wait({task}, timeout=2)  # well before the latency would end it
    assert task.cancelled()


async def test_latency_beyond_timeout_raises_timeout_error() -> None:
    """When the latency exceeds the timeout the call gives up after the timeout."""
    start = time.monotonic()
    with pytest.raises(TimeoutError):  # the latency alone would end it after 5 s, without one
        await OfflineProvider(latency=5).generate(_request(), timeout=0.1)
    assert time.monotonic() - start >= 0.09


async def test_each_image_reaches_on_image_in_order() -> None:
    """on_image gets each image of a group once, by index, as the result holds them."""
    arrivals = Arrivals()
    result = await OfflineProvider().generate(_request(max_images=3), timeout=10, on_image=arrivals)
    assert arrivals.indexes == [0, 1, 2]
    assert arrivals.images == list(result.images)


async def test_latency_spreads_a_group_over_its_callbacks() -> None:
    """With a latency, a group's images come to on_image one share of it apart, the first
    long before the group is done."""
    latency, count = 0.6, 3
    gap = latency / count
    arrivals = Arrivals()
    start = time.monotonic()
    await OfflineProvider(latency=latency).generate(
        _request(max_images=count), timeout=10, on_image=arrivals
    )
    returned = time.monotonic()
    assert returned - start >= latency - 0.01
    assert arrivals.times[0] - start >= gap - 0.01
    assert arrivals.times[0] < returned - (count - 1) * gap / 2
    assert all(b - a >= gap / 2 for a, b in zip(arrivals.times, arrivals.times[1:], strict=False))


async def test_what_on_image_raises_ends_the_group() -> None:
    """An on_image error comes out of generate as is; no later image follows."""
    error = RuntimeError("the store is full")
    arrivals = Arrivals(error=error)
    with pytest.raises(RuntimeError) as caught:
        await OfflineProvider().generate(_request(max_images=3), timeout=10, on_image=arrivals)
    assert caught.value is error
    assert arrivals.indexes == [0]


async def test_name_models_and_idempotent_close() -> None:
    """The provider names itself, serves the given models and closes twice quietly."""
    models = {SEEDREAM_4_0.id: SEEDREAM_4_0}
    provider = OfflineProvider(models=models)
    assert provider.name == "offline"
    assert provider.models is models
    await provider.aclose()
    await provider.aclose()
