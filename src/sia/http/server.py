"""The HTTP side server: liveness, readiness, Prometheus metrics and stored images.

GET /health          200 while the process runs (liveness)
GET /ready           200 when this instance should get traffic, else 503 with reasons
GET /metrics         Prometheus text format
GET /images/{key}    an image the local blob store keeps (only when it has a directory)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from sia.logs import get_logger
from sia.storage.base import content_type_of, is_key

if TYPE_CHECKING:
    from pathlib import Path

    from sia.config import Settings
    from sia.health import Readiness
    from sia.metrics import Metrics

log = get_logger("sia.http")


class HttpServer:
    """aiohttp application and runner on HTTP_HOST:HTTP_PORT.

    `images` is the blob store's directory (`BlobStore.image_dir`), or None
    when stored images are linked elsewhere.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        readiness: Readiness,
        metrics: Metrics,
        images: Path | None,
    ) -> None:
        self.settings = settings
        self.readiness = readiness
        self.metrics = metrics
        self.images = images
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/metrics", self.scrape)
        if images is not None:
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
        reasons = await self.readiness.reasons()
        if not reasons:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready", "reasons": reasons}, status=503)

    async def scrape(self, _: web.Request) -> web.Response:
        """Prometheus scrape."""
        body = await self.metrics.scrape()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def image(self, request: web.Request) -> web.StreamResponse:
        """A stored image by key; 404 when unknown or expired."""
        assert self.images is not None  # the route exists only with a directory
        key = request.match_info["key"]
        if not is_key(key) or not (path := self.images / key).is_file():
            raise web.HTTPNotFound
        return web.FileResponse(
            path,
            headers={
                "Content-Type": content_type_of(key),
                "Cache-Control": "private, max-age=86400, immutable",
            },
        )
