"""The HTTP side server: liveness, readiness, Prometheus metrics and stored images.

GET /health          200 while the process runs (liveness)
GET /ready           200 when this instance should get traffic, else 503
GET /metrics         Prometheus text format
GET /images/{key}    an image from the local blob store
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from sia.errors import NotFound
from sia.logs import get_logger
from sia.storage.local import LocalBlobStore, content_type_of

if TYPE_CHECKING:
    from sia.config import Settings
    from sia.service import ImageService

log = get_logger("sia.http")


class HttpServer:
    """aiohttp application and runner on HTTP_HOST:HTTP_PORT."""

    def __init__(self, settings: Settings, service: ImageService) -> None:
        self.settings = settings
        self.service = service
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/metrics", self.metrics)
        if isinstance(service.store, LocalBlobStore):
            app.router.add_get("/images/{key}", self.image)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self.port = 0

    async def start(self) -> None:
        """Bind and start serving."""
        await self.runner.setup()
        site = web.TCPSite(
            self.runner, self.settings.http_host, self.settings.http_port, reuse_port=False
        )
        await site.start()
        self.port = self.runner.addresses[0][1]
        log.info("http_server_started", host=self.settings.http_host, port=self.port)

    async def stop(self) -> None:
        """Stop serving; idempotent."""
        await self.runner.cleanup()

    async def health(self, _: web.Request) -> web.Response:
        """Liveness: the process is up and its event loop answers."""
        return web.json_response({"status": "ok"})

    async def ready(self, _: web.Request) -> web.Response:
        """Readiness, with the reasons when not ready."""
        readiness = self.service.readiness
        if await self.service.ready():
            return web.json_response({"status": "ready"})
        reasons = dict(readiness.problems)
        if not readiness.started:
            reasons["server"] = "starting"
        if readiness.shutting_down:
            reasons["server"] = "shutting down"
        if not reasons:
            reasons["tasks"] = "task store is not answering"
        return web.json_response({"status": "not ready", "reasons": reasons}, status=503)

    async def metrics(self, _: web.Request) -> web.Response:
        """Prometheus scrape."""
        await self.service.publish_task_stats()
        return web.Response(
            body=self.service.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def image(self, request: web.Request) -> web.StreamResponse:
        """A stored image by key; 404 when unknown or expired."""
        store = self.service.store
        assert isinstance(store, LocalBlobStore)  # the route exists only for the local store
        key = request.match_info["key"]
        try:
            path = store.path(key)
        except NotFound:
            raise web.HTTPNotFound from None
        if not path.is_file():
            raise web.HTTPNotFound
        return web.FileResponse(
            path,
            headers={
                "Content-Type": content_type_of(key),
                "Cache-Control": "private, max-age=86400, immutable",
            },
        )
