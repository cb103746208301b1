"""Tests of the use cases that the RPC tests do not reach directly: retention."""

from __future__ import annotations

import asyncio

import pytest

from sia.app import App
from sia.domain import GenerationRequest, TaskStatus
from sia.errors import TaskNotFound
from tests.helpers import TEST_SIZE, MakeSettings


async def test_sweep_deletes_expired_tasks_and_images(make_settings: MakeSettings) -> None:
    """Finished tasks and stored images older than TASK_RETENTION are deleted; newer ones stay."""
    async with App(make_settings(task_retention=2)) as app:
        request = GenerationRequest(prompt="x", model="doubao-seedream-4-0-250828", size=TEST_SIZE)
        task = await app.service.submit(request)
        async with asyncio.timeout(10):
            while (await app.service.get_task(task.id)).status is not TaskStatus.SUCCEEDED:
                await asyncio.sleep(0.05)
        done = await app.service.get_task(task.id)
        key = done.result.images[0].blob_key  # type: ignore[union-attr]
        await app.service.sweep()
        assert (await app.service.get_task(task.id)).status is TaskStatus.SUCCEEDED

        await asyncio.sleep(2.1)
        await app.service.sweep()
        with pytest.raises(TaskNotFound):
            await app.service.get_task(task.id)
        assert not app.store.path(key).exists()
