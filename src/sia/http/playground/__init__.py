"""The web playground at `/` on the HTTP port: a page that generates images through the
REST API (docs/playground.md).

GET /                          index.html
GET /playground/{app.js,style.css}

Three plain files beside this module, read once and served from memory with an ETag
and `Cache-Control: no-cache`: a browser revalidates each load (a 304 when unchanged),
so an upgraded server never runs with last version's script. The page talks only to
the REST routes of its own origin; the Content-Security-Policy below holds it to that.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import TYPE_CHECKING, NamedTuple

from aiohttp import web

if TYPE_CHECKING:
    from aiohttp.typedefs import Handler

#: What the page may load. Scripts, styles and requests (where the API key goes) are
#: held to this origin; images may come from anywhere over HTTP(S), because their links
#: point where the blob store says (PUBLIC_URL, an S3 endpoint or S3_PUBLIC_URL), which
#: need not be the origin the page was opened at. An image cannot run code or read the
#: page, and the page inserts nothing from the server as HTML.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob: http: https:",
        "connect-src 'self'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    )
)

_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # image links carry signatures
}

#: The files served, by route, with their content types.
_FILES = {
    "/": ("index.html", "text/html"),
    "/playground/app.js": ("app.js", "text/javascript"),
    "/playground/style.css": ("style.css", "text/css"),
}


class _Asset(NamedTuple):
    body: bytes
    content_type: str
    etag: str


def add_routes(router: web.UrlDispatcher) -> None:
    """Register GET / and the page's assets."""
    folder = resources.files(__name__)
    for path, (name, content_type) in _FILES.items():
        body = folder.joinpath(name).read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        router.add_get(path, _handler(_Asset(body, content_type, etag)))


def _handler(asset: _Asset) -> Handler:
    async def serve(request: web.Request) -> web.Response:
        headers = {**_HEADERS, "ETag": asset.etag}
        if asset.etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(
            body=asset.body, content_type=asset.content_type, charset="utf-8", headers=headers
        )

    return serve
