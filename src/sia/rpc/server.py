"""The gRPC server: ImageService, standard health, reflection, channel options and TLS."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, cast

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from sia.api.image.v1 import image_service_pb2 as pb
from sia.api.image.v1 import image_service_pb2_grpc as pb_grpc
from sia.logs import get_logger
from sia.rpc.interceptors import ObservabilityInterceptor
from sia.rpc.servicer import ImageServicer
from sia.tls import grpc_files, grpc_server_credentials

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from sia.access.gate import AccessControl
    from sia.config import Settings
    from sia.health import Readiness
    from sia.metrics import Metrics
    from sia.service import ImageService

log = get_logger("sia.rpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ImageService"].full_name


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel arguments: message sizes, pending-call limit and keepalive.

    Keepalive: the server pings idle connections every 60 s and accepts client
    pings as often as every 10 s, with or without calls in flight, so clients
    holding minute-long calls are never sent GOAWAY `too_many_pings`.
    """
    size = settings.grpc_max_message_bytes
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        ("grpc.server.max_pending_requests", settings.grpc_max_pending_requests),
        ("grpc.max_concurrent_streams", 100_000),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0),
    ]


class GenericHandlersOnly:
    """What generated `add_*Servicer_to_server` functions call, adding generic handlers only.

    Those functions register every method twice: in a generic handler and as a
    "registered method". grpc.aio keeps one pending request per registered
    method, plus one for everything else, and waits on all of them
    (`asyncio.wait`) before every call it accepts, a cost that grows with the
    number of methods. Through the generic handlers alone each call is routed
    the same way, by its method name, and the wait is over one request.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        """Add to the server."""
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        """Ignored: the generic handler added with them serves the same methods."""


class HealthServicer(health.aio.HealthServicer):
    """grpc.health.v1 as the reference servicer has it, but Watch ends with shutdown.

    The reference Watch waits for the next change for ever, so every open watch
    (Envoy, Linkerd, client-side health checking) would hold `server.stop` for
    its whole grace period. Here a watch that has sent NOT_SERVING after
    shutdown began ends with OK, and the watcher moves to another replica.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ending = False  # shutdown has begun

    async def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """Stream the service's status until shutdown has been sent, or the peer goes."""
        # The proxy forwards everything else to the real context (see _EndingContext).
        ending = cast("grpc.aio.ServicerContext[Any, Any]", _EndingContext(context, self))
        with contextlib.suppress(_WatchEnded):
            await super().Watch(request, ending)

    async def enter_graceful_shutdown(self) -> None:
        """NOT_SERVING for every service, for good; open watches end after sending it."""
        self.ending = True
        await super().enter_graceful_shutdown()


class _WatchEnded(Exception):
    """Unwinds the reference Watch loop once shutdown's status has been written."""


class _EndingContext:
    """The watch's context, whose write() ends the watch once shutdown has begun."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], servicer: HealthServicer):
        self._context = context
        self._servicer = servicer

    async def write(self, message: health_pb2.HealthCheckResponse) -> None:
        await self._context.write(message)
        if self._servicer.ending:
            raise _WatchEnded

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class GrpcServer:
    """The grpc.aio server with every service registered; owns its health servicer.

    With GRPC_TLS_CERT_FILE and GRPC_TLS_KEY_FILE the port speaks TLS only (and
    with GRPC_TLS_CLIENT_CA_FILE asks every client for a certificate that CA
    signed); renewed files are picked up by new connections (`sia.tls`). A bad
    certificate is a ConfigError.
    """

    def __init__(
        self,
        settings: Settings,
        service: ImageService,
        metrics: Metrics,
        readiness: Readiness,
        access: AccessControl | None = None,
    ) -> None:
        self.settings = settings
        credentials = grpc_server_credentials(settings)  # first: a bad file is a ConfigError
        files = grpc_files(settings)
        self.tls = "plaintext" if files is None else files.mode
        self.health = HealthServicer()
        self.server = grpc.aio.server(
            interceptors=[ObservabilityInterceptor(metrics, readiness, access)],
            options=server_options(settings),
        )
        registrar = cast("grpc.aio.Server", GenericHandlersOnly(self.server))
        pb_grpc.add_ImageServiceServicer_to_server(ImageServicer(service), registrar)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, registrar)
        names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        # What reflection.enable_server_reflection does for an aio server (untyped in the stubs).
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(  # type: ignore[no-untyped-call]
            reflection.aio.ReflectionServicer(names), registrar
        )
        address = f"{settings.grpc_host}:{settings.grpc_port}"
        try:  # grpcio raises RuntimeError for a port in use; older versions returned 0
            if credentials is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, credentials)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise OSError(f"GRPC_PORT: cannot listen on {address} (in use, or not allowed)")
        self._stopped = False
        self._health_lock = asyncio.Lock()  # changes are published in the order they happened

    async def start(self) -> None:
        """Start serving; health starts NOT_SERVING until readiness says otherwise."""
        await self.server.start()
        log.info("grpc_server_started", host=self.settings.grpc_host, port=self.port, tls=self.tls)

    async def set_serving(self, serving: bool) -> None:
        """Publish readiness on grpc.health.v1.

        `image.v1.ImageService` follows readiness (start-up, a refused provider
        key, a task or blob store that fails its checks, shutdown); `""` is
        liveness: SERVING from start until shutdown, so a bad key or a store
        outage takes the pod out of rotation instead of restarting it.
        """
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        async with self._health_lock:
            await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
            await self.health.set(SERVICE_NAME, status)

    async def stop(self, grace: float) -> None:
        """Health NOT_SERVING for good, refuse new calls, let in-flight calls finish."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        log.info("grpc_server_stopped")
