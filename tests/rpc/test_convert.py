"""Conversions between protobuf messages and domain types that the servicer tests do not pin."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

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
