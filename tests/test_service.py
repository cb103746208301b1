"""Tests of the use cases that the RPC tests do not reach directly: retention, deadlines."""

from __future__ import annotations

import asyncio
import base64
import io
import os
from datetime import timedelta

import pytest
from PIL import Image

from sia import service
from sia.app import App
from sia.domain import GenerationRequest, GenerationResult, OnImage, TaskStatus, utcnow
from sia.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ReferencesBusy,
    TaskNotFound,
    UpstreamUnavailable,
)
from sia.models import ARK_MODELS
from sia.providers.ark import ArkProvider
from sia.validation import INLINE_DECODE_CHARS, MAX_REFERENCE_TOTAL_BYTES
from tests.helpers import TEST_SIZE, MakeSettings
from tests.providers.scripted import JSON, Reply, ScriptedClient

#: How long a test waits for a timer set to fire well within it, before it fails.
GUARD = 5.0


async def test_sweep_deletes_expired_tasks_and_images(
    make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
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

        later = utcnow() + timedelta(seconds=3)  # past the retention of both, without waiting
        monkeypatch.setattr(service, "utcnow", lambda: later)
        await app.service.sweep()
        with pytest.raises(TaskNotFound):
            await app.service.get_task(task.id)
        assert not app.store.path(key).exists()


def _request() -> GenerationRequest:
    return GenerationRequest(prompt="x", model="doubao-seedream-4-0-250828", size=TEST_SIZE)


class HangingProvider:
    """A provider that never answers and sets no timer of its own (as Ark's does not)."""

    name = "hanging"
    models = ARK_MODELS

    async def generate(
        self, request: GenerationRequest, *, timeout: float, on_image: OnImage | None = None
    ) -> GenerationResult:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        pass


def _timeouts(app: App) -> float:
    value = app.metrics.registry.get_sample_value(
        "sia_upstream_errors_total", {"provider": app.provider.name, "code": "TIMEOUT"}
    )
    return value or 0.0


async def test_caller_timeout_is_left_to_the_caller(make_settings: MakeSettings) -> None:
    """A caller's time sooner than IMAGE_TIMEOUT sets no timer: the caller cancels at its end.

    Cancelled after its time is up, the call counts as an upstream TIMEOUT; cancelled
    earlier (the client went away), it does not.
    """
    async with App(make_settings(), provider=HangingProvider()) as app:
        late = asyncio.create_task(app.service.generate(_request(), caller_timeout=0.2))
        await asyncio.sleep(0.4)
        assert not late.done()  # no timer of the service's own fired
        late.cancel()
        with pytest.raises(asyncio.CancelledError):
            await late
        assert _timeouts(app) == 1

        early = asyncio.create_task(app.service.generate(_request(), caller_timeout=5))
        await asyncio.sleep(0.1)
        early.cancel()
        with pytest.raises(asyncio.CancelledError):
            await early
        assert _timeouts(app) == 1


async def _deadline(app: App, caller_timeout: float | None) -> DeadlineExceeded | None:
    """The DeadlineExceeded a generation that never answers ends with; None if GUARD ran out."""
    try:
        async with asyncio.timeout(GUARD):
            await app.service.generate(_request(), caller_timeout=caller_timeout)
    except DeadlineExceeded as exc:
        return exc
    except TimeoutError:
        return None  # the guard's: the service set no timer, or it did not fire
    raise AssertionError("a provider that never answers produced a result")


async def test_image_timeout_sooner_than_the_caller_is_enforced(
    make_settings: MakeSettings,
) -> None:
    """IMAGE_TIMEOUT before the caller's time (or with none) ends the call as DeadlineExceeded."""
    async with App(make_settings(image_timeout=0.2), provider=HangingProvider()) as app:
        for caller_timeout in (10.0, None):
            ended = await _deadline(app, caller_timeout)
            assert isinstance(ended, DeadlineExceeded), f"IMAGE_TIMEOUT did not fire: {ended!r}"
            assert "within 0.2 s" in ended.message
        assert _timeouts(app) == 2


async def test_image_timeout_ends_a_hanging_ark_call(make_settings: MakeSettings) -> None:
    """The Ark provider sets no timer of its own: IMAGE_TIMEOUT ends its hanging call."""
    client = ScriptedClient(Reply(hang=True))
    provider = ArkProvider("http://ark.invalid", "k", client=client)
    async with App(make_settings(image_timeout=0.2), provider=provider) as app:
        ended = await _deadline(app, None)
        assert isinstance(ended, DeadlineExceeded), f"IMAGE_TIMEOUT did not fire: {ended!r}"
        assert len(client.sent) == 1  # ended, not retried
        assert _timeouts(app) == 1


async def test_an_answer_lost_after_a_2xx_fails_once_and_is_counted(
    make_settings: MakeSettings,
) -> None:
    """A 200 whose body is cut off is not retried (it was likely billed) and is counted."""
    client = ScriptedClient(Reply(200, JSON, (b'{"data": [',), broken=True))
    provider = ArkProvider("http://ark.invalid", "k", client=client)
    async with App(make_settings(), provider=provider) as app:
        with pytest.raises(UpstreamUnavailable, match="lost in transit"):
            await app.service.generate(_request())
        assert len(client.sent) == 1
        lost = app.metrics.registry.get_sample_value(
            "sia_upstream_answers_lost_total", {"provider": "ark"}
        )
        assert lost == 1


def _noise_png(side: int = 200) -> str:
    """A data URI of a PNG of random pixels: longer than INLINE_DECODE_CHARS, so checked late."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    assert len(uri) > INLINE_DECODE_CHARS
    return uri


def _with_images(*images: str) -> GenerationRequest:
    return GenerationRequest(
        prompt="x", model="doubao-seedream-4-0-250828", size=TEST_SIZE, images=images
    )


async def test_large_references_are_decoded_and_named(make_settings: MakeSettings) -> None:
    """Data URIs too long to decode where validated are checked before the call and the
    submission, each problem naming its images[i]; good ones pass and free their budget."""
    not_png = "data:image/png;base64," + base64.b64encode(os.urandom(60_000)).decode()
    not_base64 = "data:image/png;base64," + "@" * INLINE_DECODE_CHARS
    async with App(make_settings()) as app:
        bad = _with_images(_noise_png(), not_png, "https://example.com/a.png", not_base64)
        for call in (app.service.generate, app.service.submit):
            with pytest.raises(InvalidArgument) as info:
                await call(bad)
            assert {v.field: v.description for v in info.value.violations} == {
                "images[1]": "data URI payload is not a readable png image",
                "images[3]": "data URI payload is not valid base64",
            }
        result = await app.service.generate(_with_images(_noise_png()))
        assert result.images[0].ok
        assert app.service.references.held == 0


async def test_references_over_the_request_total_are_refused_unread(
    make_settings: MakeSettings,
) -> None:
    """References that together imply more than MAX_REFERENCE_TOTAL_BYTES are refused,
    naming `images`, from their lengths alone."""
    each = "data:image/png;base64," + "A" * (MAX_REFERENCE_TOTAL_BYTES // 3 * 4 // 3 + 4)
    async with App(make_settings()) as app:
        with pytest.raises(InvalidArgument) as info:
            await app.service.generate(_with_images(each, each, each))
        assert [v.field for v in info.value.violations] == ["images"]


async def test_reference_budget_full_answers_resource_exhausted(
    make_settings: MakeSettings,
) -> None:
    """While calls in flight hold the references budget, another call carrying references is
    refused at once with a retry delay; calls without references are not affected."""
    async with App(make_settings(), provider=HangingProvider()) as app:
        reference = _noise_png()
        app.service.references.limit = len(reference)  # room for one such call
        holding = asyncio.create_task(app.service.generate(_with_images(reference)))
        while app.service.references.held == 0:
            await asyncio.sleep(0.005)
        with pytest.raises(ReferencesBusy) as info:
            await app.service.generate(_with_images(reference))
        assert info.value.retry_after
        plain = asyncio.create_task(app.service.generate(_request()))
        await asyncio.sleep(0)
        assert not plain.done()  # waiting on the provider, not refused
        for task in (holding, plain):
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert app.service.references.held == 0


async def test_a_cancel_whose_caller_goes_away_still_ends_the_task(
    make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that goes away mid-cancel (gRPC or REST cancel the handler) must not cut
    the store's write halfway: the cancel finishes behind the caller, and the task ends
    CANCELLED, its run stopped. The backend's write is slowed to land the cut inside it."""
    async with App(make_settings(offline_latency=5.0)) as app:
        task = await app.service.submit(_request())
        async with asyncio.timeout(GUARD):
            while (await app.service.get_task(task.id)).status is not TaskStatus.RUNNING:
                await asyncio.sleep(0.02)
        real_cancel = app.tasks.cancel

        async def slow_cancel(task_id: str) -> object:
            await asyncio.sleep(0.2)
            return await real_cancel(task_id)

        monkeypatch.setattr(app.tasks, "cancel", slow_cancel)
        caller = asyncio.create_task(app.service.cancel_task(task.id))
        await asyncio.sleep(0.05)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        async with asyncio.timeout(GUARD):
            while (await app.service.get_task(task.id)).status is not TaskStatus.CANCELLED:
                await asyncio.sleep(0.02)
