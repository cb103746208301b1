"""End-to-end tests of every ImageService RPC through a real gRPC channel."""

from __future__ import annotations

import asyncio
import io

import aiohttp
import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from sia.api.image.v1 import image_service_pb2 as pb
from sia.api.image.v1 import image_service_pb2_grpc as pb_grpc
from sia.app import App
from sia.config import Settings
from sia.models import ARK_MODELS
from tests.helpers import TEST_SIZE, MakeSettings
from tests.waiting import until

Stub = pb_grpc.ImageServiceStub


def details_of(err: grpc.aio.AioRpcError) -> dict[str, object]:
    """The rich error details in the status trailer, by type name."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "no grpc-status-details-bin trailer"
    found: dict[str, object] = {}
    for any_msg in status.details:
        for cls in (
            error_details_pb2.BadRequest,
            error_details_pb2.ErrorInfo,
            error_details_pb2.RetryInfo,
        ):
            if any_msg.Is(cls.DESCRIPTOR):
                msg = cls()
                any_msg.Unpack(msg)
                found[cls.__name__] = msg
    return found


async def download(url: str) -> bytes:
    """GET a URL over real HTTP."""
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        assert resp.content_type.startswith("image/")
        return await resp.read()


async def wait_for_status(
    stub: Stub, task_id: str, *wanted: int, timeout: float = 20
) -> pb.GetImageTaskResponse:
    """Poll GetImageTask until the task reaches one of `wanted`."""
    async with asyncio.timeout(timeout):
        while True:
            task = await stub.GetImageTask(pb.GetImageTaskRequest(task_id=task_id))
            if task.status in wanted:
                return task
            await asyncio.sleep(0.05)


async def test_generate_image_url_downloads(stub: Stub) -> None:
    """GenerateImage returns a URL on the HTTP port that serves a JPEG of the asked size."""
    resp = await stub.GenerateImage(
        pb.GenerateImageRequest(prompt="一只可爱的小猫在花园里玩耍", watermark=True), timeout=30
    )
    assert len(resp.images) == 1
    image = resp.images[0]
    assert image.url.startswith("http://localhost:")
    assert (image.size, image.content_type, image.data) == (TEST_SIZE, "image/jpeg", b"")
    assert resp.model == "doubao-seedream-4-0-250828"
    assert resp.usage.generated_images == 1
    assert resp.usage.output_tokens == 1280 * 720 // 256
    assert resp.created_at.seconds > 0
    with Image.open(io.BytesIO(await download(image.url))) as img:
        assert (img.format, f"{img.width}x{img.height}") == ("JPEG", TEST_SIZE)


async def test_generate_image_b64_returns_bytes(stub: Stub) -> None:
    """B64_JSON returns the image file's bytes inline and no URL."""
    resp = await stub.GenerateImage(
        pb.GenerateImageRequest(
            prompt="a red fox", size="1600x600", seed=7, response_format=pb.RESPONSE_FORMAT_B64_JSON
        ),
        timeout=30,
    )
    image = resp.images[0]
    assert image.url == ""
    with Image.open(io.BytesIO(image.data)) as img:
        assert img.size == (1600, 600)


async def test_generate_sequential_images(stub: Stub) -> None:
    """GenerateSequentialImages returns max_images distinct images in order."""
    resp = await stub.GenerateSequentialImages(
        pb.GenerateSequentialImagesRequest(
            prompt="a comic strip", max_images=3, response_format=pb.RESPONSE_FORMAT_B64_JSON
        ),
        timeout=30,
    )
    assert [i.index for i in resp.images] == [0, 1, 2]
    assert len({i.data for i in resp.images}) == 3
    assert resp.usage.generated_images == 3


async def test_async_task_lifecycle(stub: Stub) -> None:
    """GenerateImageAsync answers a task id at once; GetImageTask then shows the result."""
    submitted = await stub.GenerateImageAsync(pb.GenerateImageRequest(prompt="a lighthouse"))
    assert submitted.task_id.startswith("task_")
    assert submitted.status in (pb.TASK_STATUS_QUEUED, pb.TASK_STATUS_RUNNING)
    task = await wait_for_status(
        stub, submitted.task_id, pb.TASK_STATUS_SUCCEEDED, pb.TASK_STATUS_FAILED
    )
    assert task.status == pb.TASK_STATUS_SUCCEEDED, task.error
    assert task.HasField("finished_at") and task.HasField("updated_at")
    assert task.created_at == submitted.created_at
    with Image.open(io.BytesIO(await download(task.result.images[0].url))) as img:
        assert f"{img.width}x{img.height}" == TEST_SIZE


