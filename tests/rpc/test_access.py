"""Access control over real gRPC: keys, statuses and their details, ownership, usage."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from sia.access.factory import build_access_store
from sia.access.usage import today
from sia.api.image.v1 import image_service_pb2 as pb
from sia.api.image.v1 import image_service_pb2_grpc as grpc_pb
from sia.app import App
from sia.domain import utcnow
from sia.errors import ConfigError
from sia.logs import OUTPUT
from sia.testing.fake_ark import FakeArk
from tests.access.helpers import app_key, bearer
from tests.helpers import TEST_SIZE
from tests.tasks.backend_helpers import REDIS_URL, delete_queue_keys, require_redis
from tests.waiting import until, within

if TYPE_CHECKING:
    from tests.helpers import LogConfig, MakeSettings

MODEL = "doubao-seedream-4-0-250828"


def _generate(prompt: str = "a red fox", **fields: Any) -> pb.GenerateImageRequest:
    fields.setdefault("size", TEST_SIZE)
    return pb.GenerateImageRequest(prompt=prompt, **fields)


def _details(error: grpc.aio.AioRpcError, kind: Any) -> list[Any]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]  # an aio error is a Call
    assert status is not None
    found = []
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            message = kind()
            detail.Unpack(message)
            found.append(message)
    return found


async def _refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def test_no_unknown_or_revoked_key_is_unauthenticated_alike(
    app: App, stub: grpc_pb.ImageServiceStub
) -> None:
    """Three ways to lack a valid key, one answer: nothing tells which keys exist."""
    key = await app_key(app, "team-a")
    assert (await stub.GenerateImage(_generate(), metadata=bearer(key))).images
    await app.access.store.revoke_key("team-a", at=utcnow())
    await app.access.keys.refresh()

    answers = []
    for metadata in ((), bearer("sia_" + "x" * 43), bearer(key), (("authorization", key),)):
        error = await _refused(stub.GenerateImage(_generate(), metadata=metadata))
        answers.append((error.code(), error.details()))
    assert answers == [(grpc.StatusCode.UNAUTHENTICATED, answers[0][1])] * 4
    assert "Bearer" in answers[0][1]
    sample = app.metrics.registry.get_sample_value
    assert sample("sia_auth_failures_total", {"reason": "missing"}) == 1
    assert sample("sia_auth_failures_total", {"reason": "invalid"}) == 3


async def test_probes_and_reflection_need_no_key(
    app: App, stub: grpc_pb.ImageServiceStub, channel: grpc.aio.Channel
) -> None:
    """HealthCheck, grpc.health.v1 and reflection stay open once keys exist."""
    await app_key(app, "team-a")
    assert (await stub.HealthCheck(pb.HealthCheckRequest())).status == pb.SERVING_STATUS_SERVING
    health = health_pb2_grpc.HealthStub(channel)
    check = await health.Check(health_pb2.HealthCheckRequest(service="image.v1.ImageService"))
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    error = await _refused(stub.GetImageTask(pb.GetImageTaskRequest(task_id="task_x")))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_model_the_key_may_not_use_is_permission_denied(
    app: App, stub: grpc_pb.ImageServiceStub
) -> None:
    """PERMISSION_DENIED names the model; the key's own models still work."""
    key = await app_key(app, "narrow", models=frozenset({"doubao-seedream-4-5-251128"}))
    error = await _refused(stub.GenerateImage(_generate(model=MODEL), metadata=bearer(key)))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert MODEL in error.details()
    [info] = _details(error, error_details_pb2.ErrorInfo)
    assert (info.reason, info.metadata["model"]) == ("MODEL_NOT_ALLOWED", MODEL)
    ok = stub.GenerateImage(
        _generate(model="doubao-seedream-4-5-251128", size="2K"), metadata=bearer(key)
    )
    assert (await ok).images


