"""The dispatcher against a real loopback receiver: signing, retries, giving up, restarts,
the address rules at delivery, and the submit-time check."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from sia.config import Settings
from sia.domain import GeneratedImage, TaskStatus
from sia.errors import ConfigError, FailedPrecondition, InvalidArgument
from sia.logs import OUTPUT
from sia.metrics import Metrics
from sia.webhooks import TASK_IMAGE, TASK_SUCCEEDED, Webhooks
from sia.webhooks.sender import BODY_LIMIT
from sia.webhooks.sqlite_store import SqliteDeliveryStore
from tests.waiting import within
from tests.webhooks.conftest import MakeWebhooks, WebhookSettings
from tests.webhooks.helpers import (
    SECRET,
    Receiver,
    make_task,
    outcome,
    wait_outcome,
    wait_pending,
)


@pytest.fixture
def log_lines(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every JSON log line written during the test, parsed."""
    lines: list[dict[str, Any]] = []
    write = OUTPUT.write

    def record(line: str) -> None:
        lines.append(json.loads(line))
        write(line)

    monkeypatch.setattr(OUTPUT, "write", record)
    return lines


def events(lines: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The log lines of event `name`."""
    return [line for line in lines if line.get("event") == name]


async def test_an_event_arrives_signed(
    make_webhooks: MakeWebhooks,
    store: SqliteDeliveryStore,
    receiver: Receiver,
    registry: CollectorRegistry,
) -> None:
    """The task's end event reaches the receiver as JSON with valid Standard Webhooks headers."""
    webhooks = await make_webhooks(store)
    task = make_task(receiver.url + "?token=abc")
    await webhooks.enqueue(task, TASK_SUCCEEDED)
    [got] = await receiver.wait_for(1)
    assert got.path == "/hook"
    assert got.query == "token=abc"
    assert got.headers["content-type"] == "application/json"
    assert got.webhook_id.startswith("msg_")
    assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 5
    assert got.headers["webhook-signature"].startswith("v1,")
    assert got.event["type"] == TASK_SUCCEEDED
    assert got.event["data"]["task_id"] == task.id
    await wait_pending(store, 0)
    assert outcome(registry, "delivered") == 1
    assert registry.get_sample_value("sia_webhook_delivery_seconds_count") == 1


async def test_image_events_only_when_the_task_asked(
    make_webhooks: MakeWebhooks, store: SqliteDeliveryStore, receiver: Receiver
) -> None:
    """task.image events are sent for a task that asked for one per image, else dropped."""
    webhooks = await make_webhooks(store)
    image = GeneratedImage(index=0, url="https://img.example/0.jpeg")
    await webhooks.enqueue(make_task(receiver.url), TASK_IMAGE, image=image)
    asking = make_task(receiver.url, TaskStatus.RUNNING, each_image=True)
    await webhooks.enqueue(asking, TASK_IMAGE, image=image)
    [got] = await receiver.wait_for(1)
    assert (got.event["type"], got.event["data"]["task_id"]) == (TASK_IMAGE, asking.id)
    assert got.event["data"]["image"]["url"] == "https://img.example/0.jpeg"
    await wait_pending(store, 0)


async def test_the_same_event_enqueued_twice_is_stored_once(
    webhook_settings: WebhookSettings, store: SqliteDeliveryStore
) -> None:
    """A runner that enqueues a task's end twice (re-run after a crash) leaves one delivery."""
    webhooks = Webhooks(webhook_settings(), store)
    task = make_task("https://hooks.example/in")
    await webhooks.enqueue(task, TASK_SUCCEEDED)
    await webhooks.enqueue(task, TASK_SUCCEEDED)
    assert await store.pending() == 1


async def test_no_webhook_url_means_no_delivery(
    make_webhooks: MakeWebhooks, store: SqliteDeliveryStore
) -> None:
    """A task without webhook_url enqueues nothing."""
    webhooks = await make_webhooks(store)
    await webhooks.enqueue(make_task(""), TASK_SUCCEEDED)
    assert await store.pending() == 0


async def test_server_errors_are_retried_with_the_same_webhook_id(
    make_webhooks: MakeWebhooks,
    store: SqliteDeliveryStore,
    receiver: Receiver,
    registry: CollectorRegistry,
) -> None:
    """500, 500, then 200: three attempts, one webhook-id, each attempt signed afresh."""
    receiver.script = [500, 500, 200]
    webhooks = await make_webhooks(store)
    await webhooks.enqueue(make_task(receiver.url), TASK_SUCCEEDED)
    got = await receiver.wait_for(3)
    await wait_pending(store, 0)
    assert len({each.webhook_id for each in got}) == 1
    assert len({each.body for each in got}) == 1
    assert (outcome(registry, "retried"), outcome(registry, "delivered")) == (2, 1)
    await asyncio.sleep(0.1)
    assert len(receiver.received) == 3


async def test_rate_limits_are_retried_after_retry_after(
    make_webhooks: MakeWebhooks, store: SqliteDeliveryStore, receiver: Receiver
) -> None:
    """429 with Retry-After: 1 waits that second, though the schedule's delay is shorter."""

    async def slow_down(_: web.Request) -> web.Response:
        return web.Response(status=429, headers={"Retry-After": "1"})

    receiver.script = [slow_down]
    webhooks = await make_webhooks(store, retry_delays=(0.05, 5.0))
    await webhooks.enqueue(make_task(receiver.url), TASK_SUCCEEDED)
    await receiver.wait_for(1)
    first = time.monotonic()
    await receiver.wait_for(2)
    assert time.monotonic() - first >= 0.9
    await wait_pending(store, 0)


@pytest.mark.parametrize("status", [400, 401, 404, 410, 422])
async def test_client_errors_are_not_retried(
    make_webhooks: MakeWebhooks,
    store: SqliteDeliveryStore,
    receiver: Receiver,
    registry: CollectorRegistry,
    status: int,
) -> None:
    """A 4xx other than 429 gives the delivery up at once."""
    receiver.script = [status]
    webhooks = await make_webhooks(store)
    await webhooks.enqueue(make_task(receiver.url), TASK_SUCCEEDED)
    await wait_outcome(registry, "rejected")
    await wait_pending(store, 0)
    await asyncio.sleep(0.15)
    assert len(receiver.received) == 1


async def test_redirects_are_not_followed(
    make_webhooks: MakeWebhooks,
    store: SqliteDeliveryStore,
    receiver: Receiver,
    registry: CollectorRegistry,
) -> None:
    """A 302 is the answer, and a rejection: the Location is never requested."""

    async def redirect(_: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://127.0.0.1:{receiver.port}/elsewhere")

    receiver.script = [redirect]
    webhooks = await make_webhooks(store)
    await webhooks.enqueue(make_task(receiver.url), TASK_SUCCEEDED)
    await wait_outcome(registry, "rejected")
    await asyncio.sleep(0.15)
    assert [each.path for each in receiver.received] == ["/hook"]
    assert await store.pending() == 0


async def test_timeouts_are_retried(
    make_webhooks: MakeWebhooks,
    webhook_settings: WebhookSettings,
    store: SqliteDeliveryStore,
    receiver: Receiver,
    registry: CollectorRegistry,
) -> None:
    """A receiver that answers after WEBHOOK_TIMEOUT gets the event again."""

    async def hang(_: web.Request) -> web.Response:
        await asyncio.sleep(3)
        return web.Response()

    receiver.script = [hang]
    settings = webhook_settings(webhook_timeout=0.3)
    webhooks = await make_webhooks(store, settings)
    await webhooks.enqueue(make_task(receiver.url), TASK_SUCCEEDED)
    got = await receiver.wait_for(2)
    assert got[0].webhook_id == got[1].webhook_id
    await wait_pending(store, 0)
    assert (outcome(registry, "retried"), outcome(registry, "delivered")) == (1, 1)


async def test_deliveries_expire_after_the_retry_period(
    make_webhooks: MakeWebhooks,
    webhook_settings: WebhookSettings,
    store: SqliteDeliveryStore,
    receiver: Receiver,
    registry: CollectorRegistry,
    log_lines: list[dict[str, Any]],
) -> None:
    """A receiver that keeps failing is tried until WEBHOOK_RETRY_PERIOD, then given up."""
    receiver.default = 503
    settings = webhook_settings(webhook_retry_period=1.0)
    webhooks = await make_webhooks(store, settings, retry_delays=(0.2,))
    await webhooks.enqueue(make_task(receiver.url), TASK_SUCCEEDED)
    await wait_outcome(registry, "expired")
    await wait_pending(store, 0)
    tries = len(receiver.received)
    assert 2 <= tries <= 6
    assert outcome(registry, "retried") == tries - 1
    OUTPUT.flush()
    [gave_up] = events(log_lines, "webhook_gave_up")
    assert (gave_up["level"], gave_up["outcome"], gave_up["attempt"]) == ("error", "expired", tries)


async def test_failed_attempts_are_logged_without_the_path_or_query(
    make_webhooks: MakeWebhooks,
    store: SqliteDeliveryStore,
    receiver: Receiver,
    log_lines: list[dict[str, Any]],
) -> None:
    """One warning per failed attempt: task, webhook id, attempt, status, next attempt;
    the receiver appears as scheme://host:port, and the secret nowhere."""
    receiver.script = [500]
    webhooks = await make_webhooks(store)
    task = make_task(receiver.url + "?token=s3cret")
    await webhooks.enqueue(task, TASK_SUCCEEDED)
    got = await receiver.wait_for(2)
    await wait_pending(store, 0)
    OUTPUT.flush()
    [line] = events(log_lines, "webhook_attempt_failed")
    assert line["level"] == "warning"
    assert line["task_id"] == task.id
    assert line["webhook_id"] == got[0].webhook_id
    assert (line["attempt"], line["status"], line["outcome"]) == (1, 500, "retried")
    assert line["detail"] == "answer 500"
    assert line["target"] == f"http://127.0.0.1:{receiver.port}"
    assert line["next_attempt_at"]
    text = json.dumps(log_lines)
    assert "s3cret" not in text
    assert SECRET.removeprefix("whsec_") not in text


async def test_a_huge_answer_is_not_read(
    make_webhooks: MakeWebhooks,
    store: SqliteDeliveryStore,
    receiver: Receiver,
    log_lines: list[dict[str, Any]],
) -> None:
    """A receiver streaming 256 MiB after its status: at most BODY_LIMIT bytes are read and
    the connection is dropped, so the receiver cannot send it all."""
    total, chunk = 256 * 1024 * 1024, b"x" * 65536
    sent = 0
    finished = asyncio.Event()

    async def flood(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        response = web.StreamResponse(status=400)
        response.content_length = total
        await response.prepare(request)
        try:
            while sent < total:
                await response.write(chunk)
                sent += len(chunk)
        finally:
            finished.set()
        return response

    receiver.script = [flood]
    webhooks = await make_webhooks(store)
    await webhooks.enqueue(make_task(receiver.url), TASK_SUCCEEDED)
    await wait_pending(store, 0)
    await within(finished.wait(), "the receiver's handler did not end")
    assert sent < total
    OUTPUT.flush()
    [line] = events(log_lines, "webhook_attempt_failed")
    assert line["outcome"] == "rejected"
    assert line["detail"] == "x" * BODY_LIMIT


async def test_pending_deliveries_survive_a_restart(
    webhook_settings: WebhookSettings,
    tmp_path: Path,
    registry: CollectorRegistry,
) -> None:
    """The receiver is down when the event is enqueued; the dispatcher is closed and a new
    one opened on the same file; once the receiver is up, the event arrives."""
    receiver = Receiver()
    await receiver.start()
    await receiver.stop()  # its port is known, nothing listens there
    settings = webhook_settings()
    task = make_task(receiver.url)
    fast: dict[str, Any] = {"retry_delays": (0.05,), "jitter": 0.0, "poll_interval": 0.02}
    async with (
        SqliteDeliveryStore(tmp_path / "webhooks.db") as store,
        Webhooks(settings, store, registry, **fast) as webhooks,
    ):
        await webhooks.enqueue(task, TASK_SUCCEEDED)
        await wait_outcome(registry, "retried")
    await receiver.start()
    try:
        async with (
            SqliteDeliveryStore(tmp_path / "webhooks.db") as store,
            Webhooks(settings, store, registry, **fast),
        ):
            [got] = await receiver.wait_for(1)
            await wait_pending(store, 0)
        assert got.event["data"]["task_id"] == task.id
        assert receiver.bad == []
    finally:
        await receiver.stop()


async def test_an_interrupted_attempt_is_sent_again_at_once_after_a_restart(
    webhook_settings: WebhookSettings,
    tmp_path: Path,
    receiver: Receiver,
    registry: CollectorRegistry,
) -> None:
    """Closing while an attempt is in flight makes its delivery due again (not after the
    lease): the next dispatcher sends it, with the same webhook-id."""
    started = asyncio.Event()

    async def hang(_: web.Request) -> web.Response:
        started.set()
        await asyncio.sleep(5)
        return web.Response()

    receiver.script = [hang]
    settings = webhook_settings(webhook_timeout=10)
    path = tmp_path / "webhooks.db"
    async with SqliteDeliveryStore(path) as store:
        webhooks = Webhooks(settings, store, registry, poll_interval=0.02)
        await webhooks.start()
        await webhooks.enqueue(make_task(receiver.url), TASK_SUCCEEDED)
        await within(started.wait(), "the first attempt did not reach the receiver")
        await webhooks.aclose(grace=0)
    async with (
        SqliteDeliveryStore(path) as store,
        Webhooks(settings, store, registry, poll_interval=0.02),
    ):
        got = await receiver.wait_for(2, timeout=5)
        await wait_pending(store, 0)
    assert got[0].webhook_id == got[1].webhook_id


async def test_a_name_for_loopback_is_refused_at_delivery(
    make_webhooks: MakeWebhooks,
    webhook_settings: WebhookSettings,
    store: SqliteDeliveryStore,
    receiver: Receiver,
    registry: CollectorRegistry,
    log_lines: list[dict[str, Any]],
) -> None:
    """Without WEBHOOK_ALLOW_PRIVATE, a name that resolves to 127.0.0.1 is never connected
    to, and the delivery is given up (a literal private address too)."""
    settings = webhook_settings(webhook_allow_private=False)
    webhooks = await make_webhooks(store, settings)
    await webhooks.enqueue(make_task(f"http://localhost:{receiver.port}/hook"), TASK_SUCCEEDED)
    await webhooks.enqueue(make_task(receiver.url), TASK_SUCCEEDED)
    await wait_outcome(registry, "rejected", 2)
    await wait_pending(store, 0)
    assert receiver.received == []
    OUTPUT.flush()
    errors = sorted(line["error"] for line in events(log_lines, "webhook_attempt_failed"))
    assert errors == ["invalid_url", "refused_address"]


async def test_check_refuses_webhooks_without_a_secret(
    webhook_settings: WebhookSettings, store: SqliteDeliveryStore
) -> None:
    """Without WEBHOOK_SECRET: FAILED_PRECONDITION for a webhook_url, events dropped, no worker."""
    webhooks = Webhooks(webhook_settings(webhook_secret=None), store)
    assert not webhooks.enabled
    with pytest.raises(FailedPrecondition, match="WEBHOOK_SECRET is not set"):
        webhooks.check(make_task("https://hooks.example/in").request)
    webhooks.check(make_task("").request)
    await webhooks.start()
    await webhooks.enqueue(make_task("https://hooks.example/in"), TASK_SUCCEEDED)
    assert await store.pending() == 0
    await webhooks.aclose()
    await webhooks.aclose()


async def test_check_refuses_bad_urls_naming_the_field(
    webhook_settings: WebhookSettings, store: SqliteDeliveryStore
) -> None:
    """INVALID_ARGUMENT on webhook_url for a URL the rules refuse; webhook_each_image alone
    is refused too; a good URL passes."""
    webhooks = Webhooks(webhook_settings(webhook_allow_private=False), store)
    assert webhooks.enabled
    for url in ("ftp://hooks.example/in", "http://169.254.169.254/", "http://localhost/"):
        with pytest.raises(InvalidArgument) as caught:
            webhooks.check(make_task(url).request)
        assert caught.value.violations[0].field == "webhook_url"
    with pytest.raises(InvalidArgument) as caught:
        webhooks.check(make_task("", each_image=True).request)
    assert caught.value.violations[0].field == "webhook_each_image"
    webhooks.check(make_task("https://hooks.example/in").request)


@pytest.mark.parametrize(
    "secret",
    ["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_not base64!", "whsec_c2hvcnQ="],
)
def test_a_malformed_secret_is_a_config_error(
    webhook_settings: WebhookSettings, store: SqliteDeliveryStore, secret: str
) -> None:
    """WEBHOOK_SECRET must be whsec_ and the base64 of 24 to 64 bytes."""
    with pytest.raises(ConfigError, match="WEBHOOK_SECRET must be"):
        Webhooks(webhook_settings(webhook_secret=secret), store)


def test_metrics_go_on_the_service_registry(
    webhook_settings: WebhookSettings, store: SqliteDeliveryStore
) -> None:
    """Given the service's Metrics, the counters land on its registry, once however many
    dispatchers are made."""
    metrics = Metrics()
    settings: Settings = webhook_settings()
    Webhooks(settings, store, metrics)
    Webhooks(settings, store, metrics)
    for name in ("delivered", "retried", "rejected", "expired"):
        sample = {"outcome": name}
        assert metrics.registry.get_sample_value("sia_webhook_deliveries_total", sample) == 0


async def test_enqueue_wakes_the_worker(
    make_webhooks: MakeWebhooks, store: SqliteDeliveryStore, receiver: Receiver
) -> None:
    """With a long poll interval, an event still leaves as soon as it is enqueued."""
    webhooks = await make_webhooks(store, poll_interval=30)
    await asyncio.sleep(0.05)  # the worker is asleep
    await webhooks.enqueue(make_task(receiver.url), TASK_SUCCEEDED)
    await receiver.wait_for(1, timeout=2)
