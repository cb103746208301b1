"""Property-based fuzzing of every ImageService RPC against a real server.

Hypothesis builds arbitrary messages (unicode and huge text, integers and
enums out of range, reference lists of URL-like and data-URI-like strings)
and sends each over a real channel to an App with the offline provider. Every
answer must be the server's own: never INTERNAL or UNKNOWN, always with the
server's ErrorInfo (so the trailer arrived whole), and every INVALID_ARGUMENT
names fields the request has.

`make test` runs the `sia-rpc` profile (200 examples per RPC); `make fuzz`
sets HYPOTHESIS_PROFILE=fuzz for 10,000 per RPC.
"""

from __future__ import annotations

import base64
import io
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from PIL import Image

from sia.api.image.v1 import image_service_pb2 as pb
from sia.api.image.v1 import image_service_pb2_grpc as pb_grpc
from sia.app import App
from sia.config import Settings
from sia.models import ARK_MODELS
from sia.rpc.errors import DOMAIN
from tests.helpers import TEST_SIZE, MakeSettings

settings.register_profile(
    "sia-rpc",
    max_examples=200,
    deadline=None,
    # Failures print a reproduce blob instead of writing .hypothesis/ into the tree.
    database=None,
    print_blob=True,
    # One server serves every example of a test: that is the point, not a leak.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile("fuzz", parent=settings.get_profile("sia-rpc"), max_examples=10_000)
PROFILE = settings(
    settings.get_profile("fuzz" if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else "sia-rpc")
)

INT32 = st.integers(-(2**31), 2**31 - 1)
#: Characters that have surprised parsers: digits that are not ASCII, brackets, NFKC traps.
TRICKY = st.sampled_from(
    ["", " ", "\x00", "\t", "\n", "²", "\uff11", "\u0663", "℀", "[", "]", "%", ":", "/", "x",
     "X", "\u00d7",
     "é", "模", "😀", "\u202e", "\ufeff", "\ud7ff", "…"]
)  # fmt: skip
SHORT = st.text(max_size=12) | TRICKY
#: Text of any length up to 40,000 characters: a short piece repeated keeps generation cheap.
TEXT = st.one_of(
    st.text(),
    SHORT,
    st.builds(lambda piece, n: piece * n, st.text(min_size=1, max_size=3), st.integers(1, 20_000)),
)


def _image_uri(fmt: str, side: tuple[int, int] = (64, 64)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", side, "teal").save(buf, format=fmt.upper())
    return f"data:image/{fmt};base64,{base64.b64encode(buf.getvalue()).decode()}"


VALID_REFS = [_image_uri("png"), _image_uri("jpeg"), _image_uri("png", (8, 64))]
URLS = st.builds(
    "".join,
    st.tuples(
        st.sampled_from(["http://", "https://", "HTTP://", "ftp://", "http:/", "//", ""]),
        st.sampled_from(["example.com", "[", "[::1", "[::1]", "℀", "a:99999", "a:x", "1.2.3.4"])
        | SHORT,
        st.sampled_from(["", "/a.png", "/?q=1#f"]) | SHORT,
    ),
)
DATA_URIS = st.builds(
    "{}{}{}{}".format,
    st.sampled_from(["data:", "data:image/", "DATA:image/"]),
    st.sampled_from(["png", "jpeg", "jpg", "webp", "gif", "PNG", "svg", "", "png;charset=x"])
    | SHORT,
    st.sampled_from([";base64,", ",", ";base64"]),
    st.one_of(
        st.binary(max_size=96).map(lambda b: base64.b64encode(b).decode()),
        st.sampled_from([uri.partition(",")[2] for uri in VALID_REFS]),
        SHORT,
    ),
)
REFERENCES = st.lists(st.one_of(URLS, DATA_URIS, st.sampled_from(VALID_REFS), TEXT), max_size=20)
#: ASCII digits, superscript two, Arabic-Indic one, full-width one.
DIGITS = "0123456789²\u0661\uff11"
MODELS = st.sampled_from(["", " ", *ARK_MODELS]) | TEXT
SIZES = st.one_of(
    st.sampled_from(["", "1K", "2K", "4K", "adaptive", TEST_SIZE, "1280X720", "0x0", "auto"]),
    st.builds(
        "{}{}{}".format,
        st.integers() | st.text(alphabet=DIGITS, max_size=6),
        st.sampled_from(["x", "X", "\u00d7", "*", " x "]),
        st.integers() | st.text(alphabet=DIGITS, max_size=6),
    ),
    TEXT,
)
FORMATS = st.sampled_from(list(pb.ResponseFormat.values())) | INT32
DOUBLES = st.floats(allow_nan=True, allow_infinity=True)


#: Each field's arbitrary values (None: leave an optional field unset).
ANY_FIELD: dict[str, st.SearchStrategy[Any]] = {
    "prompt": st.sampled_from(["a cat", "一只猫"]) | TEXT,
    "model": MODELS,
    "size": SIZES,
    "response_format": FORMATS,
    "images": REFERENCES,
    "watermark": st.none() | st.booleans(),
    "request_id": TEXT | st.text(st.characters(min_codepoint=0, max_codepoint=127)),
    "seed": st.none() | INT32,
    "guidance_scale": st.none() | DOUBLES,
    "max_images": st.none() | st.integers(-2, 17) | INT32,
}
#: Values that pass, small enough to render fast, so a request with one bad field reaches
#: the checks that run only once the others are good (sizes need a known model).
GOOD_FIELD: dict[str, st.SearchStrategy[Any]] = {
    "prompt": st.sampled_from(["a cat", "一只猫"]),
    "model": st.sampled_from(["", "doubao-seedream-4-0-250828"]),
    "size": st.sampled_from(["", TEST_SIZE, "1K"]),
    "response_format": st.sampled_from(list(pb.ResponseFormat.values())),
    "images": st.lists(st.sampled_from([*VALID_REFS[:2], "https://example.com/a.png"]), max_size=2),
    "watermark": st.none() | st.booleans(),
    "request_id": st.just(""),
    "seed": st.none(),
    "guidance_scale": st.none(),
    "max_images": st.sampled_from([1, 2]),
}


def _fields(draw: st.DrawFn, names: tuple[str, ...]) -> dict[str, Any]:
    """Every field arbitrary, or all good but one; unset optional fields left out."""
    mutated = draw(st.sampled_from([None, *names]))
    fields = {}
    for name in names:
        value = draw(ANY_FIELD[name] if mutated in (None, name) else GOOD_FIELD[name])
        if value is not None:
            fields[name] = value
    return fields


COMMON = ("prompt", "model", "size", "response_format", "images", "watermark")


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateImageRequest:
    """Arbitrary GenerateImageRequests, every field drawn."""
    names = (*COMMON, "request_id", "seed", "guidance_scale")
    return pb.GenerateImageRequest(**_fields(draw, names))


@st.composite
def sequential_requests(draw: st.DrawFn) -> pb.GenerateSequentialImagesRequest:
    """Arbitrary GenerateSequentialImagesRequests."""
    return pb.GenerateSequentialImagesRequest(**_fields(draw, (*COMMON, "max_images")))


TASK_IDS = st.one_of(TEXT, st.builds("task_{}".format, SHORT), st.just("task_" + "a" * 24))


def check_answer(err: grpc.aio.AioRpcError, request: Any) -> None:
    """The failure is the server's own, and an INVALID_ARGUMENT names the request's fields."""
    note(f"answer: {err.code()} {(err.details() or '')[:300]!r}")
    assert err.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
    status = rpc_status.from_call(err)  # type: ignore[arg-type]  # AioRpcError is a grpc.Call
    assert status is not None, "the server's status details did not arrive"
    found: dict[type, Any] = {}
    for any_msg in status.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest):
            if any_msg.Is(cls.DESCRIPTOR):
                found[cls] = cls()
                any_msg.Unpack(found[cls])
    assert found[error_details_pb2.ErrorInfo].domain == DOMAIN
    if err.code() != grpc.StatusCode.INVALID_ARGUMENT:
        return
    violations = found[error_details_pb2.BadRequest].field_violations
    assert violations, "INVALID_ARGUMENT without a field violation"
    fields = request.DESCRIPTOR.fields_by_name
    for violation in violations:
        name, index = re.fullmatch(r"([a-z_]+)(?:\[(\d+)\])?", violation.field).groups()  # type: ignore[union-attr]
        assert name in fields, f"{violation.field!r} is not a field of the request"
        if index is not None:
            assert int(index) < len(getattr(request, name))


async def exercise(call: Callable[..., Awaitable[Any]], request: Any) -> None:
    """Send one request; a generous deadline turns a hang into a failure, not a stuck run."""
    try:
        await call(request, timeout=120)
    except grpc.aio.AioRpcError as err:
        failure = err
    else:
        event("OK")
        return
    event(failure.code().name)
    assert failure.code() != grpc.StatusCode.DEADLINE_EXCEEDED, "the call hung"
    check_answer(failure, request)


@pytest.fixture
async def app(make_settings: MakeSettings) -> AsyncIterator[App]:
    """The offline provider with no artificial latency, as fast as the fuzzer can send."""
    config: Settings = make_settings(image_provider="offline", offline_latency=0)
    async with App(config) as running:
        yield running


Stub = pb_grpc.ImageServiceStub


@PROFILE
@given(request=generate_requests())
async def test_generate_image_answers_are_the_servers_own(stub: Stub, request: Any) -> None:
    """GenerateImage with arbitrary messages."""
    await exercise(stub.GenerateImage, request)


@PROFILE
@given(request=sequential_requests())
async def test_generate_sequential_answers_are_the_servers_own(stub: Stub, request: Any) -> None:
    """GenerateSequentialImages with arbitrary messages."""
    await exercise(stub.GenerateSequentialImages, request)


@PROFILE
@given(request=generate_requests())
async def test_generate_async_answers_are_the_servers_own(stub: Stub, request: Any) -> None:
    """GenerateImageAsync with arbitrary messages."""
    await exercise(stub.GenerateImageAsync, request)


@PROFILE
@given(task_id=TASK_IDS)
async def test_get_task_answers_are_the_servers_own(stub: Stub, task_id: str) -> None:
    """GetImageTask with arbitrary ids."""
    await exercise(stub.GetImageTask, pb.GetImageTaskRequest(task_id=task_id))


@PROFILE
@given(task_id=TASK_IDS)
async def test_cancel_task_answers_are_the_servers_own(stub: Stub, task_id: str) -> None:
    """CancelImageTask with arbitrary ids."""
    await exercise(stub.CancelImageTask, pb.CancelImageTaskRequest(task_id=task_id))


#: What a metadata value may hold (printable ASCII): gRPC refuses to send anything else.
METADATA_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200)
DATES = st.one_of(TEXT, st.dates().map(str), st.just(""))