async def test_over_the_rpm_is_resource_exhausted_with_quota_failure_and_retry_info(
    app: App, stub: grpc_pb.ImageServiceStub
) -> None:
    """Call N+1 in a minute is refused: QuotaFailure names the limit, RetryInfo says when."""
    key = await app_key(app, "metered", requests_per_minute=2)
    for _ in range(2):
        await stub.GenerateImage(_generate(), metadata=bearer(key))
    error = await _refused(stub.GenerateImageAsync(_generate(), metadata=bearer(key)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    [failure] = _details(error, error_details_pb2.QuotaFailure)
    [violation] = failure.violations
    assert (violation.subject, violation.quota_id, violation.quota_value) == (
        "key:metered",
        "requests_per_minute",
        2,
    )
    [retry] = _details(error, error_details_pb2.RetryInfo)
    assert (
        0 < retry.retry_delay.ToTimedelta().total_seconds() <= 120
    )  # a sliding window: up to two minutes
    labels = {"key": "metered", "limit": "requests_per_minute"}
    assert app.metrics.registry.get_sample_value("sia_quota_rejections_total", labels) == 1


async def test_concurrency_and_images_per_day_are_enforced(
    make_settings: MakeSettings,
) -> None:
    """A second generation at once is refused; so is an image past the day's quota."""
    async with App(make_settings(offline_latency=0.5)) as app:
        key = await app_key(app, "small", concurrency=1, images_per_day=2)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            stub = grpc_pb.ImageServiceStub(channel)
            first = stub.GenerateImage(_generate(), metadata=bearer(key))
            await app_wait_in_flight(app)
            error = await _refused(stub.GenerateImage(_generate(), metadata=bearer(key)))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert _details(error, error_details_pb2.QuotaFailure)[0].violations[0].quota_id == (
                "concurrency"
            )
            await first
            await stub.GenerateImage(_generate(), metadata=bearer(key))
            error = await _refused(stub.GenerateImage(_generate(), metadata=bearer(key)))
            [violation] = _details(error, error_details_pb2.QuotaFailure)[0].violations
            assert violation.quota_id == "images_per_day"


async def app_wait_in_flight(app: App) -> None:
    """Wait until one generation holds its slot."""

    def held() -> bool:
        return bool(getattr(app.access.slots, "_held", None))

    await until(held, "the first call never started")


async def test_tasks_belong_to_their_key(app: App, stub: grpc_pb.ImageServiceStub) -> None:
    """Another key's task is NOT_FOUND for get and cancel, as a missing one is."""
    alice, bob = await app_key(app, "alice"), await app_key(app, "bob")
    task = await stub.GenerateImageAsync(_generate(), metadata=bearer(alice))
    got = await stub.GetImageTask(
        pb.GetImageTaskRequest(task_id=task.task_id), metadata=bearer(alice)
    )
    assert got.task_id == task.task_id
    missing = await _refused(
        stub.GetImageTask(pb.GetImageTaskRequest(task_id="task_nothere"), metadata=bearer(bob))
    )
    for call in (
        stub.GetImageTask(pb.GetImageTaskRequest(task_id=task.task_id), metadata=bearer(bob)),
        stub.CancelImageTask(pb.CancelImageTaskRequest(task_id=task.task_id), metadata=bearer(bob)),
    ):
        error = await _refused(call)
        assert error.code() == missing.code() == grpc.StatusCode.NOT_FOUND
        assert error.details() == missing.details().replace("task_nothere", task.task_id)


async def test_request_ids_are_per_key_and_a_changed_request_is_refused(
    app: App, stub: grpc_pb.ImageServiceStub
) -> None:
    """Same key, same request_id: the same task for the same request, ALREADY_EXISTS naming
    it for another; another key's request_id never meets this one's."""
    alice, bob = await app_key(app, "alice"), await app_key(app, "bob")
    first = await stub.GenerateImageAsync(
        _generate(request_id="order-1001"), metadata=bearer(alice)
    )
    again = await stub.GenerateImageAsync(
        _generate(request_id="order-1001"), metadata=bearer(alice)
    )
    assert again.task_id == first.task_id
    error = await _refused(
        stub.GenerateImageAsync(
            _generate("a blue whale", request_id="order-1001"), metadata=bearer(alice)
        )
    )
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert first.task_id in error.details()
    [info] = _details(error, error_details_pb2.ErrorInfo)
    assert info.metadata["task_id"] == first.task_id
    other = await stub.GenerateImageAsync(
        _generate("a blue whale", request_id="order-1001"), metadata=bearer(bob)
    )
    assert other.task_id != first.task_id


async def test_list_image_tasks_pages_through_own_tasks(
    app: App, stub: grpc_pb.ImageServiceStub
) -> None:
    """Newest first, page by page, only the caller's; a bad token names page_token."""
    alice, bob = await app_key(app, "alice"), await app_key(app, "bob")
    ids = [
        (await stub.GenerateImageAsync(_generate(f"fox {n}"), metadata=bearer(alice))).task_id
        for n in range(5)
    ]
    await stub.GenerateImageAsync(_generate(), metadata=bearer(bob))
    seen, token, pages = [], "", 0
    while True:
        page = await stub.ListImageTasks(
            pb.ListImageTasksRequest(page_size=2, page_token=token), metadata=bearer(alice)
        )
        seen += [task.task_id for task in page.tasks]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == ids[::-1]
    assert pages == 3
    error = await _refused(
        stub.ListImageTasks(pb.ListImageTasksRequest(page_token="garbage!"), metadata=bearer(alice))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    [bad] = _details(error, error_details_pb2.BadRequest)
    assert bad.field_violations[0].field == "page_token"


async def test_usage_equals_what_the_upstream_billed(make_settings: MakeSettings) -> None:
    """GetUsage's images and tokens are what the fake Ark's usage objects said, with the
    price table's cost; the per-key counters agree."""
    async with FakeArk(api_key="ark-key") as fake:
        settings = make_settings(
            image_provider="ark",
            image_api_key="ark-key",
            image_base_url=fake.base_url,
            model_prices=json.dumps({MODEL: 0.25}),
        )
        async with App(settings) as app:
            key = await app_key(app, "billing")

            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
                stub = grpc_pb.ImageServiceStub(channel)
                await stub.GenerateImage(_generate(), metadata=bearer(key))
                group = pb.GenerateSequentialImagesRequest(
                    prompt="a comic strip [count:3]", size="2K", max_images=4
                )
                await stub.GenerateSequentialImages(group, metadata=bearer(key))
                usage = await stub.GetUsage(pb.GetUsageRequest(), metadata=bearer(key))
                month = await stub.GetUsage(
                    pb.GetUsageRequest(period=pb.USAGE_PERIOD_MONTH), metadata=bearer(key)
                )
    billed_images = sum(r.images for r in fake.requests)
    assert billed_images == 4
    assert (usage.key, usage.start_date, usage.currency) == ("billing", today().isoformat(), "CNY")
    [row] = usage.models
    assert (row.model, row.requests, row.images) == (MODEL, 2, billed_images)
    assert row.output_tokens > 0
    assert row.cost == pytest.approx(0.25 * billed_images)
    assert usage.total.images == billed_images
    assert month.total.images == billed_images
    labels = {"key": "billing", "model": MODEL}
    sample = app.metrics.registry.get_sample_value
    assert sample("sia_key_images_total", labels) == billed_images
    assert sample("sia_key_spend_total", labels) == pytest.approx(0.25 * billed_images)


async def test_a_bad_usage_period_names_the_field(app: App, stub: grpc_pb.ImageServiceStub) -> None:
    """Dates that do not parse, or run backwards, are INVALID_ARGUMENT naming the field."""
    key = await app_key(app, "alice")
    for request, field in (
        (pb.GetUsageRequest(start_date="2026-13-01"), "start_date"),
        (pb.GetUsageRequest(start_date="2026-12-02", end_date="2026-12-01"), "end_date"),
        (pb.GetUsageRequest(start_date="2024-01-01", end_date="2026-01-01"), "start_date"),
    ):
        error = await _refused(stub.GetUsage(request, metadata=bearer(key)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _details(error, error_details_pb2.BadRequest)[0].field_violations[0].field == field


@pytest.fixture(params=["sqlite", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, Any]]:
    """Settings for each store keys and usage can live in: SQLite, or a Redis of the
    test's own namespace."""
    if request.param == "sqlite":
        yield {}
        return
    await require_redis()
    queue = f"access-{uuid.uuid4().hex[:8]}"
    yield {"task_backend": "redis", "redis_url": REDIS_URL, "redis_queue": queue}
    await delete_queue_keys(queue)


async def test_a_daily_quota_survives_a_restart(
    make_settings: MakeSettings, backend: dict[str, Any]
) -> None:
    """Images used before a restart still count against the day's quota after it."""
    settings = make_settings(**backend)
    async with App(settings) as app:
        key = await app_key(app, "daily", images_per_day=2)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            stub = grpc_pb.ImageServiceStub(channel)
            for _ in range(2):
                await stub.GenerateImage(_generate(), metadata=bearer(key))
    async with (
        App(settings) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
    ):
        stub = grpc_pb.ImageServiceStub(channel)
        error = await _refused(stub.GenerateImage(_generate(), metadata=bearer(key)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        [violation] = _details(error, error_details_pb2.QuotaFailure)[0].violations
        assert (violation.quota_id, violation.quota_value) == ("images_per_day", 2)


async def test_a_key_revoked_in_the_store_is_refused_within_seconds(
    make_settings: MakeSettings, backend: dict[str, Any]
) -> None:
    """A revoke made by another process (the CLI) reaches a running server by itself,
    within KEYS_REFRESH_INTERVAL (the default, 5 s; the test allows 10)."""
    settings = make_settings(**backend)
    async with App(settings) as app:
        key = await app_key(app, "leaked")
        cli_store = build_access_store(settings)
        await cli_store.open()
        try:
            await cli_store.revoke_key("leaked", utcnow())
        finally:
            await cli_store.aclose()

        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            stub = grpc_pb.ImageServiceStub(channel)

            async def refused() -> None:
                while True:
                    try:
                        await stub.GetImageTask(
                            pb.GetImageTaskRequest(task_id="task_x"), metadata=bearer(key)
                        )
                    except grpc.aio.AioRpcError as error:
                        if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                            return
                    await asyncio.sleep(0.1)

            await within(refused(), "the revoked key still works after 10 s", timeout=10)


async def test_key_name_is_logged_and_the_key_never_is(
    app: App,
    stub: grpc_pb.ImageServiceStub,
    log_config: LogConfig,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every line of the call carries key_name; no line anywhere holds the key."""
    log_config("debug")
    key = await app_key(app, "team-a")
    await stub.GenerateImage(_generate(), metadata=bearer(key))
    await _refused(stub.GenerateImage(_generate(model="nope"), metadata=bearer(key)))
    await _refused(stub.GenerateImage(_generate(), metadata=bearer(key + "x")))
    OUTPUT.flush()
    out = capsys.readouterr().out
    assert key not in out and key[4:] not in out
    access = [json.loads(x) for x in out.splitlines() if '"event":"rpc"' in x]
    assert {x.get("key_name") for x in access} == {"team-a", None}
    assert repr(app.access.keys).count("sia_") == 0


async def test_production_without_keys_needs_auth_mode_none(make_settings: MakeSettings) -> None:
    """No keys in production is a start-up error naming AUTH_MODE, unless chosen."""
    production = {"app_environment": "production", "image_provider": "offline"}
    with pytest.raises(ConfigError, match="AUTH_MODE"):
        async with App(make_settings(**production)):
            pass
    async with App(make_settings(**production, auth_mode="none")) as app:
        assert not app.access.keys.enforcing
