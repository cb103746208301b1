"""Results as they happen, over real gRPC: streamed groups, async groups and watches."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
import pytest

from sia.api.image.v1 import image_service_pb2 as pb
from sia.api.image.v1 import image_service_pb2_grpc as grpc_pb
from sia.app import App
from sia.rpc import convert
from sia.testing.fake_ark import FakeArk
from tests.tasks.backend_helpers import REDIS_URL, delete_queue_keys, require_redis
from tests.waiting import until, within

if TYPE_CHECKING:
    from tests.helpers import MakeSettings

KEY = "ark-key"
GAP = 0.6  # seconds between the fake's images


def _group(prompt: str = "a comic strip", images: int = 3, **fields: Any) -> Any:
    return pb.GenerateSequentialImagesRequest(prompt=prompt, size="2K", max_images=images, **fields)


@pytest.fixture
async def fake() -> AsyncIterator[FakeArk]:
    """A fake Ark that sends a group's images GAP seconds apart."""
    async with FakeArk(api_key=KEY, image_latency=GAP) as server:
        yield server


@pytest.fixture
async def ark_app(make_settings: MakeSettings, fake: FakeArk) -> AsyncIterator[App]:
    settings = make_settings(image_provider="ark", image_api_key=KEY, image_base_url=fake.base_url)
    async with App(settings) as app:
        yield app


@pytest.fixture
async def ark_stub(ark_app: App) -> AsyncIterator[grpc_pb.ImageServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ark_app.grpc_port}") as channel:
        yield grpc_pb.ImageServiceStub(channel)


async def test_each_image_reaches_the_client_as_the_fake_sends_it(
    fake: FakeArk, ark_stub: grpc_pb.ImageServiceStub
) -> None:
    """Images arrive in order with their index, each within 100 ms of the fake writing
    its frame; the last message carries the usage and the model."""
    arrived: list[float] = []
    messages = []
    async for message in ark_stub.StreamSequentialImages(_group(), timeout=30):
        arrived.append(time.monotonic())
        messages.append(message)
    *images, completed = messages
    assert [m.image.index for m in images] == [0, 1, 2]
    assert all(m.image.url for m in images)
    assert completed.WhichOneof("event") == "completed"
    assert completed.completed.usage.generated_images == 3
    assert completed.completed.model == "doubao-seedream-4-0-250828"
    [record] = fake.requests
    delays = [got - sent for got, sent in zip(arrived, record.frames_sent, strict=False)]
    print("stream delays (ms):", [round(d * 1000, 1) for d in delays])
    assert len(delays) == 3
    assert all(0 <= d < 0.1 for d in delays)
    assert arrived[0] < arrived[-1] - GAP  # not held back for the whole group


async def test_a_moderated_image_is_a_per_image_error_and_the_rest_arrive(
    ark_stub: grpc_pb.ImageServiceStub,
) -> None:
    messages = [m async for m in ark_stub.StreamSequentialImages(_group("a strip [moderate:1]"))]
    images = [m.image for m in messages if m.WhichOneof("event") == "image"]
    assert [i.index for i in images] == [0, 1, 2]
    assert images[1].error.code == "OutputImageSensitiveContentDetected"
    assert images[0].url and images[2].url and not images[1].url


async def test_cancelling_the_stream_closes_the_upstream_connection(
    fake: FakeArk, ark_stub: grpc_pb.ImageServiceStub
) -> None:
    call = ark_stub.StreamSequentialImages(_group(images=4), timeout=30)
    first = await within(call.read(), "no first image")
    assert first.image.index == 0
    call.cancel()
    await until(
        lambda: bool(fake.requests) and fake.requests[0].outcome == "client_disconnected",
        "the upstream stream stayed open",
        timeout=2,
    )