async def test_async_task_b64_result(stub: Stub) -> None:
    """A B64_JSON task returns its image bytes from GetImageTask."""
    submitted = await stub.GenerateImageAsync(
        pb.GenerateImageRequest(prompt="a lighthouse", response_format=pb.RESPONSE_FORMAT_B64_JSON)
    )
    task = await wait_for_status(stub, submitted.task_id, pb.TASK_STATUS_SUCCEEDED)
    assert task.result.images[0].url == ""
    with Image.open(io.BytesIO(task.result.images[0].data)) as img:
        assert img.format == "JPEG"


async def test_request_id_makes_submit_idempotent(stub: Stub) -> None:
    """A repeated submit with the same request_id returns the same task."""
    request = pb.GenerateImageRequest(prompt="a boat", request_id="order-42")
    first, second = await asyncio.gather(
        stub.GenerateImageAsync(request), stub.GenerateImageAsync(request)
    )
    assert first.task_id == second.task_id
    task = await wait_for_status(stub, first.task_id, pb.TASK_STATUS_SUCCEEDED)
    assert task.request_id == "order-42"
    again = await stub.GenerateImageAsync(request)
    assert again.task_id == first.task_id
    assert again.status == pb.TASK_STATUS_SUCCEEDED


@pytest.fixture
async def slow_stub(make_settings: MakeSettings) -> asyncio.AsyncIterator[Stub]:  # type: ignore[name-defined]
    """A stub on an app with one worker, a 2-task queue and a 1.5 s upstream."""
    settings = make_settings(
        task_workers=1, task_queue_limit=2, offline_latency=1.5, shutdown_grace=0
    )
    async with (
        App(settings) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as chan,
    ):
        yield pb_grpc.ImageServiceStub(chan)


async def test_cancel_queued_and_running_tasks(slow_stub: Stub) -> None:
    """CancelImageTask cancels a running and a queued task; both stay CANCELLED."""
    running = await slow_stub.GenerateImageAsync(pb.GenerateImageRequest(prompt="one"))
    queued = await slow_stub.GenerateImageAsync(pb.GenerateImageRequest(prompt="two"))
    await wait_for_status(slow_stub, running.task_id, pb.TASK_STATUS_RUNNING)
    for task_id in (queued.task_id, running.task_id):
        resp = await slow_stub.CancelImageTask(pb.CancelImageTaskRequest(task_id=task_id))
        assert (resp.task_id, resp.status) == (task_id, pb.TASK_STATUS_CANCELLED)
    await asyncio.sleep(0.2)
    for task_id in (queued.task_id, running.task_id):
        task = await slow_stub.GetImageTask(pb.GetImageTaskRequest(task_id=task_id))
        assert task.status == pb.TASK_STATUS_CANCELLED
        assert task.HasField("finished_at")


async def test_queue_full_is_resource_exhausted(slow_stub: Stub) -> None:
    """Submitting past TASK_QUEUE_LIMIT answers RESOURCE_EXHAUSTED with RetryInfo."""
    for prompt in ("one", "two"):
        await slow_stub.GenerateImageAsync(pb.GenerateImageRequest(prompt=prompt))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await slow_stub.GenerateImageAsync(pb.GenerateImageRequest(prompt="three"))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in (info.value.details() or "")
    details = details_of(info.value)
    assert details["ErrorInfo"].reason == "QUEUE_FULL"  # type: ignore[attr-defined]
    assert "RetryInfo" in details


async def test_cancel_finished_task_is_failed_precondition(stub: Stub) -> None:
    """Cancelling a finished task answers FAILED_PRECONDITION."""
    submitted = await stub.GenerateImageAsync(pb.GenerateImageRequest(prompt="x"))
    await wait_for_status(stub, submitted.task_id, pb.TASK_STATUS_SUCCEEDED)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CancelImageTask(pb.CancelImageTaskRequest(task_id=submitted.task_id))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "has finished (succeeded)" in (info.value.details() or "")


