"""Tests of the whole process: `sia serve` started as a subprocess, signals, logs, restarts;
and the App's shutdown promise to a running task, on each task backend."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sia.api.image.v1 import image_service_pb2 as pb
from sia.api.image.v1 import image_service_pb2_grpc as pb_grpc
from sia.app import App
from sia.config import Settings
from sia.domain import GenerationRequest, GenerationResult, OnImage, Task, TaskStatus
from sia.providers.offline import OfflineProvider
from tests.helpers import TEST_SIZE, MakeSettings
from tests.process import client, serve, server_env
from tests.storage.faults import full_disk, part_files, unwritable
from tests.tasks.backend_helpers import REDIS_URL, delete_queue_keys, require_redis
from tests.waiting import within

SECRET = "sk-never-log-this-4242"


@pytest.mark.slow
async def test_sigterm_drains_and_tasks_survive_restart(tmp_path: Path) -> None:
    """SIGTERM lets an in-flight RPC finish, exits 0, and a queued task runs after restart."""
    env = server_env(
        tmp_path / "data", TASK_WORKERS="1", OFFLINE_LATENCY="1.5", SHUTDOWN_GRACE="10"
    )
    async with serve(env, tmp_path) as server, client(server) as stub:
        running = await stub.GenerateImageAsync(pb.GenerateImageRequest(prompt="first"))
        queued = await stub.GenerateImageAsync(pb.GenerateImageRequest(prompt="second"))
        in_flight = asyncio.ensure_future(
            stub.GenerateImage(pb.GenerateImageRequest(prompt="in flight"), timeout=30)
        )
        await asyncio.sleep(0.5)
        server.proc.send_signal(signal.SIGTERM)
        response = await in_flight
        assert response.images[0].url
        assert await server.exit_code() == 0
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.HealthCheck(pb.HealthCheckRequest(), timeout=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    events = [json.loads(line)["event"] for line in server.lines]
    assert "shutdown_signal" in events
    assert events[-1] == "shutdown_complete"

    async with serve(env, tmp_path) as server, client(server) as stub:
        for task_id in (running.task_id, queued.task_id):
            async with asyncio.timeout(15):
                while True:
                    task = await stub.GetImageTask(pb.GetImageTaskRequest(task_id=task_id))
                    if task.status == pb.TASK_STATUS_SUCCEEDED:
                        break
                    assert task.status in (pb.TASK_STATUS_QUEUED, pb.TASK_STATUS_RUNNING)
                    await asyncio.sleep(0.1)
        server.proc.send_signal(signal.SIGINT)
        assert await server.exit_code() == 0


class GatedProvider(OfflineProvider):
    """The offline provider, but each generation first waits for `release`."""

    def __init__(self) -> None:
        super().__init__()
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.calls = 0
        self.cancelled = 0

    async def generate(
        self, request: GenerationRequest, *, timeout: float, on_image: OnImage | None = None
    ) -> GenerationResult:
        self.calls += 1
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return await super().generate(request, timeout=timeout)


@pytest.fixture(params=["sqlite", "redis"])
async def backend_settings(
    request: pytest.FixtureRequest, make_settings: MakeSettings
) -> AsyncIterator[Settings]:
    """Settings on each task backend, one worker; Redis on a queue of the test's own."""
    if request.param == "sqlite":
        yield make_settings(task_workers=1, shutdown_grace=30)
        return
    await require_redis()
    queue = f"test-{uuid.uuid4().hex[:10]}"
    yield make_settings(
        task_backend="redis", redis_url=REDIS_URL, redis_queue=queue, task_workers=1,
        shutdown_grace=30,
    )  # fmt: skip
    await delete_queue_keys(queue)


async def test_shutdown_lets_a_running_task_finish(backend_settings: Settings) -> None:
    """A task RUNNING when shutdown begins finishes within SHUTDOWN_GRACE: SUCCEEDED after one
    generation, not put back in the queue to be generated (and billed) again."""
    provider = GatedProvider()
    request = GenerationRequest(prompt="x", model=backend_settings.image_model, size=TEST_SIZE)
    async with App(backend_settings, provider=provider) as app:
        task = await app.service.submit(request)
        await within(provider.started.wait(), "the task never reached the provider")
        shutdown = asyncio.create_task(app.shutdown())
        done, _ = await asyncio.wait({shutdown}, timeout=0.5)
        provider.release.set()
        assert not done, "shutdown ended without waiting for the running task"
        await within(shutdown, "shutdown still waits after the running task finished")
    assert (provider.calls, provider.cancelled) == (1, 0)

    async with App(backend_settings, provider=provider) as app:
        stored = await app.tasks.get(task.id)
    assert stored.status is TaskStatus.SUCCEEDED, f"{stored.status} after shutdown"
    assert stored.attempts == 1
    assert provider.calls == 1


