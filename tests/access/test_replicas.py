"""Two replicas sharing Redis: one set of keys, one count per limit."""

from __future__ import annotations

import uuid
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from sia.api.image.v1 import image_service_pb2 as pb
from sia.api.image.v1 import image_service_pb2_grpc as grpc_pb
from sia.app import App
from tests.access.helpers import bearer, create_key
from tests.helpers import TEST_SIZE
from tests.tasks.backend_helpers import REDIS_URL, delete_queue_keys, require_redis

if TYPE_CHECKING:
    from tests.helpers import MakeSettings

RPM = 5


async def test_two_replicas_enforce_one_per_minute_limit(make_settings: MakeSettings) -> None:
    """The first RPM calls pass across both replicas; the next is refused on either, with
    QuotaFailure and RetryInfo; a key created once is known to both."""
    await require_redis()
    queue = f"limits-{uuid.uuid4().hex[:8]}"
    try:
        async with AsyncExitStack() as stack:
            apps = []
            for n in range(2):
                settings = make_settings(
                    task_backend="redis",
                    redis_url=REDIS_URL,
                    redis_queue=queue,
                    data_dir=make_settings().data_dir / f"replica-{n}",
                )
                apps.append(await stack.enter_async_context(App(settings)))
            key = await create_key(apps[0].access.store, "shared", requests_per_minute=RPM)
            stubs = []
            for app in apps:
                await app.access.keys.refresh()  # what KEYS_REFRESH_INTERVAL does by itself
                channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}")
                await stack.enter_async_context(channel)
                stubs.append(grpc_pb.ImageServiceStub(channel))

            request = pb.GenerateImageRequest(prompt="a red fox", size=TEST_SIZE)
            for n in range(RPM):
                await stubs[n % 2].GenerateImage(request, metadata=bearer(key))
            for stub in stubs:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.GenerateImage(request, metadata=bearer(key))
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                status = rpc_status.from_call(refused.value)  # type: ignore[arg-type]
                assert status is not None
                kinds = {detail.TypeName() for detail in status.details}
                assert {"google.rpc.QuotaFailure", "google.rpc.RetryInfo"} <= kinds
                failure = error_details_pb2.QuotaFailure()
                next(d for d in status.details if d.Is(failure.DESCRIPTOR)).Unpack(failure)
                assert failure.violations[0].quota_id == "requests_per_minute"
    finally:
        await delete_queue_keys(queue)
