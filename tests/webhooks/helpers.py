"""A loopback webhook receiver that checks every signature, and small builders for tests."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from redis import asyncio as aioredis
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from sia.domain import (
    GeneratedImage,
    GenerationRequest,
    GenerationResult,
    ImageError,
    Task,
    TaskStatus,
    Usage,
)
from sia.webhooks.store import Delivery, DeliveryStore
from tests.tasks.backend_helpers import REDIS_URL
from tests.waiting import until, within

#: A Standard Webhooks secret: whsec_ and the base64 of 32 bytes.
SECRET = "whsec_" + base64.b64encode(b"sia-webhook-test-secret-32-bytes").decode()

#: What the receiver answers one request with: a status, or a handler of its own.
Answer = int | Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Received:
    """One POST that reached the receiver, its signature verified."""

    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    event: dict[str, Any]

    @property
    def webhook_id(self) -> str:
        """The webhook-id header."""
        return self.headers["webhook-id"]


class Receiver:
    """An aiohttp app on 127.0.0.1 that records each POST and answers from a script.

    Every request's signature is checked with standardwebhooks, as a real
    receiver would; one that fails is kept in `bad` (tests assert it stays empty).
    `script` answers requests in order; once empty, `default` answers them.
    """

    def __init__(self, secret: str = SECRET) -> None:
        self.verifier = Webhook(secret)
        self.received: list[Received] = []
        self.bad: list[str] = []
        self.script: list[Answer] = []
        self.default: Answer = 200
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """The receiver's hook URL."""
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self, port: int = 0) -> None:
        """Listen on `port` (0: one the OS picks, kept for a restart)."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a handler still waiting when the client hangs up ends with it.
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port or self.port, reuse_address=True)
        await site.start()
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening; `start()` again listens on the same port."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def wait_for(self, count: int, timeout: float = 10) -> list[Received]:
        """The requests received, once there are at least `count`."""
        await until(
            lambda: len(self.received) >= count,
            f"the receiver got {len(self.received)} of {count} requests",
            timeout,
        )
        return self.received

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {key.lower(): value for key, value in request.headers.items()}
        try:
            event = self.verifier.verify(body, headers)
        except WebhookVerificationError as exc:
            self.bad.append(f"{exc}: {headers}")
            event = {}
        self.received.append(
            Received(request.path, request.query_string, headers, body, event or {})
        )
        answer = self.script.pop(0) if self.script else self.default
        if isinstance(answer, int):
            return web.Response(status=answer, text=f"answer {answer}")
        return await answer(request)


def make_task(
    url: str,
    status: TaskStatus = TaskStatus.SUCCEEDED,
    *,
    images: int = 1,
    each_image: bool = False,
    error: ImageError | None = None,
) -> Task:
    """A finished task with `images` linked images that asked for webhooks at `url`."""
    now = datetime.now(UTC)
    request = GenerationRequest(
        prompt="a red fox",
        model="m-1",
        size="1024x1024",
        request_id="req-1",
        webhook_url=url,
        webhook_images=each_image,
        max_images=images if each_image else None,
    )
    result = None
    if status is TaskStatus.SUCCEEDED:
        result = GenerationResult(
            model="m-1",
            images=tuple(
                GeneratedImage(
                    index=i,
                    url=f"https://img.example/{i}.jpeg",
                    size="1024x1024",
                    content_type="image/jpeg",
                )
                for i in range(images)
            ),
            usage=Usage(generated_images=images),
        )
    return Task(
        id="task_" + uuid.uuid4().hex[:24],
        request=request,
        status=status,
        created_at=now,
        updated_at=now,
        finished_at=now if status.is_terminal else None,
        result=result,
        error=error,
    )


def make_delivery(id: str = "msg_1", *, next_at: float = 0.0, **fields: Any) -> Delivery:
    """A delivery with a small JSON payload, due at `next_at`."""
    values: dict[str, Any] = {
        "task_id": "task_1",
        "type": "task.succeeded",
        "url": "https://hooks.example/in",
        "payload": json.dumps({"type": "task.succeeded", "note": "ünïcode ✓"}, ensure_ascii=False),
        "created_at": next_at,
    }
    values.update(fields)
    return Delivery(id=id, next_at=next_at, **values)


def outcome(registry: CollectorRegistry, name: str) -> float:
    """The count of delivery attempts with outcome `name`."""
    value = registry.get_sample_value("sia_webhook_deliveries_total", {"outcome": name})
    return value or 0.0


async def wait_outcome(registry: CollectorRegistry, name: str, count: float = 1) -> None:
    """Return once `count` attempts have had outcome `name`."""
    await until(
        lambda: outcome(registry, name) >= count,
        f"{outcome(registry, name)} of {count} attempts were {name}",
    )


async def wait_pending(store: DeliveryStore, count: int = 0, timeout: float = 10) -> None:
    """Return once the store holds `count` pending deliveries."""

    async def poll() -> None:
        while await store.pending() != count:
            await asyncio.sleep(0.01)

    await within(poll(), f"the store does not hold {count} pending deliveries", timeout)


async def delete_webhook_keys(queue: str) -> None:
    """Delete every key the Redis delivery store made for `queue`."""
    client = aioredis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"sia:{queue}:webhooks:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
