"""The client's one error tree, and the translation of gRPC errors into it.

    SiaError                    every error the client raises
     ├── DownloadError          Image.save could not get the image's bytes
     └── (one per gRPC status, raised by the calls)
          InvalidArgument       a bad field: field_violations names each one
          Unauthenticated       no key, or an unknown or revoked one
          PermissionDenied      the key may not use the model
          NotFound              no such task for this key
          AlreadyExists         a request_id reused for a different request
          ResourceExhausted     a limit: quota_violations and retry_after say which and when
          FailedPrecondition    cancelling a finished task; the provider refused the server
          Unavailable           the server is going away or the provider keeps failing
          DeadlineExceeded      the deadline passed first
          Cancelled             the call was cancelled
          Internal              a bug on the server

A status with no class of its own is a plain SiaError. The details come from the
`grpc-status-details-bin` trailer (`google.rpc.Status`): ErrorInfo gives `reason` and
`metadata`, BadRequest `field_violations`, QuotaFailure `quota_violations`, RetryInfo
`retry_after` (seconds).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

__all__ = [
    "AlreadyExists",
    "Cancelled",
    "DeadlineExceeded",
    "DownloadError",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "QuotaViolation",
    "ResourceExhausted",
    "SiaError",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
    "translated",
]


class FieldViolation(NamedTuple):
    """One bad request field, spelled as the request spells it (`images[2]`)."""

    field: str
    description: str


class QuotaViolation(NamedTuple):
    """One limit the call ran into: `key:<name>` or `account`, and which limit."""

    subject: str
    description: str
    quota_id: str
    quota_value: int


class SiaError(Exception):
    """Root of the client's errors; `code` is None for errors raised without a call."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
        quota_violations: tuple[QuotaViolation, ...] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations = field_violations
        self.quota_violations = quota_violations
        self.retry_after = retry_after

    def __repr__(self) -> str:
        code = self.code.name if self.code else None
        return f"{type(self).__name__}({self.message!r}, code={code}, reason={self.reason!r})"


class DownloadError(SiaError):
    """An image's bytes could not be had: it failed, or its URL could not be read."""


class InvalidArgument(SiaError):
    """INVALID_ARGUMENT."""


class Unauthenticated(SiaError):
    """UNAUTHENTICATED."""


class PermissionDenied(SiaError):
    """PERMISSION_DENIED."""


class NotFound(SiaError):
    """NOT_FOUND."""


class AlreadyExists(SiaError):
    """ALREADY_EXISTS."""


class ResourceExhausted(SiaError):
    """RESOURCE_EXHAUSTED."""


class FailedPrecondition(SiaError):
    """FAILED_PRECONDITION."""


class Unavailable(SiaError):
    """UNAVAILABLE."""


class DeadlineExceeded(SiaError):
    """DEADLINE_EXCEEDED."""


class Cancelled(SiaError):
    """CANCELLED."""


class Internal(SiaError):
    """INTERNAL."""


#: The one table from status codes to classes.
ERRORS: Mapping[grpc.StatusCode, type[SiaError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.INTERNAL: Internal,
}


@contextmanager
def translated() -> Iterator[None]:
    """Raise each gRPC error escaping the block as its SiaError (sync or asyncio)."""
    try:
        yield
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from exc


def from_rpc_error(error: grpc.RpcError) -> SiaError:
    """The SiaError for a failed call (sync or asyncio), with its decoded details."""
    call = cast("grpc.Call", error)  # both flavours of failed call answer the Call methods
    code = call.code()
    message = call.details() or ""
    fields: dict[str, Any] = {}
    try:
        status = rpc_status.from_call(call)
    except ValueError:  # a trailer that contradicts the status: keep the status alone
        status = None
    for detail in status.details if status is not None else ():
        _read_detail(detail, fields)
    return ERRORS.get(code, SiaError)(message, code=code, **fields)


def _read_detail(detail: Any, fields: dict[str, Any]) -> None:
    if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
        info = error_details_pb2.ErrorInfo()
        detail.Unpack(info)
        fields["reason"] = info.reason
        fields["metadata"] = dict(info.metadata)
    elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
        bad = error_details_pb2.BadRequest()
        detail.Unpack(bad)
        fields["field_violations"] = tuple(
            FieldViolation(v.field, v.description) for v in bad.field_violations
        )
    elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
        failure = error_details_pb2.QuotaFailure()
        detail.Unpack(failure)
        fields["quota_violations"] = tuple(
            QuotaViolation(v.subject, v.description, v.quota_id, v.quota_value)
            for v in failure.violations
        )
    elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
        retry = error_details_pb2.RetryInfo()
        detail.Unpack(retry)
        fields["retry_after"] = retry.retry_delay.ToTimedelta().total_seconds()
