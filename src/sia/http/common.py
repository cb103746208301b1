"""What the HTTP API routes share: the error table, errors in OpenAI's shape, and the
wrapper that gives each handler a request id, the caller, error answers and an access line.

Both `sia.http.openai_api` (OpenAI-compatible routes) and `sia.http.tasks_api` (native
task routes) answer errors as `{"error": {"message", "type", "param", "code"}}` with the
HTTP status from `HTTP_ERRORS`; `code` is the error's SIA reason in lower case.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING, Any, ClassVar

import orjson
from aiohttp import web

from sia import errors
from sia.domain import new_request_id
from sia.http.fields import FieldAsSent
from sia.logs import KEY_NAME, REQUEST_ID, AccessLog, get_logger

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from sia.access.base import ApiKey
    from sia.access.gate import AccessControl
    from sia.health import Readiness
    from sia.service import ImageService

    Handler = Callable[[web.Request, ApiKey | None], Awaitable[web.StreamResponse]]

log = get_logger("sia.http.api")
access = AccessLog("sia.http")

#: Error class to (HTTP status, OpenAI error type); an error's nearest class decides.
HTTP_ERRORS: dict[type[errors.SiaError], tuple[int, str]] = {
    errors.InvalidArgument: (400, "invalid_request_error"),
    errors.Unauthenticated: (401, "authentication_error"),
    errors.PermissionDenied: (403, "permission_error"),
    errors.NotFound: (404, "not_found_error"),
    errors.AlreadyExists: (409, "conflict_error"),
    errors.ProviderMisconfigured: (503, "server_error"),  # this server's account, not the call
    errors.FailedPrecondition: (400, "invalid_request_error"),
    errors.ResourceExhausted: (429, "rate_limit_error"),
    errors.Unavailable: (503, "server_error"),
    errors.DeadlineExceeded: (504, "timeout_error"),
    errors.SiaError: (500, "server_error"),
}

#: Longest Retry-After sent, in seconds.
_MAX_RETRY_AFTER = 86_400


#: Statuses after which the provider may already have generated (and billed) the images
#: (and `_billed` errors of other statuses): OpenAI's SDKs retry 5xx unless told not to.
_NOT_RETRIED = frozenset({500, 502, 504})


class ImagesFailed(errors.SiaError):
    """Every image of a group failed: the first one's code and message, a 400 when the
    content was refused, else a 502 (the provider answered, but with no image)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.reason = code
        self.content = errors.content_refused(code)


def status_of(exc: errors.SiaError) -> tuple[int, str]:
    """The HTTP status and OpenAI error type for an error, from the table."""
    if isinstance(exc, ImagesFailed):
        return (400, "invalid_request_error") if exc.content else (502, "server_error")
    for cls in type(exc).__mro__:
        if cls in HTTP_ERRORS:
            return HTTP_ERRORS[cls]
    return 500, "server_error"