@pytest.mark.slow
async def test_logs_are_json_lines_without_secrets(tmp_path: Path) -> None:
    """Every stdout line is a JSON object; access lines carry request ids; the key never shows."""
    env = server_env(tmp_path / "data", IMAGE_PROVIDER="offline", IMAGE_API_KEY=SECRET)
    async with serve(env, tmp_path) as server, client(server) as stub:
        await stub.GenerateImage(
            pb.GenerateImageRequest(prompt="a cat"), metadata=(("x-request-id", "req-77"),)
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GenerateImage(pb.GenerateImageRequest(prompt=""))
        server.proc.send_signal(signal.SIGTERM)
        assert await server.exit_code() == 0
    output = "".join(server.lines)
    assert SECRET not in output
    records = [json.loads(line) for line in server.lines]
    for record in records:
        assert {"timestamp", "level", "event", "logger"} <= set(record), record
    access = [r for r in records if r["event"] == "rpc"]
    assert [(r["code"], r["method"]) for r in access] == [
        ("OK", "/image.v1.ImageService/GenerateImage"),
        ("INVALID_ARGUMENT", "/image.v1.ImageService/GenerateImage"),
    ]
    assert access[0]["request_id"] == "req-77"
    assert access[1]["request_id"]
    assert all(isinstance(r["duration_ms"], float) for r in access)


@pytest.mark.slow
async def test_offline_warning_once(tmp_path: Path) -> None:
    """Without a key the server starts on the offline provider and warns once."""
    async with serve(server_env(tmp_path / "data"), tmp_path) as server:
        server.proc.send_signal(signal.SIGTERM)
        assert await server.exit_code() == 0
    warnings = [json.loads(line) for line in server.lines if '"offline_provider"' in line]
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"


@pytest.mark.slow
async def test_fake_ark_command_serves_the_ark_path(tmp_path: Path) -> None:
    """`sia fake-ark`, then `sia serve` with its key and URL (docs/providers.md's demo)."""
    fake = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sia", "fake-ark", "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert fake.stdout is not None
    try:
        line = await asyncio.wait_for(fake.stdout.readline(), 20)
        base_url = json.loads(line)["base_url"]
        env = server_env(tmp_path / "data", IMAGE_API_KEY="fake-key", IMAGE_BASE_URL=base_url)
        async with serve(env, tmp_path) as server, client(server) as stub:
            resp = await stub.GenerateSequentialImages(
                pb.GenerateSequentialImagesRequest(prompt="seasons [moderate:1]", max_images=3),
                timeout=20,
            )
            assert [i.error.code for i in resp.images] == [
                "",
                "OutputImageSensitiveContentDetected",
                "",
            ]
            assert resp.images[0].url.startswith(base_url)
            health = await stub.HealthCheck(pb.HealthCheckRequest())
            assert health.provider == "ark"
            server.proc.send_signal(signal.SIGTERM)
            assert await server.exit_code() == 0
        fake.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(fake.wait(), 10) == 0
    finally:
        if fake.returncode is None:
            fake.kill()
            await fake.wait()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"GRPC_PORT": "http"}, "GRPC_PORT: Input should be a valid integer"),
        ({"APP_ENVIRONMENT": "production"}, "IMAGE_API_KEY: required when APP_ENVIRONMENT"),
        ({"IMAGE_DEFAULT_SIZE": "10x10"}, "IMAGE_DEFAULT_SIZE: 10x10 is 100 pixels"),
        ({"IMAGE_MODEL": "nope"}, "IMAGE_MODEL: 'nope' is not a model"),
    ],
)
async def test_bad_config_exits_nonzero_with_one_line(
    tmp_path: Path, extra: dict[str, str], message: str
) -> None:
    """A bad setting exits 2 with one stderr line naming the variable."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sia", "serve",
        env=server_env(tmp_path / "data", **extra), cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("sia: configuration error: ")
    assert message in lines[0]


class CountingProvider(OfflineProvider):
    """The offline provider, counting its (billed) generations."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def generate(
        self, request: GenerationRequest, *, timeout: float, on_image: OnImage | None = None
    ) -> GenerationResult:
        self.calls += 1
        return await super().generate(request, timeout=timeout)


