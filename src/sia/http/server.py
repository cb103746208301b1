"""The HTTP side server: liveness, readiness, Prometheus metrics and stored images.

GET /health          200 while the process runs (liveness)
GET /ready           200 when this instance should get traffic, else 503 with reasons
GET /metrics         Prometheus text format; with METRICS_TOKEN only for `Bearer <token>`
GET /images/{key}    an image the local blob store keeps (only when it has a directory);
                     with `links`, only by a signed link that has not expired (else 403)
POST /v1/images/generations, POST /v1/images/edits, GET /v1/models
                     OpenAI-compatible image API (only with `service`; `sia.http.openai_api`)
/v1/tasks, /v1/tasks/{id}, /v1/tasks/{id}/cancel, /v1/tasks/{id}/events
                     native task routes (only with `service`; `sia.http.tasks_api`)
GET /openapi.json    OpenAPI 3.1 document of those REST routes (`sia.http.openapi`)
GET /, /playground/* the web playground, a page on those routes (only with `service` and
                     PLAYGROUND_ENABLED; `sia.http.playground`)

Request bodies are limited to GRPC_MAX_MESSAGE_MB, as gRPC messages are (413 beyond).

With HTTP_TLS_CERT_FILE and HTTP_TLS_KEY_FILE the port speaks HTTPS only, and
renewed files are loaded every TLS_RELOAD_INTERVAL seconds (`sia.tls`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from sia.http import playground
from sia.http.openai_api import OpenAIApi
from sia.http.openapi import openapi_document
from sia.http.tasks_api import TasksApi
from sia.logs import get_logger
from sia.storage.base import content_type_of, is_key
from sia.tls import HttpTls

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

    from sia.access.gate import AccessControl
    from sia.config import Settings
    from sia.health import Readiness
    from sia.metrics import Metrics
    from sia.service import ImageService
    from sia.storage.local import ImageLinks

    RouteHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = get_logger("sia.http")

#: Seconds `stop` waits for requests still open after the drain before closing them.
_CLOSE_TIMEOUT = 2.0

#: Methods counted by name in the HTTP metrics; any other is counted as "other".
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class HttpServer:
    """aiohttp application and runner on HTTP_HOST:HTTP_PORT.

    `images` is the blob store's directory (`BlobStore.image_dir`), or None
    when stored images are linked elsewhere; `links` checks the signed links
    the store hands out (the store's own `ImageLinks`). Without `links` any
    well-formed key is served, as before links were signed. With `service` the
    OpenAI-compatible routes are served too, authenticated by `access`.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        readiness: Readiness,
        metrics: Metrics,
        images: Path | None,
        links: ImageLinks | None = None,
        service: ImageService | None = None,
        access: AccessControl | None = None,
    ) -> None:
        self.settings = settings
        self.readiness = readiness
        self.metrics = metrics
        self.images = images
        self.links = links
        token = settings.metrics_token
        self._metrics_token = None if token is None else token.get_secret_value().encode()
        self.tls: HttpTls | None = None
        self._tls_watch: asyncio.Task[None] | None = None
        app = web.Application(
            client_max_size=settings.grpc_max_message_bytes, middlewares=[self._measured]
        )
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/metrics", self.scrape)
        if images is not None:
            app.router.add_get("/images/{key}", self.image)
        if service is not None:
            OpenAIApi(service, access, readiness).add_routes(app.router)
            TasksApi(service, access, readiness).add_routes(app.router)
            app.router.add_get("/openapi.json", self.openapi)
            if settings.playground_enabled:
                playground.add_routes(app.router)
        # handler_cancellation: a client that goes away cancels its call, and so the
        # generation upstream, as a cancelled gRPC call does.
        self.runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=_CLOSE_TIMEOUT,
        )
        self.port = 0
        self._in_flight = 0
        self._idle: asyncio.Event | None = None

    @property
    def scheme(self) -> str:
        """`https` with HTTP_TLS_CERT_FILE, else `http`."""
        return "http" if self.settings.http_tls_cert_file is None else "https"

    async def start(self) -> None:
        """Load the certificate (ConfigError when bad), bind and start serving."""
        self.tls = HttpTls.from_settings(self.settings)
        await self.runner.setup()
        site = web.TCPSite(
            self.runner,
            self.settings.http_host,
            self.settings.http_port,
            reuse_port=False,
            ssl_context=None if self.tls is None else self.tls.context,
        )
        await site.start()
        self.port = self.runner.addresses[0][1]
        if self.tls is not None:
            self._tls_watch = asyncio.create_task(self.tls.watch(), name="sia-http-tls-reload")
        log.info(
            "http_server_started",
            host=self.settings.http_host,
            port=self.port,
            tls="plaintext" if self.tls is None else "tls",
            metrics_auth=self._metrics_token is not None,
            signed_image_links=self.links is not None,
        )

    async def drain(self, grace: float) -> None:
        """Wait up to `grace` seconds for the requests in flight to finish (new API calls
        are refused from the start of shutdown; event streams end at it)."""
        if self._in_flight:
            self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)

    async def stop(self) -> None:
        """Stop serving; idempotent. Requests still open after `drain` get
        _CLOSE_TIMEOUT seconds more before their connections are closed."""
        if self._tls_watch is not None:
            self._tls_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tls_watch
            self._tls_watch = None
        await self.runner.cleanup()

    @web.middleware
    async def _measured(self, request: web.Request, handler: RouteHandler) -> web.StreamResponse:
        """Count and time every request by its route's template (bounded labels: never the
        path itself, which holds task ids and image keys)."""
        start = time.perf_counter()
        status = 500
        self._in_flight += 1
        try:
            response = await handler(request)
            status = response.status
            # A body (tens of MB of b64_json) is sent within the count, so a drain waits for
            # it. FileResponse is left to aiohttp: its prepare opens the file each time.
            if isinstance(response, web.Response) and not response.prepared:
                await response.prepare(request)
                await response.write_eof()
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away first (nginx's code for it)
            raise
        finally:
            resource = request.match_info.route.resource
            route = "unmatched" if resource is None else resource.canonical
            method = request.method if request.method in _METHODS else "other"
            metrics = self.metrics
            metrics.http_requests.labels(route, method, str(status)).inc()
            metrics.http_seconds.labels(route, method).observe(time.perf_counter() - start)
            self._in_flight -= 1
            if not self._in_flight and self._idle is not None:
                self._idle.set()

    async def openapi(self, _: web.Request) -> web.Response:
        """The OpenAPI 3.1 document of the REST routes (`sia.http.openapi`)."""
        return web.json_response(openapi_document())

    async def health(self, _: web.Request) -> web.Response:
        """Liveness: the process is up and its event loop answers."""
        return web.json_response({"status": "ok"})

    async def ready(self, _: web.Request) -> web.Response:
        """Readiness, with the reasons when not ready."""
        reasons = await self.readiness.reasons()
        if not reasons:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready", "reasons": reasons}, status=503)

    async def scrape(self, request: web.Request) -> web.Response:
        """Prometheus scrape; with METRICS_TOKEN, 401 unless the request bears it."""
        if self._metrics_token is not None:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer":
                raise web.HTTPUnauthorized(headers={"WWW-Authenticate": "Bearer"})
            if not hmac.compare_digest(token.strip().encode(errors="replace"), self._metrics_token):
                raise web.HTTPUnauthorized(
                    headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
                )
        body = await self.metrics.scrape()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def image(self, request: web.Request) -> web.StreamResponse:
        """A stored image by key: 403 for a link unsigned, altered or expired (before the
        file is looked at), 404 for a key that is malformed or has no file."""
        assert self.images is not None  # the route exists only with a directory
        key = request.match_info["key"]
        if not is_key(key):
            raise web.HTTPNotFound
        max_age = 86400
        if self.links is not None:
            query = request.query
            left = self.links.seconds_left(key, query.get("expires"), query.get("signature"))
            if left is None:
                raise web.HTTPForbidden
            max_age = min(max_age, left)  # no cache keeps it past the link's expiry
        if not (path := self.images / key).is_file():
            raise web.HTTPNotFound
        return web.FileResponse(
            path,
            headers={
                "Content-Type": content_type_of(key),
                "Cache-Control": f"private, max-age={max_age}, immutable",
            },
        )
