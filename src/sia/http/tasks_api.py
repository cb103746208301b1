"""Native task routes on the HTTP port: SIA's async tasks over REST, and their events.

POST   /v1/tasks               JSON: prompt, model, size, response_format, n (> 1: a group),
                               images (URLs or data URIs), request_id, webhook_url,
                               webhook_each_image, seed, guidance_scale, watermark → 202 task
GET    /v1/tasks               the caller's tasks, newest first: ?status=&page_size=&page_token=
GET    /v1/tasks/{id}          one task: status, images so far, error, timestamps
DELETE /v1/tasks/{id}          cancel it (also POST /v1/tasks/{id}/cancel)
GET    /v1/tasks/{id}/events   text/event-stream: `event: task` with the task now and at each
                               change, ending after the final state

The same validation, limits, ownership and idempotency (request_id) as gRPC, through
`ImageService` with the caller; authentication, errors and access lines are those of the
OpenAI-compatible routes (`sia.http.common`).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, cast

import orjson
import pybase64
from aiohttp import web

from sia import errors
from sia.domain import TaskStatus
from sia.http.common import ApiRoutes, error_body, json_object
from sia.http.fields import FieldAsSent, field, generation_request, text
from sia.logs import REQUEST_ID
from sia.validation import validate_page, validate_task_id

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator
    from datetime import datetime

    from sia.access.base import ApiKey
    from sia.domain import GeneratedImage, Task

#: Most references one request may list (validation checks each one further).
MAX_IMAGES_LISTED = 64
#: Seconds between SSE comments that keep an idle stream open and notice a gone client.
KEEPALIVE_SECONDS = 15.0

#: Fields POST /v1/tasks reads; others are refused by name.
_FIELDS = frozenset(
    {
        "prompt",
        "model",
        "size",
        "response_format",
        "n",
        "images",
        "request_id",
        "webhook_url",
        "webhook_each_image",
        "seed",
        "guidance_scale",
        "watermark",
    }
)


class TasksApi(ApiRoutes):
    """The handlers of the native task routes; `add_routes` puts them on a router."""

    PARAMS = {"max_images": "n", "webhook_images": "webhook_each_image"}  # noqa: RUF012

    keepalive = KEEPALIVE_SECONDS

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """Register the /v1/tasks routes."""
        router.add_post("/v1/tasks", self.handled(self.submit))
        router.add_get("/v1/tasks", self.handled(self.list_tasks))
        router.add_get("/v1/tasks/{task_id}", self.handled(self.get_task))
        router.add_delete("/v1/tasks/{task_id}", self.handled(self.cancel))
        router.add_post("/v1/tasks/{task_id}/cancel", self.handled(self.cancel))
        router.add_get("/v1/tasks/{task_id}/events", self.handled(self.events))

    async def submit(self, request: web.Request, caller: ApiKey | None) -> web.Response:
        """POST /v1/tasks: 202 with the new task (or the caller's task of its request_id)."""
        body = await json_object(request)
        if unknown := sorted(set(body) - _FIELDS):
            name = unknown[0][:64]
            hint = f" (here it is {self.PARAMS[name]})" if name in self.PARAMS else ""
            raise FieldAsSent.field(name, f"is not a field of a task request{hint}")
        images = body.get("images")
        if images is None:
            images = []
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise field("images", "must be a list of URLs or data URIs")
        if len(images) > MAX_IMAGES_LISTED:
            raise field("images", f"lists {len(images)}; at most {MAX_IMAGES_LISTED}")
        each = body.get("webhook_each_image")
        if each is not None and not isinstance(each, bool):
            raise field("webhook_each_image", "must be true or false")
        domain = generation_request(
            self.service.defaults,
            body,
            images,
            request_id=text(body, "request_id"),
            webhook_url=text(body, "webhook_url"),
            webhook_images=bool(each),
        )
        task = await self.service.submit(domain, caller=caller)
        return _json(task_json(task), status=202)

    async def get_task(self, request: web.Request, caller: ApiKey | None) -> web.Response:
        """GET /v1/tasks/{id}."""
        task = await self.service.get_task(_task_id(request), caller=caller)
        return _json(task_json(task))

    async def cancel(self, request: web.Request, caller: ApiKey | None) -> web.Response:
        """DELETE /v1/tasks/{id} or POST /v1/tasks/{id}/cancel: the cancelled task."""
        task = await self.service.cancel_task(_task_id(request), caller=caller)
        return _json(task_json(task))

    async def list_tasks(self, request: web.Request, caller: ApiKey | None) -> web.Response:
        """GET /v1/tasks: a page of the caller's tasks, newest first."""
        query = request.query
        status = None
        if value := query.get("status", ""):
            try:
                status = TaskStatus(value.lower())
            except ValueError:
                known = ", ".join(s.value for s in TaskStatus)
                raise field("status", f"must be one of {known}") from None
        size = None
        if raw := query.get("page_size", ""):
            try:
                size = int(raw)
            except ValueError:
                raise field("page_size", "must be an integer") from None
        token = query.get("page_token", "")
        size = validate_page(size, token)
        tasks, cursor = await self.service.list_tasks(
            caller=caller, status=status, limit=size, after=token
        )
        return _json(
            {
                "object": "list",
                "data": [task_json(task) for task in tasks],
                "next_page_token": cursor,
            }
        )

    async def events(self, request: web.Request, caller: ApiKey | None) -> web.StreamResponse:
        """GET /v1/tasks/{id}/events: Server-Sent Events of the task until it has ended.

        The first state is read before the stream starts, so a missing task is a JSON
        404; an error later (shutdown) is sent as `event: error` and ends the stream.
        """
        watch = cast("AsyncGenerator[Task]", self.service.watch(_task_id(request), caller=caller))
        try:
            first = await anext(watch)
        except BaseException:
            await watch.aclose()
            raise
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                "X-Request-Id": REQUEST_ID.get() or "",
            }
        )
        try:
            await response.prepare(request)
        except BaseException:
            await watch.aclose()
            raise
        states: asyncio.Queue[Task | errors.SiaError | None] = asyncio.Queue()
        pump = asyncio.create_task(_pump(watch, states), name="sia-http-task-events")
        try:
            await _send(response, "task", task_json(first))
            while True:
                try:
                    item = await asyncio.wait_for(states.get(), self.keepalive)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")  # raises once the client is gone
                    continue
                if item is None:
                    break
                if isinstance(item, errors.SiaError):
                    await _send(
                        response, "error", error_body(item, REQUEST_ID.get() or "", self.PARAMS)[1]
                    )
                    break
                await _send(response, "task", task_json(item))
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
        except ConnectionError:
            pass  # the client went away: the watch ends below
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        return response


