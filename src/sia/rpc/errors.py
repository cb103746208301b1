"""The one table from the error tree to gRPC status codes, and rich error details.

Each error becomes a `google.rpc.Status` with an `ErrorInfo` (reason, domain,
metadata), `BadRequest` field violations for invalid arguments, and
`RetryInfo` when the caller may retry after a delay. It travels in the
`grpc-status-details-bin` trailer, which grpcurl and the status packages of
every gRPC language decode.

Whatever an error echoes, its status fits the trailer: gRPC clients refuse
trailing metadata over 8 KiB (`grpc.max_metadata_size`) with their own
RESOURCE_EXHAUSTED, hiding the server's code. The message travels twice
(`grpc-message`, percent-encoded, up to 3 bytes per byte; and inside the
details, base64), so the message, the metadata and the violations are each cut
to a byte budget here, keeping the worst case under about 6.5 KiB.
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

#: UTF-8 bytes of the status message, of the ErrorInfo metadata together, of the
#: BadRequest violations together, and of any one value or description.
MAX_MESSAGE_BYTES = 768
MAX_METADATA_BYTES = 512
MAX_VIOLATIONS_BYTES = 1536
MAX_VALUE_BYTES = 256
#: Longest RetryInfo delay: beyond a day a delay is no advice a client can use.
MAX_RETRY_SECONDS = 86_400.0
_ELLIPSIS = "…"

#: Error class to status code; an error's nearest class in this table decides.
STATUS_CODES: dict[type[errors.SiaError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
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
    details: list[object] = [
        error_details_pb2.ErrorInfo(
            reason=exc.reason, domain=DOMAIN, metadata=_bounded_metadata(exc.metadata)
        )
    ]
    if isinstance(exc, errors.InvalidArgument):
        details.append(_bad_request(exc.violations))
    elif isinstance(exc, errors.QuotaExceeded):
        failure = error_details_pb2.QuotaFailure()
        failure.violations.add(
            subject=clip(exc.subject, MAX_VALUE_BYTES),
            description=clip(exc.description, MAX_VALUE_BYTES),
            quota_id=exc.limit,
            quota_value=exc.value,
        )
        details.append(failure)
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None and math.isfinite(retry_after):
        delay = duration_pb2.Duration()
        # Whole nanoseconds, rounded: truncating float arithmetic turned 4.35 s into 4.349999999.
        delay.FromNanoseconds(round(min(max(retry_after, 0.0), MAX_RETRY_SECONDS) * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    return make_status(code, clip(exc.message, MAX_MESSAGE_BYTES), details)


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, ending in an ellipsis when cut."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return data.decode()
    # A character split by the cut is dropped whole rather than sent half.
    return data[: limit - len(_ELLIPSIS.encode())].decode("utf-8", "ignore") + _ELLIPSIS


def _bounded_metadata(metadata: dict[str, str]) -> dict[str, str]:
    bounded: dict[str, str] = {}
    spent = 0
    for name, value in metadata.items():
        key, text = clip(name, MAX_VALUE_BYTES), clip(value, MAX_VALUE_BYTES)
        spent += len(key.encode()) + len(text.encode())
        if spent > MAX_METADATA_BYTES:
            break
        bounded[key] = text
    return bounded


def _bad_request(violations: list[errors.FieldViolation]) -> error_details_pb2.BadRequest:
    """Every violation that fits the budget, then one naming where the rest begin."""
    shown = error_details_pb2.BadRequest()
    # Room kept for the closing "N more" violation.
    spent, budget = 0, MAX_VIOLATIONS_BYTES - MAX_VALUE_BYTES
    for index, violation in enumerate(violations):
        name = clip(violation.field, MAX_VALUE_BYTES)
        description = clip(violation.description, MAX_VALUE_BYTES)
        spent += len(name.encode()) + len(description.encode())
        if spent > budget and index > 0:
            rest = len(violations) - index
            shown.field_violations.add(
                field=name, description=f"{rest} more problems not shown, from this field on"
            )
            break
        shown.field_violations.add(field=name, description=description)
    return shown


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
