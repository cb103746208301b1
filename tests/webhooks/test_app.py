"""Webhooks end to end: a group task submitted over gRPC posts its events to a receiver."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import grpc.aio
import pytest

from sia.api.image.v1 import image_service_pb2 as pb
from sia.api.image.v1 import image_service_pb2_grpc as grpc_pb
from sia.app import App
from sia.config import Settings
from tests.helpers import MakeSettings
from tests.webhooks.conftest import WebhookSettings
from tests.webhooks.helpers import Receiver


@asynccontextmanager
async def _stub(settings: Settings) -> AsyncIterator[grpc_pb.ImageServiceStub]:
    """A running app on `settings` and a client stub for it."""
    async with (
        App(settings) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
    ):
        yield grpc_pb.ImageServiceStub(channel)


async def test_a_group_task_posts_each_image_and_its_end(
    webhook_settings: WebhookSettings, receiver: Receiver
) -> None:
    """Three image events and task.succeeded arrive signed (the receiver fixture verifies
    every signature with standardwebhooks), each with a webhook-id of its own."""
    async with _stub(webhook_settings(offline_latency=0.3)) as stub:
        request = pb.GenerateSequentialImagesRequest(
            prompt="a comic",
            size="2K",
            max_images=3,
            webhook_url=receiver.url + "/hook?client=7",
            webhook_each_image=True,
        )
        task = await stub.GenerateSequentialImagesAsync(request, timeout=10)
        received = await receiver.wait_for(4, timeout=20)
    kinds = [r.event["type"] for r in received]
    assert kinds == ["task.image"] * 3 + ["task.succeeded"]
    assert {r.event["data"]["task_id"] for r in received} == {task.task_id}
    assert len({r.webhook_id for r in received}) == 4
    final = received[-1].event["data"]
    assert final["status"] == "succeeded" and len(final["images"]) == 3
    assert all(image["url"] for image in final["images"])
    assert received[0].query == "client=7"


async def test_a_task_failing_with_a_bug_posts_task_failed(
    webhook_settings: WebhookSettings, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A runner that fails with something other than SIA's own errors (a bug) fails the
    task INTERNAL, and its webhook hears task.failed with that error, not nothing."""
    settings = webhook_settings()
    async with App(settings) as app:

        async def broken(*_: object, **__: object) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(app.service, "call_provider", broken)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            stub = grpc_pb.ImageServiceStub(channel)
            request = pb.GenerateImageRequest(
                prompt="x", size="2K", webhook_url=receiver.url + "/hook"
            )
            task = await stub.GenerateImageAsync(request, timeout=10)
            [received] = await receiver.wait_for(1, timeout=20)
    assert received.event["type"] == "task.failed"
    assert received.event["data"]["task_id"] == task.task_id
    assert received.event["data"]["error"] == {"code": "INTERNAL", "message": "internal error"}


async def test_an_abandoned_task_posts_task_failed(
    webhook_settings: WebhookSettings, receiver: Receiver
) -> None:
    """A task interrupted TASK_MAX_ATTEMPTS times (here once: a shutdown with no grace
    while it runs) fails ABANDONED without a run, and its webhook still hears task.failed
    (delivered by the next start when the first could not)."""
    settings = webhook_settings(offline_latency=5.0, task_max_attempts=1, shutdown_grace=0)
    async with _stub(settings) as stub:
        request = pb.GenerateImageRequest(prompt="x", size="2K", webhook_url=receiver.url)
        task = await stub.GenerateImageAsync(request, timeout=10)
        while (await stub.GetImageTask(pb.GetImageTaskRequest(task_id=task.task_id))).status != (
            pb.TASK_STATUS_RUNNING
        ):
            await asyncio.sleep(0.02)
    async with _stub(settings):
        [received] = await receiver.wait_for(1, timeout=20)
    assert received.event["type"] == "task.failed"
    assert received.event["data"]["task_id"] == task.task_id
    assert received.event["data"]["error"]["code"] == "ABANDONED"


async def test_a_webhook_url_is_checked_at_submit(
    webhook_settings: WebhookSettings, make_settings: MakeSettings
) -> None:
    """A private address is INVALID_ARGUMENT naming webhook_url unless allowed; without a
    WEBHOOK_SECRET any webhook is FAILED_PRECONDITION."""
    cases = (
        (webhook_settings(webhook_allow_private=False), "http://169.254.169.254/latest"),
        (webhook_settings(webhook_allow_private=False), "http://127.0.0.1:9/hook"),
        (webhook_settings(), "ftp://example.com/hook"),
    )
    for settings, url in cases:
        async with _stub(settings) as stub:
            request = pb.GenerateImageRequest(prompt="x", size="2K", webhook_url=url)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.GenerateImageAsync(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, url
        assert "webhook_url" in (refused.value.details() or "")
    async with _stub(make_settings()) as stub:
        request = pb.GenerateImageRequest(
            prompt="x", size="2K", webhook_url="https://example.com/hook"
        )
        with pytest.raises(grpc.aio.AioRpcError) as off:
            await stub.GenerateImageAsync(request, timeout=10)
    assert off.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "WEBHOOK_SECRET" in (off.value.details() or "")