@pytest.mark.parametrize("rpc", ["GetImageTask", "CancelImageTask"])
async def test_unknown_task_is_not_found(stub: Stub, rpc: str) -> None:
    """An unknown task id answers NOT_FOUND naming the id."""
    request = (
        pb.GetImageTaskRequest(task_id="task_nope")
        if rpc == "GetImageTask"
        else pb.CancelImageTaskRequest(task_id="task_nope")
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await getattr(stub, rpc)(request)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "task_nope" in (info.value.details() or "")


async def test_empty_task_id_is_invalid(stub: Stub) -> None:
    """An empty task id answers INVALID_ARGUMENT naming task_id."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetImageTask(pb.GetImageTaskRequest())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "task_id: must not be empty"


BAD_REQUESTS = [
    ("GenerateImage", pb.GenerateImageRequest(prompt=""), "prompt"),
    ("GenerateImage", pb.GenerateImageRequest(prompt="x" * 4001), "prompt"),
    ("GenerateImage", pb.GenerateImageRequest(prompt="x", size="800x800"), "size"),
    ("GenerateImage", pb.GenerateImageRequest(prompt="x", size="huge"), "size"),
    ("GenerateImage", pb.GenerateImageRequest(prompt="x", model="nope"), "model"),
    ("GenerateImage", pb.GenerateImageRequest(prompt="x", images=["ftp://a/b.png"]), "images[0]"),
    (
        "GenerateImage",
        pb.GenerateImageRequest(prompt="x", images=["data:image/png;base64,!!"]),
        "images[0]",
    ),
    (
        "GenerateImage",
        pb.GenerateImageRequest(prompt="x", images=["data:image/svg;base64,aGk="]),
        "images[0]",
    ),
    (
        "GenerateImage",
        pb.GenerateImageRequest(prompt="x", images=["https://e.com/a.png"] * 15),
        "images",
    ),
    ("GenerateImage", pb.GenerateImageRequest(prompt="x", response_format=9), "response_format"),  # type: ignore[arg-type]
    ("GenerateImageAsync", pb.GenerateImageRequest(prompt="x", seed=-5), "seed"),
    (
        "GenerateImageAsync",
        pb.GenerateImageRequest(prompt="x", guidance_scale=0.5),
        "guidance_scale",
    ),
    (
        "GenerateSequentialImages",
        pb.GenerateSequentialImagesRequest(prompt="x", max_images=16),
        "max_images",
    ),
    (
        "GenerateSequentialImages",
        pb.GenerateSequentialImagesRequest(prompt="x", max_images=0),
        "max_images",
    ),
    (
        "GenerateSequentialImages",
        pb.GenerateSequentialImagesRequest(
            prompt="x", max_images=10, images=["https://e.com/a.png"] * 6
        ),
        "max_images",
    ),
]


@pytest.mark.parametrize(("rpc", "request_msg", "field"), BAD_REQUESTS)
async def test_bad_input_is_invalid_argument(
    stub: Stub, rpc: str, request_msg: object, field: str
) -> None:
    """Each bad field answers INVALID_ARGUMENT naming it, with BadRequest details."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await getattr(stub, rpc)(request_msg, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith(f"{field}: ")
    bad_request = details_of(info.value)["BadRequest"]
    assert [v.field for v in bad_request.field_violations] == [field]  # type: ignore[attr-defined]
    # the server is still up and answering
    health = await stub.HealthCheck(pb.HealthCheckRequest())
    assert health.status == pb.SERVING_STATUS_SERVING


async def test_health_check_rpc(stub: Stub, settings: Settings) -> None:
    """HealthCheck reports serving, the service name, version and provider."""
    resp = await stub.HealthCheck(pb.HealthCheckRequest())
    assert resp.status == pb.SERVING_STATUS_SERVING
    assert (resp.service, resp.version, resp.provider) == (settings.app_name, "1.0.0", "offline")
    assert resp.timestamp.seconds > 0


async def test_internal_errors_hide_the_trace(make_settings: MakeSettings) -> None:
    """A bug in a provider answers INTERNAL with no stack trace, and the server stays up."""

    class Broken:
        name = "broken"

        models = ARK_MODELS

        async def generate(
            self, request: object, *, timeout: float, on_image: object = None
        ) -> object:
            raise ZeroDivisionError("secret internals")

        async def aclose(self) -> None:
            return None

    async with (
        App(make_settings(), provider=Broken()) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as chan,
    ):
        stub = pb_grpc.ImageServiceStub(chan)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GenerateImage(pb.GenerateImageRequest(prompt="x"))
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "secret internals" not in (info.value.details() or "")
        assert "Traceback" not in (info.value.details() or "")
        assert (await stub.HealthCheck(pb.HealthCheckRequest())).status == pb.SERVING_STATUS_SERVING


async def test_shutting_down_is_unavailable(app: App, stub: Stub) -> None:
    """Once shutdown begins, new ImageService calls answer UNAVAILABLE."""
    app.readiness.begin_shutdown()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GenerateImage(pb.GenerateImageRequest(prompt="x"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in (info.value.details() or "")


async def test_deadline_exceeded(make_settings: MakeSettings) -> None:
    """A client deadline shorter than the generation answers DEADLINE_EXCEEDED, and the
    server stops the call there rather than generating on for nobody."""
    async with (
        App(make_settings(offline_latency=30)) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as chan,
    ):
        stub = pb_grpc.ImageServiceStub(chan)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GenerateImage(pb.GenerateImageRequest(prompt="x"), timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        in_flight = app.metrics.rpc_in_flight.labels("image.v1.ImageService", "GenerateImage")
        await until(lambda: in_flight.value == 0, "the server still runs the expired call")


async def test_image_timeout_is_deadline_exceeded(make_settings: MakeSettings) -> None:
    """A generation longer than IMAGE_TIMEOUT answers DEADLINE_EXCEEDED from the server."""
    async with (
        App(make_settings(offline_latency=5, image_timeout=0.3)) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as chan,
    ):
        stub = pb_grpc.ImageServiceStub(chan)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GenerateImage(pb.GenerateImageRequest(prompt="x"), timeout=10)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "did not finish within 0.3 s" in (info.value.details() or "")


@pytest.mark.parametrize("rpc", ["GetImageTask", "CancelImageTask"])
@pytest.mark.parametrize(("length", "code"), [(64, "NOT_FOUND"), (65, "INVALID_ARGUMENT")])
async def test_task_id_length_limit(stub: Stub, rpc: str, length: int, code: str) -> None:
    """A task id up to 64 characters is looked up; a longer one is INVALID_ARGUMENT."""
    request_type = pb.GetImageTaskRequest if rpc == "GetImageTask" else pb.CancelImageTaskRequest
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await getattr(stub, rpc)(request_type(task_id="t" * length), timeout=10)
    assert info.value.code() == getattr(grpc.StatusCode, code)
    if code == "INVALID_ARGUMENT":
        bad_request = details_of(info.value)["BadRequest"]
        assert [v.field for v in bad_request.field_violations] == ["task_id"]  # type: ignore[attr-defined]


SURPRISING = [
    *(("size", pb.GenerateImageRequest(prompt="x", size=s)) for s in ("²x²", "1024x1024²")),
    # Full-width digits: 1024x1024.
    (
        "size",
        pb.GenerateImageRequest(
            prompt="x", size="\uff11\uff10\uff12\uff14x\uff11\uff10\uff12\uff14"
        ),
    ),
    *(
        ("images[0]", pb.GenerateImageRequest(prompt="x", images=[u]))
        for u in ("http://[", "http://[::1", "http://℀/")
    ),
]


@pytest.mark.parametrize("rpc", ["GenerateImage", "GenerateImageAsync", "GenerateSequentialImages"])
@pytest.mark.parametrize(("field", "generate"), SURPRISING)
async def test_surprising_input_is_invalid_argument(
    stub: Stub, rpc: str, field: str, generate: pb.GenerateImageRequest
) -> None:
    """Inputs that once escaped validation as INTERNAL answer INVALID_ARGUMENT naming the field."""
    request: object = generate
    if rpc == "GenerateSequentialImages":
        request = pb.GenerateSequentialImagesRequest(
            prompt=generate.prompt, size=generate.size, images=generate.images
        )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await getattr(stub, rpc)(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    bad_request = details_of(info.value)["BadRequest"]
    assert [v.field for v in bad_request.field_violations] == [field]  # type: ignore[attr-defined]