@st.composite
def list_requests(draw: st.DrawFn) -> pb.ListImageTasksRequest:
    """Any status number, page size and token."""
    return pb.ListImageTasksRequest(
        status=draw(st.integers(-(2**31), 2**31 - 1)),
        page_size=draw(st.integers(-(2**31), 2**31 - 1)),
        page_token=draw(
            st.one_of(TEXT, st.text(alphabet="ABCDEFabcdef0123456789-_=", max_size=80))
        ),
    )


@st.composite
def usage_requests(draw: st.DrawFn) -> pb.GetUsageRequest:
    """Any period number and date strings."""
    return pb.GetUsageRequest(
        period=draw(st.integers(-(2**31), 2**31 - 1)),
        start_date=draw(DATES),
        end_date=draw(DATES),
    )


@PROFILE
@given(request=list_requests())
async def test_list_tasks_answers_are_the_servers_own(stub: Stub, request: Any) -> None:
    """ListImageTasks with arbitrary filters and page tokens."""
    await exercise(stub.ListImageTasks, request)


@PROFILE
@given(request=usage_requests())
async def test_get_usage_answers_are_the_servers_own(stub: Stub, request: Any) -> None:
    """GetUsage with arbitrary periods and dates."""
    await exercise(stub.GetUsage, request)


@PROFILE
@given(
    authorization=st.one_of(
        METADATA_TEXT,
        st.builds("Bearer {}".format, METADATA_TEXT),
        st.builds("Bearer sia_{}".format, METADATA_TEXT),
        st.just("Bearer "),
    )
)
async def test_any_authorization_value_is_unauthenticated(
    app: App, stub: Stub, authorization: str
) -> None:
    """With keys required, an authorization value of any shape is UNAUTHENTICATED."""
    metadata = (("authorization", authorization),)
    app.access.keys.mode = "keys"
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetUsage(pb.GetUsageRequest(), metadata=metadata, timeout=120)
    finally:
        app.access.keys.mode = "auto"
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    check_answer(refused.value, pb.GetUsageRequest())


@PROFILE
@given(request=st.builds(pb.HealthCheckRequest))
async def test_health_check_always_answers(stub: Stub, request: Any) -> None:
    """HealthCheck, between everything else, answers SERVING."""
    answer = await stub.HealthCheck(request, timeout=120)
    assert answer.status == pb.SERVING_STATUS_SERVING
