"""The service's one error tree.

Every failure the service reports on purpose is a `SiaError`. The gRPC edge
maps each class to a status code in one table (`sia.rpc.errors`); anything
else that escapes a handler is a bug and becomes INTERNAL.

    SiaError
    ├── InvalidArgument            a request field is wrong (names the field)
    │   ├── UndecodableRequest     the request bytes are no valid message (no field to name)
    │   └── UpstreamRejected       the provider refused the parameters or the content
    ├── Unauthenticated            no API key, an unknown one or a revoked one (one message)
    ├── PermissionDenied
    │   ├── ModelNotAllowed        the caller's key may not use the model asked for
    │   └── KeyRevoked             a queued task's key was revoked before it ran
    ├── NotFound
    │   └── TaskNotFound           no task has that id (or it is another key's)
    ├── AlreadyExists
    │   └── RequestIdReused        the key's request_id names a task of a different request
    ├── FailedPrecondition
    │   ├── TaskNotCancellable     the task has already finished
    │   ├── ProviderMisconfigured  the provider refused this service's key or account
    │   └── ModelUnavailable       the provider account has not enabled the model asked for
    ├── ResourceExhausted
    │   ├── QuotaExceeded          a key's limit or quota, or the account's images per minute
    │   ├── QueueFull              too many tasks are waiting
    │   ├── ReferencesBusy         reference images in flight fill the process's byte budget
    │   ├── UpstreamRateLimited    the provider's rate limit (retried first)
    │   └── UpstreamQuotaExceeded  the provider's quota or spending limit (not retried)
    ├── Unavailable
    │   ├── ShuttingDown           the server is draining
    │   ├── ImageStoreUnavailable  the blob store cannot keep or read images (disk, S3)
    │   └── UpstreamUnavailable    5xx, timeout or connection failure (retried first)
    ├── DeadlineExceeded           the generation ran past IMAGE_TIMEOUT
    └── ConfigError                a setting is missing or wrong (start-up only)

Upstream errors carry `metadata` with `provider`, `upstream_code` and
`upstream_request_id`, which reach the client in `google.rpc.ErrorInfo`.

Foreign exceptions (sqlite3, aiohttp, Pillow) never leave the module that
talks to them: it translates them into one of these, raised `from` the
original.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class SiaError(Exception):
    """Root of every error the service raises on purpose.

    `reason` is a stable UPPER_SNAKE identifier for machines (it becomes the
    `google.rpc.ErrorInfo` reason); the message is for people.
    """

    reason = "SIA_ERROR"

    def __init__(self, message: str, *, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata or {}


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field: its name as the client spells it, and what is wrong."""

    field: str
    description: str


class InvalidArgument(SiaError):
    """A request field is missing or wrong; `violations` name each field."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation] | FieldViolation) -> None:
        self.violations = violations if isinstance(violations, list) else [violations]
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in self.violations))

    @classmethod
    def field(cls, name: str, description: str) -> InvalidArgument:
        """The error for a single bad field."""
        return cls(FieldViolation(name, description))


class UndecodableRequest(InvalidArgument):
    """The request's bytes are not a valid message of the method's type (no field to name)."""

    def __init__(self, message_type: str) -> None:
        SiaError.__init__(self, f"the request is not a valid {message_type}")
        self.violations = []


class UpstreamRejected(InvalidArgument):
    """The provider refused the request: a bad parameter or sensitive content."""

    reason = "UPSTREAM_REJECTED"

    def __init__(
        self, field: str, description: str, *, metadata: dict[str, str] | None = None
    ) -> None:
        super().__init__(FieldViolation(field, description))
        self.metadata = metadata or {}


class Unauthenticated(SiaError):
    """The call carries no API key, or one that is unknown or revoked.

    One message for all three, so that an answer never tells which keys exist.
    """

    reason = "UNAUTHENTICATED"

    def __init__(self) -> None:
        super().__init__("a valid API key is required: metadata authorization: Bearer <key>")


class PermissionDenied(SiaError):
    """The caller is known but may not do this."""

    reason = "PERMISSION_DENIED"


class ModelNotAllowed(PermissionDenied):
    """The caller's key is not allowed the model it asked for."""

    reason = "MODEL_NOT_ALLOWED"

    def __init__(self, model: str) -> None:
        super().__init__(f"this API key may not use model {model!r}", metadata={"model": model})


class KeyRevoked(PermissionDenied):
    """The key that submitted a task was revoked before the task ran: it does not run."""

    reason = "KEY_REVOKED"

    def __init__(self, name: str) -> None:
        super().__init__(
            f"the API key {name!r} that submitted this task was revoked; it was not run",
            metadata={"key_name": name},
        )


class NotFound(SiaError):
    """The named thing does not exist."""

    reason = "NOT_FOUND"


class TaskNotFound(NotFound):
    """No task has the given id (or it has expired)."""

    reason = "TASK_NOT_FOUND"

    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id!r} not found", metadata={"task_id": task_id})


class AlreadyExists(SiaError):
    """What the call would create exists already."""

    reason = "ALREADY_EXISTS"


class RequestIdReused(AlreadyExists):
    """The key used this request_id before, for a different request (Stripe's rule for
    idempotency keys: a repeat must be the same request)."""

    reason = "REQUEST_ID_REUSED"

    def __init__(self, request_id: str, task_id: str) -> None:
        super().__init__(
            f"request_id {request_id!r} was already used for task {task_id!r} with a "
            "different request; use a new request_id for a new request",
            metadata={"request_id": request_id, "task_id": task_id},
        )


