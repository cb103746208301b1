"""The server interceptor: request ids, errors to statuses, access log and metrics.

Every unary and server-streaming RPC goes through `ObservabilityInterceptor`. It binds a request
id (the client's `x-request-id` metadata, or a new one) into the log context,
refuses work while the server drains, turns `SiaError` into a rich status and
any other exception into INTERNAL (logged with its trace, never sent), then
writes one access line and records the per-method metrics.

The access line's level follows the status, so `"level":"error"` finds the
calls that failed on the server's side (INTERNAL, UNAVAILABLE, a generation
past IMAGE_TIMEOUT, a refused provider key) and not the client's mistakes.
ImageService calls but HealthCheck are authenticated here: the caller's key
(from `authorization: Bearer <key>` metadata) is put in `CALLER` for the
servicer, and its name in every log line of the call (`key_name`).
Request bytes that do not parse as the method's message are answered
INVALID_ARGUMENT here, logged and counted like any call, rather than left to
grpc.aio (which answers UNKNOWN before any interceptor code runs).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from sia.domain import new_request_id
from sia.errors import ProviderMisconfigured, ShuttingDown, SiaError, UndecodableRequest
from sia.logs import KEY_NAME, REQUEST_ID, AccessLog, get_logger
from sia.rpc.errors import make_status, to_status

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sia.access.base import ApiKey
    from sia.access.gate import AccessControl
    from sia.health import Readiness
    from sia.metrics import Metrics

log = get_logger("sia.rpc")
access = AccessLog("sia.rpc")


#: Services whose calls are refused once shutdown begins (health and reflection stay up).
GUARDED_SERVICES = frozenset({"image.v1.ImageService"})
#: Methods of guarded services that need no API key: probes call them.
OPEN_METHODS = frozenset({"/image.v1.ImageService/HealthCheck"})

#: The key of the call being served (None: anonymous), for the servicer.
CALLER: ContextVar[ApiKey | None] = ContextVar("sia_caller", default=None)

#: The access line's level by status code; any code not listed is "info".
ACCESS_LEVELS: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.INTERNAL: "error",
    grpc.StatusCode.UNKNOWN: "error",
    grpc.StatusCode.UNAVAILABLE: "error",
    grpc.StatusCode.DATA_LOSS: "error",
    grpc.StatusCode.DEADLINE_EXCEEDED: "error",  # only the server's: see access_level
    grpc.StatusCode.RESOURCE_EXHAUSTED: "warning",
}


def access_level(exc: SiaError, code: grpc.StatusCode) -> str:
    """The access line's level for a call that ended in `exc` (answered with `code`)."""
    if isinstance(exc, ShuttingDown):
        return "info"  # a planned drain, not an outage
    if isinstance(exc, ProviderMisconfigured):
        return "error"  # FAILED_PRECONDITION, yet every call fails until an operator acts
    return ACCESS_LEVELS.get(code, "info")


class _Undecodable:
    """What the tolerant deserializer hands the handler for bytes that did not parse."""

    __slots__ = ()


