"""Streams, watches and cancel against an app in front of a slow fake Ark."""

from __future__ import annotations

import time
from contextlib import aclosing

import pytest

from sia.client import AsyncClient, Completed, FailedPrecondition, Image, TaskStatus
from sia.testing.fake_ark import FakeArk


async def test_stream_group_yields_each_image_before_the_end(
    fake: FakeArk, ark_client: AsyncClient
) -> None:
    """Images arrive in order, the first well before the last; Completed ends the stream."""
    arrived: list[float] = []
    events = []
    async for event in ark_client.stream_group("a comic strip", size="2K", max_images=3):
        arrived.append(time.monotonic())
        events.append(event)
    *images, completed = events
    assert all(isinstance(image, Image) for image in images)
    assert [image.index for image in images if isinstance(image, Image)] == [0, 1, 2]
    assert isinstance(completed, Completed)
    assert completed.usage.generated_images == 3 and completed.model
    assert arrived[0] < arrived[-1] - fake.image_latency


async def test_a_moderated_image_is_a_per_image_failure(ark_client: AsyncClient) -> None:
    result = await ark_client.generate_group("a strip [moderate:1]", size="2K", max_images=3)
    failed = result.images[1]
    assert not failed.ok and failed.error is not None
    assert failed.error.code == "OutputImageSensitiveContentDetected"
    assert result.images[0].ok and result.images[2].ok


async def test_cancel_a_running_group_then_cancelling_again_fails(
    ark_client: AsyncClient,
) -> None:
    """A running task is cancelled; a finished one is FailedPrecondition."""
    task = await ark_client.submit_group("a comic strip", size="2K", max_images=4)
    async with aclosing(ark_client.watch_task(task.id)) as states:
        async for state in states:
            if state.status is TaskStatus.RUNNING:
                break
    cancelled = await ark_client.cancel_task(task.id)
    assert cancelled.status is TaskStatus.CANCELLED
    assert (await ark_client.get_task(task.id)).status is TaskStatus.CANCELLED
    with pytest.raises(FailedPrecondition) as info:
        await ark_client.cancel_task(task.id)
    assert info.value.reason == "TASK_FINISHED"
