"""Every call of the client against a real running app (offline provider)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from PIL import Image as PILImage

from sia.app import App
from sia.client import (
    AsyncClient,
    Client,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TaskStatus,
    Unauthenticated,
)
from tests.access.helpers import app_key
from tests.helpers import TEST_SIZE


def _target(app: App) -> str:
    return f"127.0.0.1:{app.grpc_port}"


@pytest.mark.parametrize("response_format", ["b64_json", "url"])
async def test_generate_image_saves_a_jpeg_of_the_size_asked(
    client: AsyncClient, tmp_path: Path, response_format: str
) -> None:
    """Inline bytes are written as they are; a URL is downloaded."""
    result = await client.generate_image(
        "a red fox",
        size=TEST_SIZE,
        response_format=response_format,  # type: ignore[arg-type]
    )
    [image] = result.images
    assert image.ok and image.index == 0 and image.size == TEST_SIZE
    assert bool(image.data) == (response_format == "b64_json")
    assert result.usage.generated_images == 1 and result.model
    path = await asyncio.to_thread(image.save, tmp_path / "fox.jpg")
    with PILImage.open(path) as picture:
        assert picture.format == "JPEG"
        assert f"{picture.width}x{picture.height}" == TEST_SIZE
    assert image.raw is not None and image.raw.index == 0


async def test_generate_group_returns_the_images_in_order(client: AsyncClient) -> None:
    result = await client.generate_group("a comic strip", size=TEST_SIZE, max_images=3)
    assert [image.index for image in result.images] == [0, 1, 2]
    assert result.usage.generated_images == 3


async def test_submit_and_watch_to_the_end(client: AsyncClient) -> None:
    """The watch starts at the task's state and ends at SUCCEEDED with the image."""
    task = await client.submit("a lighthouse", size=TEST_SIZE, request_id="order-1")
    assert task.id.startswith("task_") and task.status is TaskStatus.QUEUED
    states = [state async for state in client.watch_task(task.id)]
    final = states[-1]
    assert final.status is TaskStatus.SUCCEEDED and final.done
    assert final.finished_at is not None and final.request_id == "order-1"
    assert len(final.images) == 1 and final.images[0].url
    assert (await client.get_task(task.id)).status is TaskStatus.SUCCEEDED


async def test_submit_group_and_wait(client: AsyncClient) -> None:
    task = await client.submit_group("a comic strip", size=TEST_SIZE, max_images=2)
    final = await client.wait_task(task.id)
    assert final.status is TaskStatus.SUCCEEDED
    assert [image.index for image in final.images] == [0, 1]


async def test_list_tasks_pages_through_every_task(client: AsyncClient) -> None:
    """Pages of two, newest first; iter_tasks follows the tokens to the last page."""
    ids = [(await client.submit(f"prompt {n}", size=TEST_SIZE)).id for n in range(5)]
    page = await client.list_tasks(page_size=2)
    assert len(page.tasks) == 2 and page.next_page_token
    second = await client.list_tasks(page_size=2, page_token=page.next_page_token)
    assert {t.id for t in page.tasks}.isdisjoint(t.id for t in second.tasks)
    every = [task.id async for task in client.iter_tasks(page_size=2)]
    assert every == list(reversed(ids))


async def test_usage_counts_the_key_s_images(app: App) -> None:
    key = await app_key(app, "team-a")
    async with AsyncClient(_target(app), api_key=key) as sia:
        await sia.generate_group("a strip", size=TEST_SIZE, max_images=2)
        report = await sia.usage(period="today")
    assert report.key == "team-a"
    assert report.total.images == 2 and report.total.requests == 1
    [model] = report.models
    assert model.images == 2 and report.start_date == report.end_date


async def test_a_bad_size_names_the_field(client: AsyncClient) -> None:
    with pytest.raises(InvalidArgument) as info:
        await client.generate_image("a fox", size="10x10")
    error = info.value
    assert error.reason == "INVALID_ARGUMENT"
    assert [v.field for v in error.field_violations] == ["size"]
    assert "size" in error.message


async def test_over_the_rpm_is_resource_exhausted_with_the_quota_and_retry_after(
    app: App,
) -> None:
    key = await app_key(app, "metered", requests_per_minute=1)
    async with AsyncClient(_target(app), api_key=key) as sia:
        await sia.generate_image("a fox", size=TEST_SIZE)
        with pytest.raises(ResourceExhausted) as info:
            await sia.generate_image("a fox", size=TEST_SIZE)
    error = info.value
    assert error.reason == "QUOTA_EXCEEDED"
    assert error.retry_after is not None and error.retry_after > 0
    [violation] = error.quota_violations
    assert (violation.subject, violation.quota_id) == ("key:metered", "requests_per_minute")


async def test_a_wrong_key_is_unauthenticated(app: App) -> None:
    """Every call needs a valid key once the server has keys; HealthCheck does not."""
    await app_key(app, "team-a")
    async with AsyncClient(_target(app), api_key="sia_" + "x" * 43) as sia:
        with pytest.raises(Unauthenticated):
            await sia.generate_image("a fox")
        with pytest.raises(Unauthenticated):
            await sia.list_tasks()
        assert (await sia.health()).serving


async def test_an_unknown_task_is_not_found(client: AsyncClient) -> None:
    with pytest.raises(NotFound) as info:
        await client.get_task("task_missing")
    assert info.value.reason == "TASK_NOT_FOUND"


def _sync_round_trip(target: str, key: str, folder: Path) -> tuple[str, TaskStatus, int, bool]:
    with Client(target, api_key=key) as sia:
        result = sia.generate_image("a fox", size=TEST_SIZE, response_format="b64_json")
        path = result.images[0].save(folder / "fox.jpg")
        events = list(sia.stream_group("a strip", size=TEST_SIZE, max_images=2))
        task = sia.wait_task(sia.submit("a fox", size=TEST_SIZE).id)
        tasks = list(sia.iter_tasks(page_size=1))
        health = sia.health()
    return path.suffix, task.status, len(events) + len(tasks), health.serving


async def test_the_sync_client_in_a_thread(app: App, tmp_path: Path) -> None:
    """The blocking client makes the same calls (in a thread: the app shares this loop)."""
    key = await app_key(app, "sync")
    suffix, status, count, serving = await asyncio.to_thread(
        _sync_round_trip, _target(app), key, tmp_path
    )
    assert (suffix, status, count, serving) == (".jpg", TaskStatus.SUCCEEDED, 3 + 1, True)
