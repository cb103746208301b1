"""The `sia` command's process set-up (serving itself is tested through `sia serve` elsewhere)."""

from __future__ import annotations

import asyncio
import gc
import sys
import weakref
from collections.abc import Iterator

import pytest

from sia import cli


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restored_gc")
def test_tune_gc_freezes_start_up_objects_and_raises_the_young_threshold() -> None:
    older = gc.get_threshold()[1:]
    cli.tune_gc()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (cli.GC_YOUNG_THRESHOLD, *older)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_malloc_trim_is_found_on_glibc() -> None:
    trim = cli.malloc_trim()
    assert trim is not None
    assert trim(0) in (0, 1)  # 1: memory was returned to the OS


def test_parser_knows_both_commands() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["serve"]).command == "serve"
    assert parser.parse_args(["fake-ark"]).command == "fake-ark"  # main() hands on its arguments


class Cycle:
    """Garbage that only the cyclic GC frees."""

    def __init__(self) -> None:
        self.me = self


@pytest.mark.parametrize("has_malloc_trim", [True, False])
async def test_heap_upkeep_collects_garbage_with_or_without_malloc_trim(
    monkeypatch: pytest.MonkeyPatch, has_malloc_trim: bool
) -> None:
    """The young threshold is only a backstop: the upkeep round's full collection frees
    cyclic garbage on every platform, and trims the heap where glibc can."""
    trims: list[int] = []
    monkeypatch.setattr(cli, "HEAP_UPKEEP_INTERVAL", 0.01)
    monkeypatch.setattr(cli, "malloc_trim", lambda: trims.append if has_malloc_trim else None)

    gc.disable()  # only the upkeep may collect during the test
    try:
        garbage = weakref.ref(Cycle())  # unreachable at once, freed only by a collection
        assert garbage() is not None

        async def main() -> None:
            for _ in range(200):
                if garbage() is None and (trims or not has_malloc_trim):
                    return
                await asyncio.sleep(0.01)

        await cli._heap_upkeep(main())
    finally:
        gc.enable()
    assert garbage() is None
    if has_malloc_trim:
        assert trims and set(trims) == {0}  # malloc_trim(0) after the collection


@pytest.mark.parametrize("busy_for", [0.15, 1.0])
async def test_heap_upkeep_waits_while_many_calls_are_in_flight(
    monkeypatch: pytest.MonkeyPatch, busy_for: float
) -> None:
    """A round due during a burst waits for it to pass (a full collection would walk
    every waiting call), but not longer than one more interval."""
    monkeypatch.setattr(cli, "HEAP_UPKEEP_INTERVAL", 0.1)
    monkeypatch.setattr(cli, "UPKEEP_BUSY_POLL", 0.01)
    monkeypatch.setattr(cli, "UPKEEP_BUSY_TASKS", 20)
    monkeypatch.setattr(cli, "malloc_trim", lambda: None)
    collected_at: list[float] = []

    gc.disable()
    try:
        garbage = weakref.ref(Cycle())
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def main() -> None:
            in_flight = [asyncio.create_task(asyncio.sleep(busy_for)) for _ in range(30)]
            while garbage() is not None and loop.time() - start < 2:
                await asyncio.sleep(0.005)
            collected_at.append(loop.time() - start)
            await asyncio.gather(*in_flight)

        await cli._heap_upkeep(main())
    finally:
        gc.enable()
    assert garbage() is None
    if busy_for < 0.2:  # the burst ended within the round's patience: collected after it
        assert busy_for <= collected_at[0] < 0.9
    else:  # still busy: collected once the round has waited one more interval
        assert 0.2 <= collected_at[0] < 0.9