class FailedPrecondition(SiaError):
    """The operation is not allowed in the current state."""

    reason = "FAILED_PRECONDITION"


class TaskNotCancellable(FailedPrecondition):
    """The task has already finished, so it cannot be cancelled."""

    reason = "TASK_FINISHED"

    def __init__(self, task_id: str, status: str) -> None:
        super().__init__(
            f"task {task_id!r} has finished ({status}) and cannot be cancelled",
            metadata={"task_id": task_id, "status": status},
        )


class ProviderMisconfigured(FailedPrecondition):
    """The provider refused this service's own credentials or account.

    The caller did nothing wrong: the server needs an operator's attention,
    and readiness takes the instance out of rotation.
    """

    reason = "PROVIDER_MISCONFIGURED"


class ModelUnavailable(FailedPrecondition):
    """The provider account has not enabled (or no longer offers) the model asked for.

    Only calls for that model fail: the key works, so the instance stays in
    rotation (any client could otherwise take every replica out in turn).
    `metadata["model"]` names the model.
    """

    reason = "MODEL_NOT_ENABLED"


class ResourceExhausted(SiaError):
    """A limit was reached; the caller may retry later."""

    reason = "RESOURCE_EXHAUSTED"
    retry_after: float | None = None


class QuotaExceeded(ResourceExhausted):
    """A limit is reached: one of a key's (`subject` "key:NAME") or the account's images
    per minute (`subject` "account").

    `limit` names it ("requests_per_minute", "images_per_day", "budget_per_month", ...);
    `retry_after` is when it next lets the call through (infinite when it never will:
    no RetryInfo then). Clients get both in `google.rpc.QuotaFailure` and `RetryInfo`.
    """

    reason = "QUOTA_EXCEEDED"

    def __init__(
        self, subject: str, limit: str, description: str, retry_after: float, value: int = 0
    ) -> None:
        advice = (
            f"retry in {retry_after:.3g} s"
            if math.isfinite(retry_after)
            else "it can never pass: ask for fewer images"
        )
        super().__init__(
            f"{limit} reached for {subject}: {description}; {advice}",
            metadata={"subject": subject, "limit": limit},
        )
        self.subject = subject
        self.limit = limit
        self.description = description
        self.retry_after = retry_after
        self.value = value  # the limit's size, in its own unit (0: not a count)


class QueueFull(ResourceExhausted):
    """The task queue holds as many unfinished tasks as it may."""

    reason = "QUEUE_FULL"
    retry_after = 5.0

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the task queue is full ({limit} unfinished tasks); retry later",
            metadata={"limit": str(limit)},
        )


class Retryable:
    """Mixin for provider failures that another attempt may fix.

    `upstream_retry_after` is the provider's Retry-After in seconds, if it sent
    one; `final` is set once retrying is no longer allowed (for example after
    a streamed image has arrived).
    """

    upstream_retry_after: float | None = None
    final: bool = False


#: Parts of the providers' error codes that mean the content was refused: Ark's
#: `...SensitiveContentDetected` and `...RiskDetection`, OpenAI's `content_policy_violation`
#: and `moderation_blocked` (whole requests, or one image of a group).
CONTENT_REFUSALS = (
    "SensitiveContentDetected",
    "RiskDetection",
    "content_policy_violation",
    "moderation_blocked",
)


def content_refused(code: str) -> bool:
    """True for a provider's error code that refuses the content rather than the call."""
    return any(part in code for part in CONTENT_REFUSALS)


def retryable(exc: BaseException) -> bool:
    """True for an error another attempt may fix (rate limits and transient failures)."""
    return isinstance(exc, Retryable) and not exc.final


class UpstreamRateLimited(Retryable, ResourceExhausted):
    """The provider's rate limit was hit and retries did not get through."""

    reason = "UPSTREAM_RATE_LIMITED"
    retry_after = 1.0


class ReferencesBusy(ResourceExhausted):
    """The reference images of the calls in flight already hold the process's byte budget."""

    reason = "REFERENCES_BUSY"
    retry_after = 1.0


class UpstreamQuotaExceeded(ResourceExhausted):
    """The provider account's quota or spending limit is used up."""

    reason = "UPSTREAM_QUOTA_EXCEEDED"


class Unavailable(SiaError):
    """The service cannot take the call now; the caller should retry."""

    reason = "UNAVAILABLE"
    retry_after: float | None = 1.0


class ShuttingDown(Unavailable):
    """The server is draining before it exits."""

    reason = "SHUTTING_DOWN"

    def __init__(self) -> None:
        super().__init__("the server is shutting down; retry on another instance")


class ImageStoreUnavailable(Unavailable):
    """The blob store cannot write or read images now (unwritable or full disk, S3 down).

    Not `Retryable`: a task retries the store, never the billed generation.
    """

    reason = "IMAGE_STORE_UNAVAILABLE"


class UpstreamUnavailable(Retryable, Unavailable):
    """The provider failed (5xx, timeout, connection) and retries did not get through."""

    reason = "UPSTREAM_UNAVAILABLE"


class DeadlineExceeded(SiaError):
    """The generation did not finish within its time budget."""

    reason = "DEADLINE_EXCEEDED"


class ConfigError(SiaError):
    """A setting is missing or invalid; raised only at start-up."""

    reason = "CONFIG_ERROR"
