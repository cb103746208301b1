"""Tests for request validation: every rule names the field it rejects."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from sia.domain import ResponseFormat
from sia.errors import InvalidArgument
from sia.models import ARK_MODELS, ModelSpec
from sia.validation import Defaults, validate_request

DEFAULTS = Defaults(model="doubao-seedream-4-0-250828", size="2K", models=ARK_MODELS)
SEEDREAM_45 = "doubao-seedream-4-5-251128"
SEEDREAM_30 = "doubao-seedream-3-0-t2i-250415"
SEEDEDIT = "doubao-seededit-3-0-i2i-250628"


def data_uri(
    fmt: str = "png", size: tuple[int, int] = (64, 64), declared: str | None = None
) -> str:
    """A data URI holding a real image of `fmt`, declared as `declared`."""
    buf = io.BytesIO()
    Image.new("RGB", size, "red").save(buf, format=fmt.upper())
    payload = base64.b64encode(buf.getvalue()).decode()
    return f"data:image/{declared or fmt};base64,{payload}"


def violations(**kwargs: object) -> dict[str, str]:
    """The field violations validate_request raises for kwargs."""
    kwargs.setdefault("prompt", "a cat")
    with pytest.raises(InvalidArgument) as info:
        validate_request(DEFAULTS, **kwargs)  # type: ignore[arg-type]
    return {v.field: v.description for v in info.value.violations}


def test_defaults_fill_model_and_size() -> None:
    """An empty model and size resolve to the server defaults."""
    request = validate_request(DEFAULTS, prompt="  a cat  ")
    assert (request.prompt, request.model, request.size) == ("a cat", DEFAULTS.model, "2K")
    assert request.response_format is ResponseFormat.URL
    assert request.max_images is None
    assert request.watermark is None


def test_default_size_falls_back_to_model_default() -> None:
    """A model that rejects the default keyword gets its own default size."""
    assert validate_request(DEFAULTS, prompt="x", model=SEEDREAM_30).size == "1024x1024"


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt(prompt: str) -> None:
    """An empty prompt is rejected."""
    assert violations(prompt=prompt) == {"prompt": "must not be empty"}


def test_over_long_prompt() -> None:
    """A prompt over 4,000 characters is rejected with its length."""
    assert "4001 characters" in violations(prompt="x" * 4001)["prompt"]


def test_unknown_model() -> None:
    """An unknown model is rejected and the known ones are listed."""
    message = violations(model="dall-e-9")["model"]
    assert "unknown model 'dall-e-9'" in message
    assert DEFAULTS.model in message


@pytest.mark.parametrize(
    ("model", "size", "fragment"),
    [
        (DEFAULTS.model, "800x800", "640,000 pixels"),
        (DEFAULTS.model, "5000x5000", "25,000,000 pixels"),
        (DEFAULTS.model, "8000x200", "aspect ratio"),
        (DEFAULTS.model, "big", "neither a size keyword nor WxH"),
        (DEFAULTS.model, "0x100", "neither a size keyword nor WxH"),
        (SEEDREAM_45, "1K", "does not accept '1K'"),
        (SEEDREAM_45, "1500x1500", "2,250,000 pixels"),
        (SEEDREAM_30, "2K", "does not accept '2K'"),
        (SEEDEDIT, "1024x1024", "accepts only size adaptive"),
    ],
)
def test_bad_sizes(model: str, size: str, fragment: str) -> None:
    """Sizes outside the model's keywords, pixel range or ratio are rejected."""
    kwargs: dict[str, object] = {"model": model, "size": size}
    if model == SEEDEDIT:
        kwargs["images"] = ["https://example.com/a.png"]
    assert fragment in violations(**kwargs)["size"]


@pytest.mark.parametrize(
    ("model", "size"),
    [
        (DEFAULTS.model, "1600x600"),
        (DEFAULTS.model, "4K"),
        (SEEDREAM_45, "3750x1250"),
        (SEEDREAM_30, "512x512"),
    ],
)
def test_good_sizes(model: str, size: str) -> None:
    """Sizes within the model's rules pass (examples from the Ark docs)."""
    assert validate_request(DEFAULTS, prompt="x", model=model, size=size).size == size


def test_reference_images_accepted() -> None:
    """http(s) URLs and well-formed data URIs are accepted as references."""
    refs = ["https://example.com/a.png", "http://example.com/b.jpg", data_uri("png")]
    assert validate_request(DEFAULTS, prompt="x", images=refs).images == tuple(refs)


