"""Conversions between protobuf messages and domain types that the servicer tests do not pin."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from sia.api.image.v1 import image_service_pb2 as pb
from sia.domain import (
    GeneratedImage,
    GenerationRequest,
    GenerationResult,
    ImageError,
    Task,
    TaskStatus,
    Usage,
)
from sia.rpc import convert


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 11, 30, 10, 3, 9, 123456, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # before the epoch
        datetime(2038, 1, 19, 3, 14, 8, 1, tzinfo=UTC),  # past 32-bit seconds
        datetime(2026, 3, 1, 8, 0, tzinfo=timezone(timedelta(hours=8))),  # not UTC
    ],
)
def test_timestamp_matches_protobufs_own_conversion(value: datetime) -> None:
    """`timestamp` gives exactly what Timestamp.FromDatetime gives, to the microsecond."""
    expected = Timestamp()
    expected.FromDatetime(value)
    assert convert.timestamp(value) == expected
    assert convert.timestamp(value).ToDatetime(tzinfo=UTC) == value


CREATED = datetime(2026, 11, 30, 10, 3, 9, 123456, tzinfo=UTC)
RESULT = GenerationResult(
    model="doubao-seedream-4-0-250828",
    images=(
        GeneratedImage(index=0, url="http://x/0.jpeg", size="2048x2048", content_type="image/jpeg"),
        GeneratedImage(index=1, error=ImageError("SensitiveContent", "no")),
        GeneratedImage(index=2, data=b"\x89PNG", size="1K", content_type="image/png"),
    ),
    usage=Usage(generated_images=2, output_tokens=32768),
    created_at=CREATED,
)


def _stamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _expected_response() -> pb.GenerateImageResponse:
    """The response built the plain way, part by part."""
    return pb.GenerateImageResponse(
        images=[
            pb.Image(url="http://x/0.jpeg", size="2048x2048", content_type="image/jpeg", index=0),
            pb.Image(index=1, error=pb.Error(code="SensitiveContent", message="no")),
            pb.Image(data=b"\x89PNG", size="1K", content_type="image/png", index=2),
        ],
        usage=pb.Usage(generated_images=2, output_tokens=32768),
        model="doubao-seedream-4-0-250828",
        created_at=_stamp(CREATED),
    )


def test_generate_response_carries_every_image_usage_and_time() -> None:
    """Images (with bytes, with a URL, or failed), usage, model and creation time, in order."""
    assert convert.generate_response(RESULT) == _expected_response()


def test_task_response_carries_result_error_and_times() -> None:
    """A finished task's response has its result, error and all three timestamps."""
    request = GenerationRequest(
        prompt="x", model="doubao-seedream-4-0-250828", size="2K", request_id="r-1"
    )
    later = CREATED + timedelta(seconds=3)
    task = Task(
        id="t-1",
        request=request,
        status=TaskStatus.SUCCEEDED,
        created_at=CREATED,
        updated_at=later,
        finished_at=later,
        result=RESULT,
        error=ImageError("UNAVAILABLE", "upstream is down"),
    )
    assert convert.task_response(task) == pb.GetImageTaskResponse(
        task_id="t-1",
        status=pb.TASK_STATUS_SUCCEEDED,
        created_at=_stamp(CREATED),
        updated_at=_stamp(later),
        finished_at=_stamp(later),
        request_id="r-1",
        result=_expected_response(),
        error=pb.Error(code="UNAVAILABLE", message="upstream is down"),
    )
    queued = Task(
        id="t-2", request=request, status=TaskStatus.QUEUED, created_at=CREATED, updated_at=CREATED
    )
    response = convert.task_response(queued)
    assert not response.HasField("result") and not response.HasField("error")
    assert not response.HasField("finished_at")
