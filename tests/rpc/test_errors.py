"""Tests for the error table: statuses fit the trailer (on a real channel too); exact RetryInfo."""

from __future__ import annotations

import base64
import math
from urllib.parse import quote

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from sia import errors
from sia.api.image.v1 import image_service_pb2 as pb
from sia.api.image.v1 import image_service_pb2_grpc as pb_grpc
from sia.rpc.errors import to_status

Stub = pb_grpc.ImageServiceStub

#: grpc's default limit on the metadata a client receives (grpc.max_metadata_size).
CLIENT_METADATA_LIMIT = 8 * 1024


def decoded(status: grpc.Status) -> status_pb2.Status:
    """The google.rpc.Status in a grpc.Status's trailer."""
    (value,) = [v for k, v in status.trailing_metadata if k == "grpc-status-details-bin"]
    return status_pb2.Status.FromString(value)


def trailer_bytes(status: grpc.Status) -> int:
    """What the trailer costs on the wire: grpc-message percent-encoded, the details base64."""
    details = sum(len(base64.b64encode(v)) for _, v in status.trailing_metadata)
    return len(quote(status.details, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")) + details


def unpacked(proto: status_pb2.Status, cls: type) -> list[object]:
    """The details of type `cls`."""
    found = []
    for any_msg in proto.details:
        if any_msg.Is(cls.DESCRIPTOR):
            msg = cls()
            any_msg.Unpack(msg)
            found.append(msg)
    return found


@pytest.mark.parametrize("char", ["t", "é", "模", "\x00", "😀"])
def test_not_found_with_a_huge_id_fits_the_trailer(char: str) -> None:
    """A 10 KB task id in the message and metadata is cut so the trailer fits 8 KiB."""
    status = to_status(errors.TaskNotFound(char * 10_000))
    assert status.code == grpc.StatusCode.NOT_FOUND
    assert trailer_bytes(status) < CLIENT_METADATA_LIMIT - 1024
    assert status.details.startswith("task '")
    assert status.details.endswith("…")
    (info,) = unpacked(decoded(status), error_details_pb2.ErrorInfo)
    assert info.reason == "TASK_NOT_FOUND"  # type: ignore[attr-defined]
    assert info.metadata["task_id"].endswith("…")  # type: ignore[attr-defined]


@pytest.mark.parametrize("char", ["x", "模"])
def test_many_huge_violations_fit_the_trailer(char: str) -> None:
    """Thousands of long violations keep the first ones, say how many more, and fit."""
    violations = [errors.FieldViolation(f"images[{i}]", char * 5000) for i in range(3000)]
    status = to_status(errors.InvalidArgument(violations))
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert trailer_bytes(status) < CLIENT_METADATA_LIMIT - 1024
    (bad,) = unpacked(decoded(status), error_details_pb2.BadRequest)
    fields = [v.field for v in bad.field_violations]  # type: ignore[attr-defined]
    assert fields[0] == "images[0]"
    assert len(fields) < 3000
    assert "more" in bad.field_violations[-1].description  # type: ignore[attr-defined]


def test_small_errors_pass_unchanged() -> None:
    """An ordinary error keeps its whole message and every violation."""
    exc = errors.InvalidArgument(
        [errors.FieldViolation("prompt", "must not be empty"), errors.FieldViolation("seed", "x")]
    )
    status = to_status(exc)
    assert status.details == "prompt: must not be empty; seed: x"
    (bad,) = unpacked(decoded(status), error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad.field_violations] == [  # type: ignore[attr-defined]
        ("prompt", "must not be empty"),
        ("seed", "x"),
    ]


@pytest.mark.parametrize(
    ("retry_after", "seconds", "nanos"),
    [
        (1.5, 1, 500_000_000),
        (0.3, 0, 300_000_000),
        (4.35, 4, 350_000_000),
        (2.0, 2, 0),
        (0.001, 0, 1_000_000),
    ],
)
def test_retry_info_carries_the_exact_delay(retry_after: float, seconds: int, nanos: int) -> None:
    """RetryInfo holds the delay to the nanosecond, not rounded down to whole seconds."""
    exc = errors.UpstreamUnavailable("upstream 500")
    exc.retry_after = retry_after
    (info,) = unpacked(decoded(to_status(exc)), error_details_pb2.RetryInfo)
    delay = info.retry_delay  # type: ignore[attr-defined]
    assert (delay.seconds, delay.nanos) == (seconds, nanos)


@pytest.mark.parametrize("retry_after", [math.inf, math.nan, -1.0])
def test_retry_info_survives_nonsense_delays(retry_after: float) -> None:
    """An infinite, NaN or negative delay never breaks the status: it becomes none or zero."""
    exc = errors.Unavailable("down")
    exc.retry_after = retry_after
    status = to_status(exc)
    assert status.code == grpc.StatusCode.UNAVAILABLE
    for info in unpacked(decoded(status), error_details_pb2.RetryInfo):
        assert info.retry_delay.seconds >= 0  # type: ignore[attr-defined]


HUGE = 10_000

OVERSIZED = [
    ("GetImageTask", pb.GetImageTaskRequest(task_id="t" * HUGE), "task_id"),
    ("CancelImageTask", pb.CancelImageTaskRequest(task_id="t" * HUGE), "task_id"),
    ("GenerateImage", pb.GenerateImageRequest(prompt="x", model="m" * 8192), "model"),
    ("GenerateImage", pb.GenerateImageRequest(prompt="x", size="s" * 8192), "size"),
    ("GenerateImage", pb.GenerateImageRequest(prompt="x", size="é" * 8192), "size"),
    ("GenerateImageAsync", pb.GenerateImageRequest(prompt="x", model="模" * 8192), "model"),
    (
        "GenerateSequentialImages",
        pb.GenerateSequentialImagesRequest(prompt="x", size="9" * 8192),
        "size",
    ),
    ("GenerateImage", pb.GenerateImageRequest(prompt="x", request_id="r" * HUGE), "request_id"),
    (
        "GenerateImage",
        pb.GenerateImageRequest(prompt="x", images=["ftp://a/" + "é" * 30] * 2000),
        "images",  # counted before any is read
    ),
]


@pytest.mark.parametrize(("rpc", "request_msg", "field"), OVERSIZED)
async def test_oversized_input_gets_the_servers_own_code(
    stub: Stub, rpc: str, request_msg: object, field: str
) -> None:
    """Huge echoed values still fit the status trailer: the client sees INVALID_ARGUMENT."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await getattr(stub, rpc)(request_msg, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    status = rpc_status.from_call(info.value)  # type: ignore[arg-type]  # AioRpcError is a Call
    assert status is not None, "the server's status details did not arrive"
    (bad,) = unpacked(status, error_details_pb2.BadRequest)
    assert bad.field_violations[0].field == field  # type: ignore[attr-defined]