async def test_a_stream_obeys_the_deadline_and_validation(
    fake: FakeArk, ark_stub: grpc_pb.ImageServiceStub
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as late:
        async for _ in ark_stub.StreamSequentialImages(_group(images=4), timeout=GAP * 1.5):
            pass
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        async for _ in ark_stub.StreamSequentialImages(_group(images=99)):
            pass
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_images" in (bad.value.details() or "")


async def _watch(stub: grpc_pb.ImageServiceStub, task_id: str) -> list[Any]:
    request = pb.WatchImageTaskRequest(task_id=task_id)
    return [m async for m in stub.WatchImageTask(request, timeout=30)]


def _story(states: list[Any]) -> list[tuple[str, int]]:
    return [(pb.TaskStatus.Name(s.status), len(s.result.images)) for s in states]


async def test_an_async_group_is_watched_image_by_image(
    ark_stub: grpc_pb.ImageServiceStub,
) -> None:
    """The watch shows the task now, each image while it runs, the end; a watch after the
    end gets the final state only; GetImageTask shows the images so far while it runs."""
    task = await ark_stub.GenerateSequentialImagesAsync(_group(request_id="g-1"))
    watching = asyncio.ensure_future(_watch(ark_stub, task.task_id))
    await asyncio.sleep(GAP * 1.6)
    running = await ark_stub.GetImageTask(pb.GetImageTaskRequest(task_id=task.task_id))
    assert running.status == pb.TASK_STATUS_RUNNING
    assert 1 <= len(running.result.images) < 3
    states = await within(watching, "the watch did not end")
    story = _story(states)
    assert story[-1] == ("TASK_STATUS_SUCCEEDED", 3)
    seen = [count for status, count in story if status == "TASK_STATUS_RUNNING"]
    assert seen[-2:] == [1, 2] or seen[-3:] == [1, 2, 3]
    assert _story(await _watch(ark_stub, task.task_id)) == [("TASK_STATUS_SUCCEEDED", 3)]
    again = await ark_stub.GenerateSequentialImagesAsync(_group(request_id="g-1"))
    assert again.task_id == task.task_id


async def _drain(call: Any) -> None:
    while await call.read() is not grpc.aio.EOF:
        pass


async def test_a_watch_is_told_when_the_server_shuts_down(
    make_settings: MakeSettings, fake: FakeArk
) -> None:
    settings = make_settings(image_provider="ark", image_api_key=KEY, image_base_url=fake.base_url)
    app = App(settings)
    await app.__aenter__()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            stub = grpc_pb.ImageServiceStub(channel)
            task = await stub.GenerateSequentialImagesAsync(_group(images=4))
            call = stub.WatchImageTask(pb.WatchImageTaskRequest(task_id=task.task_id))
            await within(call.read(), "no first state")
            shutdown = asyncio.ensure_future(app.shutdown())
            with pytest.raises(grpc.aio.AioRpcError) as told:
                await within(_drain(call), "the watch was not ended")
            assert told.value.code() == grpc.StatusCode.UNAVAILABLE
            await shutdown
    finally:
        await app.shutdown()


async def test_a_watch_on_another_replica_follows_the_task(
    make_settings: MakeSettings, fake: FakeArk
) -> None:
    """Replica A runs a group; a watch on replica B (shared Redis) shows every image."""
    await require_redis()
    queue = f"watch-{uuid.uuid4().hex[:8]}"
    shared = {
        "image_provider": "ark",
        "image_api_key": KEY,
        "image_base_url": fake.base_url,
        "task_backend": "redis",
        "redis_url": REDIS_URL,
        "redis_queue": queue,
    }
    try:
        async with AsyncExitStack() as stack:
            a = await stack.enter_async_context(
                App(make_settings(**shared, data_dir=make_settings().data_dir / "a"))
            )
            channel_a = grpc.aio.insecure_channel(f"127.0.0.1:{a.grpc_port}")
            await stack.enter_async_context(channel_a)
            stub_a = grpc_pb.ImageServiceStub(channel_a)
            task = await stub_a.GenerateSequentialImagesAsync(_group())
            await until(lambda: bool(fake.requests), "replica A did not start the task")
            b = await stack.enter_async_context(
                App(make_settings(**shared, data_dir=make_settings().data_dir / "b"))
            )
            channel_b = grpc.aio.insecure_channel(f"127.0.0.1:{b.grpc_port}")
            await stack.enter_async_context(channel_b)
            states = await _watch(grpc_pb.ImageServiceStub(channel_b), task.task_id)
    finally:
        await delete_queue_keys(queue)
    story = _story(states)
    assert story[-1] == ("TASK_STATUS_SUCCEEDED", 3)
    counts = [count for status, count in story if status == "TASK_STATUS_RUNNING"]
    assert counts == sorted(counts) and 2 in counts


async def test_a_cancelled_watch_leaves_nothing_behind(
    make_settings: MakeSettings, fake: FakeArk
) -> None:
    """Watches a client cancels release their subscription and leave no waiting task."""
    settings = make_settings(image_provider="ark", image_api_key=KEY, image_base_url=fake.base_url)
    async with App(settings) as app:
        task = await app.service.submit(
            convert.sequential_request(_group(images=4), app.service.defaults)
        )

        async def follow() -> None:
            async for _ in app.service.watch(task.id):
                pass

        watchers = [asyncio.ensure_future(follow()) for _ in range(50)]
        await asyncio.sleep(0.2)
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        await asyncio.sleep(0)
        left = [t for t in asyncio.all_tasks() if "changed" in repr(t.get_coro())]
        assert left == []
        await app.service.cancel_task(task.id)


async def test_webhook_fields_on_a_call_that_answers_at_once_are_refused(
    ark_stub: grpc_pb.ImageServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await ark_stub.GenerateImage(
            pb.GenerateImageRequest(prompt="x", size="2K", webhook_url="https://example.com/h")
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "webhook_url" in (refused.value.details() or "")