@pytest.mark.parametrize(
    ("ref", "fragment"),
    [
        ("ftp://example.com/a.png", "http(s) URL"),
        ("example.com/a.png", "http(s) URL"),
        ("https://", "http(s) URL"),
        ("data:image/png,abc", "malformed data URI"),
        ("data:text/plain;base64,aGk=", "malformed data URI"),
        ("data:image/svg;base64,aGk=", "unsupported image format 'svg'"),
        ("data:image/PNG;base64,aGk=", "unsupported image format 'PNG'"),
        ("data:image/png;base64,@@@", "not valid base64"),
        ("data:image/png;base64,aGVsbG8=", "not a readable png image"),
    ],
)
def test_bad_reference_images(ref: str, fragment: str) -> None:
    """Malformed URIs, bad schemes and unsupported formats name the image's index."""
    assert fragment in violations(images=["https://example.com/ok.png", ref])["images[1]"]


def test_reference_format_mismatch() -> None:
    """A data URI whose payload is another format than it declares is rejected."""
    assert (
        "says jpeg but the payload is PNG"
        in violations(images=[data_uri("png", declared="jpeg")])["images[0]"]
    )


def test_reference_too_small() -> None:
    """A reference image with a side under 15 px is rejected."""
    assert "at least 15 px" in violations(images=[data_uri("png", size=(10, 64))])["images[0]"]


def test_too_many_reference_images() -> None:
    """More than 14 reference images are rejected."""
    assert "at most 14" in violations(images=["https://e.com/a.png"] * 15)["images"]


def test_model_reference_rules() -> None:
    """SeedEdit needs exactly one reference; Seedream 3.0 takes none."""
    assert "exactly 1" in violations(model=SEEDEDIT)["images"]
    assert (
        "takes no reference" in violations(model=SEEDREAM_30, images=["https://e.com/a"])["images"]
    )


def test_sequential_defaults_and_limits() -> None:
    """A group's max_images defaults to 15 minus references and must fit 1..15."""
    two_refs = ["https://e.com/a.png", "https://e.com/b.png"]
    request = validate_request(DEFAULTS, prompt="x", images=two_refs, sequential=True)
    assert request.max_images == 13
    assert request.sequential
    for bad in (0, 16, -1):
        assert "between 1 and 15" in violations(sequential=True, max_images=bad)["max_images"]
    assert "exceed 15" in violations(sequential=True, max_images=14, images=two_refs)["max_images"]


def test_sequential_limit_follows_the_model() -> None:
    """A model allowing 10 images per group defaults to 10 and rejects 11."""
    small = ModelSpec(
        id="ten", name="Ten", default_size="1024x1024", sequential=True, max_images=10
    )
    defaults = Defaults(model="ten", size="1024x1024", models={"ten": small})
    assert validate_request(defaults, prompt="x", sequential=True).max_images == 10
    assert validate_request(defaults, prompt="x", sequential=True, max_images=10).max_images == 10
    with pytest.raises(InvalidArgument, match="between 1 and 10"):
        validate_request(defaults, prompt="x", sequential=True, max_images=11)


def test_sequential_needs_a_group_model() -> None:
    """Models without group generation reject sequential requests."""
    assert "does not support sequential" in violations(model=SEEDREAM_30, sequential=True)["model"]


def test_seed_guidance_request_id_ranges() -> None:
    """seed, guidance_scale and request_id are range-checked."""
    found = violations(seed=-2, guidance_scale=11.0, request_id="has space")
    assert set(found) == {"seed", "guidance_scale", "request_id"}
    assert "between 1 and 10" in violations(guidance_scale=float("nan"))["guidance_scale"]


def test_all_problems_reported_together() -> None:
    """Several bad fields are reported in one error."""
    found = violations(prompt="", size="huge", images=["nope"])
    assert set(found) == {"prompt", "size", "images[0]"}


def test_model_default_group_size() -> None:
    """A model's default_max_images applies when max_images is unset (OpenAI's exact `n`)."""
    spec = ModelSpec(
        id="n", name="N", default_size="1024x1024", sequential=True, max_images=10,
        default_max_images=4,
    )  # fmt: skip
    defaults = Defaults(model="n", size="1024x1024", models={"n": spec})
    assert validate_request(defaults, prompt="x", sequential=True).max_images == 4


REF = "https://e.com/a.png"