def error_body(
    exc: errors.SiaError, request_id: str, params: Mapping[str, str] | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """The status, body and headers of an error; `params` respells SIA field names."""
    status, kind = status_of(exc)
    message, param = exc.message, None
    if isinstance(exc, errors.Unauthenticated):
        message = "a valid API key is required: header Authorization: Bearer <key>"
    elif status == 500:
        message = f"internal error (request id {request_id})"
    if isinstance(exc, errors.InvalidArgument) and exc.violations:
        # Fields as this API's clients spell them, in `param` and in the message.
        spelling = {} if isinstance(exc, FieldAsSent) else params or {}
        names = [_respelt(v.field, spelling) for v in exc.violations]
        param = names[0].partition("[")[0]
        message = "; ".join(
            f"{n}: {v.description}" for n, v in zip(names, exc.violations, strict=True)
        )
    headers = {"X-Request-Id": request_id}
    if status in _NOT_RETRIED or _billed(exc):
        headers["X-Should-Retry"] = "false"
    retry_after = getattr(exc, "retry_after", None)
    if status in (429, 503) and retry_after is not None and math.isfinite(retry_after):
        headers["Retry-After"] = str(min(_MAX_RETRY_AFTER, max(0, math.ceil(retry_after))))
    body = {"error": {"message": message, "type": kind, "param": param, "code": exc.reason.lower()}}
    return status, body, headers


def _billed(exc: errors.SiaError) -> bool:
    """Whether the provider may already have made (and billed) the images: the store
    failed after the generation, or the provider's answer was cut off or streamed."""
    if isinstance(exc, errors.ImageStoreUnavailable):
        return True
    return isinstance(exc, errors.Retryable) and exc.final


def _respelt(field: str, params: Mapping[str, str]) -> str:
    """`field` with its name respelt by `params` (`images[2]` → `image[2]`)."""
    name, bracket, rest = field.partition("[")
    return params.get(name, name) + bracket + rest


def error_response(
    exc: errors.SiaError, request_id: str, params: Mapping[str, str] | None = None
) -> web.Response:
    """An error in OpenAI's shape, with Retry-After when the caller should wait."""
    status, body, headers = error_body(exc, request_id, params)
    return web.json_response(body, status=status, headers=headers)


def json_error(
    status: int,
    message: str,
    kind: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str],
) -> web.Response:
    """An error in OpenAI's shape from its parts."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


async def json_object(request: web.Request) -> dict[str, Any]:
    """The request's body, which must be a JSON object (else a 400)."""
    try:
        body = await request.json(loads=orjson.loads)
    except ValueError as exc:
        raise errors.UndecodableRequest("JSON object") from exc
    if not isinstance(body, dict):
        raise errors.UndecodableRequest("JSON object")
    return body


class ApiRoutes:
    """Base of a group of API handlers: `handled` wraps each one.

    `PARAMS` respells SIA field names in the errors' `param` and message as the
    routes' clients spell them. With `readiness`, calls are refused ShuttingDown (503)
    from the start of shutdown, as gRPC calls are.
    """

    PARAMS: ClassVar[Mapping[str, str]] = {}

    def __init__(
        self,
        service: ImageService,
        access_control: AccessControl | None,
        readiness: Readiness | None = None,
    ) -> None:
        self.service = service
        self.access = access_control
        self.readiness = readiness

    def handled(self, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """`handler` with request id, authentication, error answers and an access line."""

        async def handle(request: web.Request) -> web.StreamResponse:
            request_id = request.headers.get("X-Request-Id", "")[:128] or new_request_id()
            bound_id = REQUEST_ID.set(request_id)
            bound_key = KEY_NAME.set(None)
            start = time.perf_counter()
            status = 500
            try:
                response = await self._answer(handler, request, request_id)
                status = response.status
                return response
            except web.HTTPException as exc:
                status = exc.status
                raise
            except asyncio.CancelledError:
                status = 499  # the client went away first
                raise
            finally:
                level = "error" if status >= 500 and status != 503 else "info"
                if status in (429, 503):
                    level = "warning"
                access(
                    "http",
                    level,
                    method=request.method,
                    path=request.path,
                    status=status,
                    duration_ms=round((time.perf_counter() - start) * 1000, 3),
                )
                KEY_NAME.reset(bound_key)
                REQUEST_ID.reset(bound_id)

        return handle

    async def _answer(
        self, handler: Handler, request: web.Request, request_id: str
    ) -> web.StreamResponse:
        headers = {"X-Request-Id": request_id}
        try:
            if self.readiness is not None and self.readiness.shutting_down:
                raise errors.ShuttingDown  # as gRPC: new calls go to another instance
            caller = None
            if self.access is not None:
                caller = self.access.authenticate(request.headers.get("Authorization"))
            if caller is not None:
                KEY_NAME.set(caller.name)
            response = await handler(request, caller)
        except errors.SiaError as exc:
            return error_response(exc, request_id, self.PARAMS)
        except web.HTTPRequestEntityTooLarge as exc:
            message = exc.text or "request body too large"
            kind = "invalid_request_error"
            return json_error(413, message, kind, code="request_too_large", headers=headers)
        except web.HTTPException:
            raise
        except Exception:
            log.exception("http_internal_error", path=request.path)
            message = f"internal error (request id {request_id})"
            headers["X-Should-Retry"] = "false"
            return json_error(500, message, "server_error", code="internal", headers=headers)
        if not response.prepared:  # a stream sets its own before it starts
            response.headers["X-Request-Id"] = request_id
        return response
