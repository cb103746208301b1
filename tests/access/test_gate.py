"""The gate's limits through the service: budgets, the account's images per minute, slots."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

import pytest

from sia.app import App
from sia.domain import GenerationRequest, Task, TaskStatus, utcnow
from sia.errors import QuotaExceeded
from tests.access.helpers import app_key
from tests.helpers import TEST_SIZE

if TYPE_CHECKING:
    from sia.access.base import ApiKey
    from tests.helpers import MakeSettings

MODEL = "doubao-seedream-4-0-250828"
PRICES = json.dumps({MODEL: 0.2})


def _request(max_images: int | None = None) -> GenerationRequest:
    return GenerationRequest(prompt="x", model=MODEL, size=TEST_SIZE, max_images=max_images)


def _caller(app: App, name: str) -> ApiKey:
    key = app.access.keys.by_name(name)
    assert key is not None
    return key


@pytest.mark.parametrize("period", ["day", "month"])
async def test_a_budget_refuses_the_call_that_would_pass_it(
    make_settings: MakeSettings, period: str
) -> None:
    """At 0.2 a picture a 0.5 budget takes two; the third is refused, naming the budget and
    its reset, and a group is priced at its most images before it runs."""
    async with App(make_settings(model_prices=PRICES)) as app:
        await app_key(app, "thrifty", **{f"budget_per_{period}_micros": 500_000})
        caller = _caller(app, "thrifty")
        for _ in range(2):
            await app.service.generate(_request(), caller=caller)
        with pytest.raises(QuotaExceeded) as refused:
            await app.service.generate(_request(), caller=caller)
        error = refused.value
        assert (error.subject, error.limit) == ("key:thrifty", f"budget_per_{period}")
        assert "0.40 CNY of 0.50 CNY spent" in error.description
        assert 0 < error.retry_after <= 31 * 86400
        await app.service.publish_task_stats()
        await app.access.publish_budgets()
        ratio = app.metrics.registry.get_sample_value(
            "sia_key_budget_used_ratio", {"key": "thrifty", "period": period}
        )
        assert ratio == pytest.approx(0.8)


async def test_a_group_reserves_its_most_images(make_settings: MakeSettings) -> None:
    """images_per_day counts a group at max_images before it runs."""
    async with App(make_settings()) as app:
        await app_key(app, "groups", images_per_day=3)
        with pytest.raises(QuotaExceeded, match="images_per_day"):
            await app.service.generate(_request(max_images=4), caller=_caller(app, "groups"))


async def test_the_account_limit_refuses_calls_and_holds_tasks(
    make_settings: MakeSettings,
) -> None:
    """Past UPSTREAM_IMAGES_PER_MINUTE a call is refused (subject "account", with a retry
    delay) while a task waits in line instead of failing."""
    async with App(make_settings(upstream_images_per_minute=2)) as app:
        for _ in range(2):
            await app.service.generate(_request())
        with pytest.raises(QuotaExceeded) as refused:
            await app.service.generate(_request())
        assert (refused.value.subject, refused.value.limit) == (
            "account",
            "upstream_images_per_minute",
        )
        assert 0 < refused.value.retry_after <= 120  # a sliding window: up to two minutes
        task = await app.service.submit(_request())
        await asyncio.sleep(1.5)  # a worker took it long since: it waits for the window
        waiting = await app.service.get_task(task.id)
        assert waiting.status is TaskStatus.RUNNING
        await app.service.cancel_task(task.id)


async def test_calls_in_flight_count_against_the_days_quota(make_settings: MakeSettings) -> None:
    """Five calls at once with one image left today: one runs, four are refused."""
    async with App(make_settings(offline_latency=0.3)) as app:
        await app_key(app, "one-a-day", images_per_day=1)
        caller = _caller(app, "one-a-day")
        outcomes = await asyncio.gather(
            *(app.service.generate(_request(), caller=caller) for _ in range(5)),
            return_exceptions=True,
        )
        refused = [o for o in outcomes if isinstance(o, QuotaExceeded)]
        assert len(refused) == 4
        assert {o.limit for o in refused} == {"images_per_day"}
        assert app.access.ledger.totals("one-a-day").images_today == 1
        assert app.access.ledger.reserved("one-a-day") == (0, 0)


async def _finished(app: App, task_id: str, caller: ApiKey | None) -> Task:
    while not (task := await app.service.get_task(task_id, caller=caller)).status.is_terminal:
        await asyncio.sleep(0.05)
    return task


async def test_queued_tasks_cannot_spend_past_the_quota(make_settings: MakeSettings) -> None:
    """Tasks admitted while the quota had room are checked again when they run."""
    async with App(make_settings(task_workers=1, offline_latency=0.6)) as app:
        await app_key(app, "queued", images_per_day=1)
        caller = _caller(app, "queued")
        await app.service.submit(_request())  # holds the one worker: the three all queue
        tasks = [await app.service.submit(_request(), caller=caller) for _ in range(3)]
        done = [await _finished(app, task.id, caller) for task in tasks]
        statuses = sorted(task.status.value for task in done)
        assert statuses == ["failed", "failed", "succeeded"]
        failed = [task for task in done if task.error is not None]
        assert {task.error.code for task in failed if task.error} == {"QUOTA_EXCEEDED"}
        assert app.access.ledger.totals("queued").images_today == 1


async def test_a_revoked_key_fails_its_task_before_the_provider(
    make_settings: MakeSettings,
) -> None:
    """A task whose key was revoked while it waited in the queue fails KEY_REVOKED."""
    async with App(make_settings(task_workers=1, offline_latency=0.5)) as app:
        await app_key(app, "leaked")
        caller = _caller(app, "leaked")
        blocker = await app.service.submit(_request())  # holds the one worker
        task = await app.service.submit(_request(), caller=caller)
        await app.access.store.revoke_key("leaked", utcnow())
        await app.access.keys.refresh()
        done = await _finished(app, task.id, caller)
        assert done.status is TaskStatus.FAILED
        assert done.error is not None and done.error.code == "KEY_REVOKED"
        assert (await _finished(app, blocker.id, None)).status is TaskStatus.SUCCEEDED
        assert app.access.ledger.totals("leaked").images_today == 0


async def test_a_group_larger_than_a_minute_is_refused_for_good(
    make_settings: MakeSettings,
) -> None:
    """A group that can never fit a per-minute limit is refused without RetryInfo."""
    async with App(make_settings(upstream_images_per_minute=2)) as app:
        with pytest.raises(QuotaExceeded, match="never") as refused:
            await app.service.generate(_request(max_images=3))
        assert refused.value.retry_after == float("inf")
