"""The one table from the error tree to gRPC status codes, and rich error details.

Each error becomes a `google.rpc.Status` with an `ErrorInfo` (reason, domain,
metadata), `BadRequest` field violations for invalid arguments, and
`RetryInfo` when the caller may retry after a delay. It travels in the
`grpc-status-details-bin` trailer, which grpcurl and the status packages of
every gRPC language decode.
"""

from __future__ import annotations

import math

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from sia import errors

#: Error domain in google.rpc.ErrorInfo.
DOMAIN = "sia.image.v1"

#: Error class to status code; an error's nearest class in this table decides.
STATUS_CODES: dict[type[errors.SiaError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.SiaError: grpc.StatusCode.INTERNAL,
}


def status_code_of(exc: errors.SiaError) -> grpc.StatusCode:
    """The gRPC status code for an error, from the table."""
    for cls in type(exc).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


def to_status(exc: errors.SiaError) -> grpc.Status:
    """A grpc.Status carrying the code, the message and the rich details."""
    code = status_code_of(exc)
    details = [error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=exc.metadata)]
    if isinstance(exc, errors.InvalidArgument):
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in exc.violations
                ]
            )
        )
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        seconds = math.floor(retry_after)
        delay = duration_pb2.Duration(seconds=seconds, nanos=int((retry_after - seconds) * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    return make_status(code, exc.message, details)


def make_status(
    code: grpc.StatusCode, message: str, details: list[object] | None = None
) -> grpc.Status:
    """A grpc.Status with optional detail messages packed into google.rpc.Status."""
    packed = []
    for detail in details or []:
        any_msg = any_pb2.Any()
        any_msg.Pack(detail)  # type: ignore[arg-type]  # every detail is a protobuf message
        packed.append(any_msg)
    proto = status_pb2.Status(code=_CODE_NUMBERS[code], message=message, details=packed)
    return rpc_status.to_status(proto)


_CODE_NUMBERS = {code: code.value[0] for code in grpc.StatusCode}