async def _health(app: App) -> tuple[int, int]:
    """(/ready's HTTP status, gRPC health of image.v1.ImageService) right now."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{app.http_port}/ready") as ready,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
    ):
        check = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="image.v1.ImageService")
        )
        return ready.status, check.status


async def _health_becomes(app: App, expected: tuple[int, int], failure: str) -> None:
    """Wait until /ready and gRPC health both say `expected`; fail the test otherwise."""

    async def poll() -> None:
        while await _health(app) != expected:
            await asyncio.sleep(0.01)

    await within(poll(), failure)


SERVING = (200, health_pb2.HealthCheckResponse.SERVING)
NOT_SERVING = (503, health_pb2.HealthCheckResponse.NOT_SERVING)


@pytest.mark.parametrize("fault", ["unwritable", "full"])
async def test_image_store_fault_is_unavailable_and_takes_the_instance_out(
    make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """An unwritable or full images directory: sync URL calls answer UNAVAILABLE naming the
    store (not INTERNAL), /ready and gRPC health go out together and come back once it is
    writable again, and no `.part` file is left."""
    async with App(make_settings(), readiness_interval=0.01) as app:
        root = app.store.image_dir
        assert root is not None
        await _health_becomes(app, SERVING, "a healthy instance is not serving")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            stub = pb_grpc.ImageServiceStub(channel)
            with unwritable(root) if fault == "unwritable" else full_disk(monkeypatch):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.GenerateImage(pb.GenerateImageRequest(prompt="x"), timeout=30)
                await _health_becomes(app, NOT_SERVING, "a broken image store kept it serving")
                async with (
                    aiohttp.ClientSession() as http,
                    http.get(f"http://127.0.0.1:{app.http_port}/ready") as ready,
                ):
                    reasons = (await ready.json())["reasons"]
                assert "images" in reasons
            await _health_becomes(app, SERVING, "a mended image store did not bring it back")
            response = await stub.GenerateImage(pb.GenerateImageRequest(prompt="x"), timeout=30)
            assert response.images[0].url
        assert part_files(root) == []
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (caught.value.details() or "").startswith("the image store cannot write: ")
    assert str(root) not in (caught.value.details() or "")


@pytest.mark.parametrize("recovers", [True, False])
async def test_a_task_retries_its_store_never_its_generation(
    backend_settings: Settings, monkeypatch: pytest.MonkeyPatch, recovers: bool
) -> None:
    """A task whose images cannot be stored tries the store again, not the (billed)
    generation: SUCCEEDED once the disk has room, else FAILED with IMAGE_STORE_UNAVAILABLE."""
    monkeypatch.setattr("sia.images.STORE_RETRY_DELAYS", (0.0, 0.0))
    provider = CountingProvider()
    request = GenerationRequest(prompt="x", model=backend_settings.image_model, size=TEST_SIZE)
    async with App(backend_settings, provider=provider) as app:
        with full_disk(monkeypatch, image_writes=2 if recovers else None):
            task = await app.service.submit(request)

            async def finished() -> Task:
                while not (current := await app.tasks.get(task.id)).status.is_terminal:
                    await asyncio.sleep(0.01)
                return current

            done = await within(finished(), "the task never finished")
        assert provider.calls == 1
        if recovers:
            assert done.status is TaskStatus.SUCCEEDED, done.error
            assert done.result is not None and done.result.images[0].blob_key
        else:
            assert done.status is TaskStatus.FAILED
            assert done.error is not None
            assert done.error.code == "IMAGE_STORE_UNAVAILABLE"
            assert "No space left on device" in done.error.message
        root = app.store.image_dir
        assert root is not None and part_files(root) == []


async def test_a_task_store_that_stops_answering_takes_grpc_health_out(
    make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The task store's check feeds gRPC health as well as /ready, out and back."""
    async with App(make_settings(), readiness_interval=0.01) as app:
        await _health_becomes(app, SERVING, "a healthy instance is not serving")
        answering = False

        async def ready() -> bool:
            return answering

        monkeypatch.setattr(app.tasks, "ready", ready)
        app.readiness.add_check("tasks", app.tasks.ready, "task store is not answering")
        await _health_becomes(app, NOT_SERVING, "a silent task store kept gRPC health SERVING")
        answering = True
        await _health_becomes(app, SERVING, "the task store's recovery did not bring it back")