async def _pump(
    watch: AsyncGenerator[Task], states: asyncio.Queue[Task | errors.SiaError | None]
) -> None:
    """The watch's later states into `states`, then None (or the error that ended it)."""
    try:
        async for task in watch:
            states.put_nowait(task)
    except errors.SiaError as exc:
        states.put_nowait(exc)
        return
    finally:
        await watch.aclose()
    states.put_nowait(None)


async def _send(response: web.StreamResponse, event: str, data: dict[str, Any]) -> None:
    await response.write(b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n")


def _json(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _task_id(request: web.Request) -> str:
    return validate_task_id(request.match_info["task_id"])


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def _image(image: GeneratedImage) -> dict[str, Any]:
    if image.error is not None:
        return {
            "index": image.index,
            "error": {"code": image.error.code, "message": image.error.message},
        }
    shown: dict[str, Any] = {"index": image.index}
    if image.data:
        shown["b64_json"] = pybase64.b64encode(image.data).decode()
    else:
        shown["url"] = image.url
    shown["size"] = image.size
    shown["content_type"] = image.content_type
    return shown


def task_json(task: Task) -> dict[str, Any]:
    """A task as the REST routes answer it."""
    result = task.result
    error = task.error
    return {
        "id": task.id,
        "object": "task",
        "status": task.status.value,
        "model": result.model if result is not None else task.request.model,
        "request_id": task.request.request_id,
        "n": task.request.max_images or 1,
        "images": [] if result is None else [_image(image) for image in result.images],
        "usage": None
        if result is None
        else {
            "generated_images": result.usage.generated_images,
            "output_tokens": result.usage.output_tokens,
        },
        "error": None if error is None else {"code": error.code, "message": error.message},
        "created_at": _time(task.created_at),
        "updated_at": _time(task.updated_at),
        "finished_at": _time(task.finished_at),
    }
