"""Two `sia serve` replicas on one Redis (AOF) that is killed for 5 s under load.

Nothing accepted is lost, no task is generated more than twice, gRPC health
says NOT_SERVING during the outage, and work resumes within 10 s of Redis
coming back. Each replica's CPU during the outage is printed (a spinning
reconnect loop would take a whole core).
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections import Counter
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sia.api.image.v1 import image_service_pb2 as pb
from sia.testing.fake_ark import FakeArk
from tests.process import Server, client, serve, server_env
from tests.tasks.backend_helpers import own_redis
from tests.waiting import until, within

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

KEY = "outage-test-key"
TASKS = 20
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process `pid`, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def health(server: Server) -> int:
    """The gRPC health status of image.v1.ImageService on `server`."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="image.v1.ImageService")
        answer = await stub.Check(request, timeout=2)
        return int(answer.status)


async def test_redis_killed_for_5_s_under_load(tmp_path: Path) -> None:
    """0 tasks lost, each generated at most twice, NOT_SERVING meanwhile, resumed in 10 s."""
    async with (
        own_redis(tmp_path / "redis") as redis,
        FakeArk(api_key=KEY, latency=2) as fake,
    ):
        env = server_env(
            tmp_path / "data",
            TASK_BACKEND="redis",
            REDIS_URL=redis.url,
            REDIS_QUEUE=f"outage-{uuid.uuid4().hex[:8]}",
            TASK_HEARTBEAT="2",
            TASK_WORKERS="4",
            IMAGE_API_KEY=KEY,
            IMAGE_BASE_URL=fake.base_url,
            SHUTDOWN_GRACE="2",
        )
        async with (
            serve(env, tmp_path) as a,
            serve(env, tmp_path) as b,
            client(a) as stub_a,
            client(b) as stub_b,
        ):
            ids = []
            for number in range(TASKS):
                stub = stub_a if number % 2 else stub_b
                task = await stub.GenerateImageAsync(pb.GenerateImageRequest(prompt=f"t{number}"))
                ids.append(task.task_id)
            await until(lambda: len(fake.requests) >= 4, "no task reached the upstream")

            await redis.kill()
            before = {s.proc.pid: cpu_seconds(s.proc.pid) for s in (a, b)}
            loop = asyncio.get_running_loop()
            started = loop.time()
            for server in (a, b):
                await within(
                    until_not_serving(server), "gRPC health stayed SERVING without Redis", 8
                )
            await asyncio.sleep(max(0.0, 5 - (loop.time() - started)))
            outage = loop.time() - started
            for pid, cpu in before.items():
                print(f"replica {pid}: {(cpu_seconds(pid) - cpu) / outage:.1%} of a core")

            upstream_before = len(fake.requests)
            await redis.start()
            await until(
                lambda: len(fake.requests) > upstream_before,
                "no work resumed within 10 s of Redis coming back",
                timeout=10,
            )
            done = await within(all_succeeded(stub_a, ids), "tasks did not all finish", 60)
            assert done == set(ids)  # 0 lost
            generated = Counter(r.client_request_id for r in fake.requests)
            assert max(generated[task_id] for task_id in ids) <= 2, generated
            for server in (a, b):
                assert await health(server) == SERVING
                server.proc.send_signal(signal.SIGTERM)
                assert await server.exit_code() == 0


async def until_not_serving(server: Server) -> None:
    """Poll gRPC health until it says NOT_SERVING."""
    while await health(server) != NOT_SERVING:
        await asyncio.sleep(0.2)


async def all_succeeded(stub: object, ids: list[str]) -> set[str]:
    """Poll until every task in `ids` has SUCCEEDED; their ids."""
    while True:
        succeeded = set()
        for task_id in ids:
            try:
                task = await stub.GetImageTask(pb.GetImageTaskRequest(task_id=task_id))  # type: ignore[attr-defined]
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:  # Redis still reconnecting
                    raise
                continue
            assert task.status != pb.TASK_STATUS_FAILED, task.error
            if task.status == pb.TASK_STATUS_SUCCEEDED:
                succeeded.add(task_id)
        if succeeded == set(ids):
            return succeeded
        await asyncio.sleep(0.3)
