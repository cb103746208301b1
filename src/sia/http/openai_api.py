"""OpenAI-compatible image endpoints on the HTTP port, for clients of OpenAI's Images API.

POST /v1/images/generations  JSON: prompt, model, n, size, response_format ("url" or
                             "b64_json"); quality, style, user and other OpenAI fields are
                             ignored; seed, guidance_scale and watermark pass through
POST /v1/images/edits        multipart: one or more `image` / `image[]` files (references),
                             prompt, model, n, size, response_format
GET  /v1/models              the provider's models (those the caller's key may use)
GET  /v1/models/{model}      one of them

`n` > 1 asks for a sequential group of up to `n` images (`max_images`); the model may
make fewer. Images of a group that failed are left out of `data` (OpenAI's clients
expect only images there) and listed, as `{"index", "code", "message"}`, in the
answer's extra `errors` field; when no image succeeded the answer is an error.

Callers authenticate with `Authorization: Bearer <SIA key>`, checked by
`AccessControl.authenticate` under the same rules as gRPC. Errors have OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with the HTTP status from
`HTTP_ERRORS`; `code` is the error's SIA reason in lower case.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
import pybase64
from aiohttp import web

from sia import errors
from sia.http.common import ApiRoutes, ImagesFailed, json_object
from sia.http.fields import boolean, field, generation_request, integer, number
from sia.validation import REFERENCE_FORMATS

if TYPE_CHECKING:
    from sia.access.base import ApiKey
    from sia.domain import GenerationRequest, GenerationResult

#: SIA field names that OpenAI spells differently (`images[2]` becomes `image`).
_PARAMS = {"max_images": "n", "images": "image"}


class OpenAIApi(ApiRoutes):
    """The handlers of the OpenAI-compatible routes; `add_routes` puts them on a router."""

    PARAMS = _PARAMS

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """Register the /v1 routes."""
        router.add_post("/v1/images/generations", self.handled(self.generations))
        router.add_post("/v1/images/edits", self.handled(self.edits))
        router.add_get("/v1/models", self.handled(self.list_models))
        router.add_get("/v1/models/{model}", self.handled(self.get_model))

    async def generations(self, request: web.Request, caller: ApiKey | None) -> web.Response:
        """POST /v1/images/generations."""
        return await self._generate(await json_object(request), (), caller)

    async def edits(self, request: web.Request, caller: ApiKey | None) -> web.Response:
        """POST /v1/images/edits (multipart/form-data)."""
        if not request.content_type.startswith("multipart/"):
            raise field("image", "send the request as multipart/form-data with image files")
        try:
            form = await request.post()
        except (ValueError, AssertionError) as exc:  # no boundary, or one never found
            raise errors.UndecodableRequest("multipart/form-data body") from exc
        images: list[str] = []
        fields: dict[str, Any] = {}
        for name, value in form.items():
            if isinstance(value, web.FileField):
                if name == "mask":
                    raise field("mask", "masks are not supported")
                if name in ("image", "image[]"):
                    images.append(_data_uri(value, len(images)))
            elif name not in ("image", "image[]"):
                fields[name] = value
        if not images:
            raise field("image", "at least one image file is required")
        # Form fields are text: the JSON types generation_request checks, from their text.
        for name, parse in (("n", integer), ("seed", integer), ("guidance_scale", number)):
            if name in fields:
                fields[name] = parse(name, fields[name])
        if "watermark" in fields:
            fields["watermark"] = boolean("watermark", fields["watermark"])
        return await self._generate(fields, images, caller)

    async def _generate(
        self, body: dict[str, Any], images: list[str] | tuple[()], caller: ApiKey | None
    ) -> web.Response:
        domain = self._request(body, images)
        result = await self.service.generate(domain, caller=caller)
        # orjson: b64_json answers run to tens of MB.
        answer = orjson.dumps(_images_response(result))
        return web.Response(body=answer, content_type="application/json")

    def _request(self, body: dict[str, Any], images: list[str] | tuple[()]) -> GenerationRequest:
        return generation_request(self.service.defaults, body, images)

    async def list_models(self, _: web.Request, caller: ApiKey | None) -> web.Response:
        """GET /v1/models."""
        data = [_model(name) for name in self._models(caller)]
        return web.json_response({"object": "list", "data": data})

    async def get_model(self, request: web.Request, caller: ApiKey | None) -> web.Response:
        """GET /v1/models/{model}."""
        name = request.match_info["model"]
        if name not in self._models(caller):
            raise errors.NotFound(f"model {name[:128]!r} not found", metadata={"model": name})
        return web.json_response(_model(name))

    def _models(self, caller: ApiKey | None) -> list[str]:
        names = sorted(self.service.defaults.models)
        if caller is not None and caller.models:
            names = [name for name in names if name in caller.models]
        return names


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "sia"}


#: Leading bytes of the formats references may have, for files sent without a type.
_MAGIC = (
    (b"\x89PNG", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF8", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


def _data_uri(upload: web.FileField, index: int) -> str:
    """An uploaded file as a data URI (validate_request checks it as a reference)."""
    data = upload.file.read()
    kind, _, subtype = (upload.content_type or "").partition("/")
    fmt = subtype.lower() if kind == "image" and subtype.lower() in REFERENCE_FORMATS else None
    if fmt is None:
        fmt = next((name for magic, name in _MAGIC if data.startswith(magic)), None)
        if fmt is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            fmt = "webp"
    if fmt is None:
        raise field(f"image[{index}]", "is not a PNG, JPEG, WebP, GIF, BMP or TIFF image")
    return f"data:image/{fmt};base64,{pybase64.b64encode(data).decode()}"


def _images_response(result: GenerationResult) -> dict[str, Any]:
    """The OpenAI ImagesResponse for a result; failed images go to `errors`."""
    data: list[dict[str, str]] = []
    failed: list[dict[str, Any]] = []
    for image in result.images:
        if image.error is not None:
            failed.append(
                {"index": image.index, "code": image.error.code, "message": image.error.message}
            )
        elif image.data:
            data.append({"b64_json": pybase64.b64encode(image.data).decode()})
        else:
            data.append({"url": image.url})
    if not data and failed:
        raise ImagesFailed(str(failed[0]["code"]), str(failed[0]["message"]))
    tokens = result.usage.output_tokens
    body: dict[str, Any] = {
        "created": int(result.created_at.timestamp()),
        "data": data,
        "usage": {
            "input_tokens": 0,
            "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
            "output_tokens": tokens,
            "total_tokens": tokens,
            "generated_images": result.usage.generated_images,
        },
    }
    if failed:
        body["errors"] = failed
    return body
