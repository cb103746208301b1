"""Deadlines against a real app whose offline provider takes LATENCY seconds an image:
generations end at `generation_timeout`; watches have no deadline unless given one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest

from sia.app import App
from sia.client import AsyncClient, Client, DeadlineExceeded, TaskStatus
from sia.client._channel import GENERATION_TIMEOUT, TIMEOUT
from sia.config import Settings
from tests.helpers import TEST_SIZE

if TYPE_CHECKING:
    from tests.helpers import MakeSettings

LATENCY = 1.5  # seconds the offline provider takes for an image
SHORT = 0.4  # the clients' deadlines here: well under LATENCY


@pytest.fixture
async def slow_app(make_settings: MakeSettings) -> AsyncIterator[App]:
    async with App(make_settings(offline_latency=LATENCY)) as app:
        yield app


def _target(app: App) -> str:
    return f"127.0.0.1:{app.grpc_port}"


def test_the_default_deadlines() -> None:
    """Generations wait longer than the server's own IMAGE_TIMEOUT, so its limit decides."""
    assert (GENERATION_TIMEOUT, TIMEOUT) == (600.0, 10.0)
    assert Settings.model_fields["image_timeout"].default < GENERATION_TIMEOUT
    with Client("localhost:1") as sia:
        assert (sia._settings.generation_timeout, sia._settings.timeout) == (600.0, 10.0)


async def test_a_watch_outlives_the_client_s_deadlines(slow_app: App) -> None:
    """With both deadlines far under the task's run, a generation times out, but a watch
    and a wait follow the task to SUCCEEDED; a watch's own `timeout` still applies."""
    async with AsyncClient(
        _target(slow_app), api_key="", timeout=SHORT, generation_timeout=SHORT
    ) as sia:
        with pytest.raises(DeadlineExceeded):
            await sia.generate_image("a fox", size=TEST_SIZE)

        task = await sia.submit("a lighthouse", size=TEST_SIZE)
        started = time.monotonic()
        states = [state async for state in sia.watch_task(task.id)]
        assert time.monotonic() - started > SHORT
        assert states[0].status in {TaskStatus.QUEUED, TaskStatus.RUNNING}
        assert states[-1].status is TaskStatus.SUCCEEDED

        waited = await sia.submit("a harbour", size=TEST_SIZE)
        started = time.monotonic()
        assert (await sia.wait_task(waited.id)).status is TaskStatus.SUCCEEDED
        assert time.monotonic() - started > SHORT  # it waited past the deadlines

        bounded = await sia.submit("a cliff", size=TEST_SIZE)
        with pytest.raises(DeadlineExceeded):
            await sia.wait_task(bounded.id, timeout=SHORT)


def _sync_waits(target: str) -> tuple[TaskStatus, float, bool]:
    with Client(target, api_key="", timeout=SHORT, generation_timeout=SHORT) as sia:
        task = sia.submit("a lighthouse", size=TEST_SIZE)
        started = time.monotonic()
        final = sia.wait_task(task.id)
        waited = time.monotonic() - started
        bounded = sia.submit("a cliff", size=TEST_SIZE)
        try:
            list(sia.watch_task(bounded.id, timeout=SHORT))
        except DeadlineExceeded:
            return final.status, waited, True
        return final.status, waited, False


async def test_the_sync_client_s_watch_outlives_its_deadlines(slow_app: App) -> None:
    """The blocking client too (in a thread: the app shares this loop)."""
    status, waited, bounded = await asyncio.to_thread(_sync_waits, _target(slow_app))
    assert status is TaskStatus.SUCCEEDED
    assert waited > SHORT, "the wait ended within the deadlines: it proved nothing"
    assert bounded, "watch_task(timeout=...) sets a deadline"