@pytest.mark.parametrize(
    ("accepted", "rejected", "field"),
    [
        ({"prompt": "x" * 4000}, {"prompt": "x" * 4001}, "prompt"),
        ({"prompt": " " + "x" * 4000 + " "}, {"prompt": " " + "x" * 4001}, "prompt"),
        ({"images": [REF] * 14}, {"images": [REF] * 15}, "images"),
        ({"images": [data_uri(size=(15, 64))]}, {"images": [data_uri(size=(14, 64))]}, "images[0]"),
        ({"images": [data_uri(size=(64, 15))]}, {"images": [data_uri(size=(64, 14))]}, "images[0]"),
        (
            {"images": ["https://e.com/" + "a" * (4096 - 14)]},
            {"images": ["https://e.com/" + "a" * (4097 - 14)]},
            "images[0]",
        ),
        (
            {"sequential": True, "max_images": 15},
            {"sequential": True, "max_images": 16},
            "max_images",
        ),
        (
            {"sequential": True, "max_images": 1},
            {"sequential": True, "max_images": 0},
            "max_images",
        ),
        (
            {"sequential": True, "max_images": 13, "images": [REF] * 2},
            {"sequential": True, "max_images": 14, "images": [REF] * 2},
            "max_images",
        ),
        (
            {"sequential": True, "max_images": 1, "images": [REF] * 14},
            {"sequential": True, "max_images": 2, "images": [REF] * 14},
            "max_images",
        ),
        ({"seed": -1}, {"seed": -2}, "seed"),
        ({"seed": 2_147_483_647}, {"seed": 2_147_483_648}, "seed"),
        ({"guidance_scale": 1.0}, {"guidance_scale": 0.999}, "guidance_scale"),
        ({"guidance_scale": 10.0}, {"guidance_scale": 10.001}, "guidance_scale"),
        ({"request_id": "r" * 128}, {"request_id": "r" * 129}, "request_id"),
        ({"request_id": "!~"}, {"request_id": "a\x7f"}, "request_id"),
        # Sizes, per model: the pixel range and the aspect ratio, each end.
        ({"size": "1280x720"}, {"size": "1279x720"}, "size"),
        ({"size": "4096x4096"}, {"size": "4097x4096"}, "size"),
        ({"size": "4096x256"}, {"size": "4097x256"}, "size"),
        ({"size": "256x4096"}, {"size": "256x4097"}, "size"),
        (
            {"model": SEEDREAM_45, "size": "2560x1440"},
            {"model": SEEDREAM_45, "size": "2559x1440"},
            "size",
        ),
        (
            {"model": SEEDREAM_45, "size": "4096x4096"},
            {"model": SEEDREAM_45, "size": "4096x4097"},
            "size",
        ),
        (
            {"model": SEEDREAM_30, "size": "512x512"},
            {"model": SEEDREAM_30, "size": "511x512"},
            "size",
        ),
        (
            {"model": SEEDREAM_30, "size": "2048x2048"},
            {"model": SEEDREAM_30, "size": "2049x2048"},
            "size",
        ),
        (
            {"model": SEEDREAM_30, "size": "4096x64"},
            {"model": SEEDREAM_30, "size": "4096x63"},
            "size",
        ),
        (
            {"model": SEEDEDIT, "images": [REF]},
            {"model": SEEDEDIT, "images": [REF] * 2},
            "images",
        ),
    ],
)
def test_every_limit_on_both_sides_of_its_edge(
    accepted: dict[str, object], rejected: dict[str, object], field: str
) -> None:
    """The last value inside each limit passes; the first one outside names its field."""
    validate_request(DEFAULTS, **{"prompt": "a cat", **accepted})  # type: ignore[arg-type]
    assert set(violations(**rejected)) == {field}


FULL_WIDTH_1024 = "\uff11\uff10\uff12\uff14x\uff11\uff10\uff12\uff14"


@pytest.mark.parametrize(
    "size",
    # Superscript two; full-width digits; Arabic-Indic digits; a leading zero.
    [
        "²x²",
        "1024x1024²",
        FULL_WIDTH_1024,
        "1280x\uff17\uff12\uff10",
        "1280x720\u0663",
        "\u0663x\u0663",
        "01280x720",
    ],
)
def test_sizes_take_ascii_digits_only(size: str) -> None:
    """Superscript, full-width and other non-ASCII digits (and leading zeros) name `size`."""
    assert "neither a size keyword nor WxH" in violations(size=size)["size"]


@pytest.mark.parametrize(
    "ref",
    [
        "http://[",
        "http://[::1",
        "http://℀/",
        "http://example.com:99999/a.png",
        "http://example.com:port/a.png",
        "http://exa mple.com/a.png",
        "http://example.com/a\x00.png",
        "http://example.com/\na.png",
    ],
)
def test_unparseable_urls_name_the_image(ref: str) -> None:
    """Every URL the parser refuses, or that holds spaces or control characters, is named."""
    assert "http(s) URL" in violations(images=[REF, ref])["images[1]"]


@pytest.mark.parametrize(
    ("field", "limit"), [("model", 128), ("size", 32), ("request_id", 128), ("prompt", 4000)]
)
def test_string_fields_have_length_limits(field: str, limit: int) -> None:
    """A value past its field's limit is refused by length, not echoed back in full."""
    found = violations(**{field: "7" * (limit + 1)})
    assert set(found) == {field}
    assert str(limit) in found[field]
    assert "7" * 65 not in found[field]
    huge = violations(**{field: "7" * 10_000})[field]
    assert len(huge) < 200


def test_echoed_values_are_cut_short() -> None:
    """A bad value within its length limit is echoed at most 64 characters long."""
    for description in (
        violations(model="m" * 128)["model"],
        ARK_MODELS[DEFAULTS.model].check_size("s" * 100) or "",
    ):
        assert "…" in description
        assert max(len(run) for run in description.replace("…", " ").split()) <= 66
