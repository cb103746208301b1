"""The server interceptor: request ids, errors to statuses, access log and metrics.

Every unary RPC goes through `ObservabilityInterceptor`. It binds a request
id (the client's `x-request-id` metadata, or a new one) into the log context,
refuses work while the server drains, turns `SiaError` into a rich status and
any other exception into INTERNAL (logged with its trace, never sent), then
writes one access line and records the per-method metrics.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from sia.domain import new_request_id
from sia.errors import ShuttingDown, SiaError
from sia.logs import REQUEST_ID, AccessLog, get_logger
from sia.rpc.errors import make_status, to_status

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sia.health import Readiness
    from sia.metrics import Metrics

log = get_logger("sia.rpc")
access = AccessLog("sia.rpc")


#: Services whose calls are refused once shutdown begins (health and reflection stay up).
GUARDED_SERVICES = frozenset({"image.v1.ImageService"})


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each unary handler once per method; see the module docstring."""

    def __init__(self, metrics: Metrics, readiness: Readiness) -> None:
        self.metrics = metrics
        self.readiness = readiness
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """Return the cached wrapped handler for unary methods, others unchanged."""
        method: str = details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        wrapped = grpc.unary_unary_rpc_method_handler(
            self._wrap(method, handler.unary_unary),  # type: ignore[arg-type]  # aio handlers are async
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._wrapped[method] = wrapped
        return wrapped

    def _wrap(
        self,
        method: str,
        behaviour: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]],
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
        service, _, name = method.lstrip("/").rpartition("/")
        guarded = service in GUARDED_SERVICES
        metrics = self.metrics
        started = metrics.rpc_started.labels("unary", service, name)
        seconds = metrics.rpc_seconds.labels("unary", service, name)
        in_flight = metrics.rpc_in_flight.labels(service, name)
        readiness = self.readiness

        async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            request_id = _request_id(context)
            bound = REQUEST_ID.set(request_id)
            started.inc()
            in_flight.inc()
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                if guarded and readiness.shutting_down:
                    raise ShuttingDown
                return await behaviour(request, context)
            except SiaError as exc:
                status = to_status(exc)
                code = status.code
                await context.abort(status.code, status.details, status.trailing_metadata)
            except asyncio.CancelledError:
                remaining = context.time_remaining()
                deadline = remaining is not None and remaining <= 0
                code = grpc.StatusCode.DEADLINE_EXCEEDED if deadline else grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                log.exception("rpc_internal_error", method=method)
                status = make_status(code, f"internal error (request id {request_id})")
                await context.abort(status.code, status.details, status.trailing_metadata)
            finally:
                elapsed = time.perf_counter() - start
                in_flight.dec()
                seconds.observe(elapsed)
                metrics.rpc_handled.labels("unary", service, name, code.name).inc()
                access("rpc", method=method, code=code.name, duration_ms=round(elapsed * 1000, 3))
                REQUEST_ID.reset(bound)

        return handle


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return new_request_id()
