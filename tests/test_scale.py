"""Several replicas on one Redis: shared tasks, and a replica killed mid-task.

These start real `sia serve` processes against the real Redis on loopback and
the fake Ark in this test's process. With CI=true an unreachable Redis fails
them instead of skipping them.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from sia.api.image.v1 import image_service_pb2 as pb
from sia.testing.fake_ark import FakeArk
from tests.process import client, serve, server_env
from tests.tasks.backend_helpers import REDIS_URL, delete_queue_keys, require_redis

KEY = "scale-test-key"

pytestmark = pytest.mark.slow


@pytest.fixture
async def queue() -> AsyncIterator[str]:
    """A Redis queue name of this test's own, deleted afterwards."""
    await require_redis()
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    await delete_queue_keys(name)


def replica_env(tmp_path: Path, fake: FakeArk, queue: str) -> dict[str, str]:
    """Settings of one replica: Redis tasks, the fake Ark, a fast heartbeat."""
    return server_env(
        tmp_path / "data",
        TASK_BACKEND="redis",
        REDIS_URL=REDIS_URL,
        REDIS_QUEUE=queue,
        TASK_HEARTBEAT="2",
        IMAGE_API_KEY=KEY,
        IMAGE_BASE_URL=fake.base_url,
        SHUTDOWN_GRACE="2",
    )


async def wait_for(
    stub: object, task_id: str, status: int, timeout: float
) -> pb.GetImageTaskResponse:
    """Poll GetImageTask on `stub` until the task reaches `status`."""
    async with asyncio.timeout(timeout):
        while True:
            task = await stub.GetImageTask(pb.GetImageTaskRequest(task_id=task_id))  # type: ignore[attr-defined]
            if task.status == status:
                return task
            await asyncio.sleep(0.1)


async def test_replicas_answer_for_each_others_tasks(tmp_path: Path, queue: str) -> None:
    """A task submitted to one replica is visible, cancellable and idempotent on the other."""
    async with FakeArk(api_key=KEY, latency=0.3) as fake:
        env = replica_env(tmp_path, fake, queue)
        async with serve(env, tmp_path) as a, serve(env, tmp_path) as b:
            async with client(a) as stub_a, client(b) as stub_b:
                submitted = await stub_a.GenerateImageAsync(
                    pb.GenerateImageRequest(prompt="shared", request_id="order-7")
                )
                again = await stub_b.GenerateImageAsync(
                    pb.GenerateImageRequest(prompt="shared", request_id="order-7")
                )
                assert again.task_id == submitted.task_id
                done = await wait_for(stub_b, submitted.task_id, pb.TASK_STATUS_SUCCEEDED, 20)
                assert done.result.images[0].url
                fake.latency = 30
                slow = await stub_b.GenerateImageAsync(pb.GenerateImageRequest(prompt="slow"))
                await wait_for(stub_a, slow.task_id, pb.TASK_STATUS_RUNNING, 10)
                cancelled = await stub_a.CancelImageTask(
                    pb.CancelImageTaskRequest(task_id=slow.task_id)
                )
                assert cancelled.status == pb.TASK_STATUS_CANCELLED
                await wait_for(stub_b, slow.task_id, pb.TASK_STATUS_CANCELLED, 5)
            for server in (a, b):
                server.proc.send_signal(signal.SIGTERM)
                assert await server.exit_code() == 0


async def test_killed_replica_task_completes_elsewhere(tmp_path: Path, queue: str) -> None:
    """SIGKILL on the replica running a task: another replica finishes it, at most one rerun."""
    # The first attempt outlasts replica B's start-up for sure; the rerun is quick.
    async with FakeArk(api_key=KEY, latency=60) as fake:
        env = replica_env(tmp_path, fake, queue)
        async with serve(env, tmp_path) as a, client(a) as stub_a:
            submitted = await stub_a.GenerateImageAsync(pb.GenerateImageRequest(prompt="survive"))
            task_id = submitted.task_id
            async with asyncio.timeout(10):
                while not any(r.client_request_id == task_id for r in fake.requests):
                    await asyncio.sleep(0.05)
            async with serve(env, tmp_path) as b, client(b) as stub_b:
                a.proc.kill()  # SIGKILL: no shutdown, no requeue, the heartbeat just stops
                await a.proc.wait()
                fake.latency = 0.3
                done = await wait_for(stub_b, task_id, pb.TASK_STATUS_SUCCEEDED, 45)
                image = done.result.images[0]
                assert image.url.startswith(f"http://localhost:{b.http_port}/images/")
                async with aiohttp.ClientSession() as http, http.get(image.url) as download:
                    assert download.status == 200
                    assert (await download.read())[:2] == b"\xff\xd8"
                assert done.result.usage.generated_images == 1
                attempts = [r for r in fake.requests if r.client_request_id == task_id]
                assert 1 < len(attempts) <= 2, [r.outcome for r in attempts]
                b.proc.send_signal(signal.SIGTERM)
                assert await b.exit_code() == 0