_UNDECODABLE = _Undecodable()


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer`, returning _UNDECODABLE where it would raise DecodeError."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return _UNDECODABLE

    return deserialize


def _message_type(deserializer: Callable[[bytes], Any] | None) -> str:
    """The full protobuf name a generated `Message.FromString` parses, else "message"."""
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "message"))


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each unary handler once per method; see the module docstring."""

    def __init__(
        self, metrics: Metrics, readiness: Readiness, access: AccessControl | None = None
    ) -> None:
        self.metrics = metrics
        self.readiness = readiness
        self.access = access
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """Return the cached wrapped handler for unary and server-streaming methods,
        others unchanged."""
        method: str = details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(details)
        if handler is None:
            return None
        message_type = _message_type(handler.request_deserializer)
        deserializer = _tolerant(handler.request_deserializer)
        if handler.unary_unary is not None:
            wrapped = grpc.unary_unary_rpc_method_handler(
                self._wrap(method, handler.unary_unary, message_type, streaming=False),  # type: ignore[arg-type]  # aio handlers are async
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        elif handler.unary_stream is not None:
            wrapped = grpc.unary_stream_rpc_method_handler(
                self._wrap(method, handler.unary_stream, message_type, streaming=True),  # type: ignore[arg-type]  # as above
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        else:
            return handler
        self._wrapped[method] = wrapped
        return wrapped

    def _authenticator(
        self, method: str, *, guarded: bool
    ) -> Callable[[str | None], ApiKey | None] | None:
        """What authenticates a call of `method`; None where calls need no key."""
        if self.access is None or not guarded or method in OPEN_METHODS:
            return None
        return self.access.authenticate

    def _wrap(  # noqa: PLR0915 - one closure, so a call's path looks nothing up
        self,
        method: str,
        behaviour: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Any],
        message_type: str,
        *,
        streaming: bool,
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
        """The handler around `behaviour`: a coroutine for a unary method; for a
        server-streaming one an async generator or a coroutine calling
        `context.write`, either way driven here through `context.write`."""
        service, _, name = method.lstrip("/").rpartition("/")
        grpc_type = "server_stream" if streaming else "unary"
        guarded = service in GUARDED_SERVICES
        metrics = self.metrics
        started = metrics.rpc_started.labels(grpc_type, service, name)
        seconds = metrics.rpc_seconds.labels(grpc_type, service, name)
        in_flight = metrics.rpc_in_flight.labels(service, name)
        undecodable = metrics.undecodable_requests.labels(service, name)
        readiness = self.readiness
        authenticate = self._authenticator(method, guarded=guarded)

        async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            request_id, authorization = _call_metadata(context)
            bound = REQUEST_ID.set(request_id)
            started.inc()
            in_flight.inc()
            start = time.perf_counter()
            code, level = grpc.StatusCode.OK, "info"
            try:
                if request is _UNDECODABLE:
                    undecodable.inc()
                    raise UndecodableRequest(message_type)
                if guarded and readiness.shutting_down:
                    raise ShuttingDown
                if authenticate is not None:
                    _enter(authenticate(authorization))
                if streaming:
                    return await _stream(behaviour(request, context), context)
                return await behaviour(request, context)
            except SiaError as exc:
                status = to_status(exc)
                code = status.code
                level = access_level(exc, code)
                return _answer(context, status)
            except asyncio.CancelledError:
                # The client's own deadline or cancel: its business, so the line stays info.
                code = _ended_by_client(context)
                raise
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                level = ACCESS_LEVELS.get(code, "info")
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                level = "error"
                log.exception("rpc_internal_error", method=method)
                status = make_status(code, f"internal error (request id {request_id})")
                return _answer(context, status)
            finally:
                elapsed = time.perf_counter() - start
                in_flight.dec()
                seconds.observe(elapsed)
                metrics.rpc_handled.labels(grpc_type, service, name, code.name).inc()
                access(
                    "rpc",
                    level,
                    method=method,
                    code=code.name,
                    duration_ms=round(elapsed * 1000, 3),
                )
                REQUEST_ID.reset(bound)

        return handle


def _enter(caller: ApiKey | None) -> None:
    """Make `caller` the call's caller, for the servicer and the log lines (no reset is
    needed: grpc.aio runs each call in a task of its own, with its own context)."""
    if caller is not None:
        CALLER.set(caller)
        KEY_NAME.set(caller.name)


def _ended_by_client(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    """DEADLINE_EXCEEDED when the caller's deadline has passed, else CANCELLED."""
    remaining = context.time_remaining()
    deadline = remaining is not None and remaining <= 0
    return grpc.StatusCode.DEADLINE_EXCEEDED if deadline else grpc.StatusCode.CANCELLED


async def _stream(answer: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Drive a streaming handler's answer: an async generator's messages are written
    here; a coroutine writes its own."""
    if inspect.isasyncgen(answer):
        async for message in answer:
            await context.write(message)
    else:
        await answer


def _call_metadata(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, str | None]:
    """The call's request id (the client's `x-request-id`, else a new one) and its
    `authorization` value, in one pass over the metadata."""
    request_id, authorization = None, None
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and 0 < len(value) <= 128:
            request_id = value
        elif key == "authorization" and isinstance(value, str):
            authorization = value
    return request_id or new_request_id(), authorization


def _answer(context: grpc.aio.ServicerContext[Any, Any], status: grpc.Status) -> None:
    """End the call with `status` by returning, not by `context.abort`: grpc.aio keeps the
    AbortError on the call's state, a cycle through its traceback that holds the request
    (and every frame's locals) until a full collection."""
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata(status.trailing_metadata)
