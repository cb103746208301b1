"""The serving process's runtime: GC tuning, heap upkeep and trimming."""

from __future__ import annotations

import asyncio
import gc
import sys
import weakref
from collections.abc import Iterator

import pytest

from sia import runtime


@pytest.fixture(autouse=True)
def _restore_gc() -> Iterator[None]:
    """Leave the collector as the test found it: enabled, unfrozen, same thresholds."""
    threshold, enabled = gc.get_threshold(), gc.isenabled()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)
    if enabled:
        gc.enable()


class Cycle:
    """Garbage that only the cyclic GC frees."""

    def __init__(self) -> None:
        self.me = self


def test_tune_gc_freezes_start_up_objects_and_raises_the_young_threshold() -> None:
    """Start-up objects leave the collector's way; young collections become rare."""
    older = gc.get_threshold()[1:]
    runtime.tune_gc()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (runtime.GC_YOUNG_THRESHOLD, *older)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_malloc_trim_is_found_on_glibc() -> None:
    """On glibc the trim function is found and callable."""
    trim = runtime.malloc_trim()
    assert trim is not None
    assert trim(0) in (0, 1)  # 1: memory was returned to the OS


@pytest.mark.parametrize("has_malloc_trim", [True, False])
async def test_heap_upkeep_collects_garbage_with_or_without_malloc_trim(
    monkeypatch: pytest.MonkeyPatch, has_malloc_trim: bool
) -> None:
    """A round's full collection frees cyclic garbage on every platform, then trims on glibc."""
    trims: list[int] = []
    trimmed = asyncio.Event()

    def trim(pad: int) -> int:
        trims.append(pad)
        trimmed.set()
        return 0

    monkeypatch.setattr(runtime, "HEAP_UPKEEP_INTERVAL", 0.01)
    monkeypatch.setattr(runtime, "malloc_trim", lambda: trim if has_malloc_trim else None)
    gc.disable()  # only the upkeep may collect during the test
    garbage = weakref.ref(Cycle())  # unreachable at once, freed only by a collection
    assert garbage() is not None

    async def main() -> None:
        while garbage() is not None or (has_malloc_trim and not trimmed.is_set()):
            await asyncio.sleep(0.005)

    async with asyncio.timeout(5):
        await runtime.heap_upkeep(main())
    assert garbage() is None
    assert trims == ([0] * len(trims) if has_malloc_trim else [])
    assert bool(trims) == has_malloc_trim


@pytest.mark.parametrize("burst_ends", [True, False])
async def test_heap_upkeep_waits_for_a_burst_but_not_for_ever(
    monkeypatch: pytest.MonkeyPatch, burst_ends: bool
) -> None:
    """A round due during a burst waits for it to pass, but no longer than one interval."""
    monkeypatch.setattr(runtime, "HEAP_UPKEEP_INTERVAL", 0.05)
    monkeypatch.setattr(runtime, "UPKEEP_BUSY_POLL", 0.01)
    monkeypatch.setattr(runtime, "UPKEEP_BUSY_TASKS", 20)
    monkeypatch.setattr(runtime, "malloc_trim", lambda: None)
    gc.disable()
    garbage = weakref.ref(Cycle())
    collected_during_burst: list[bool] = []

    async def main() -> None:
        release = asyncio.Event()
        in_flight = [asyncio.create_task(release.wait()) for _ in range(30)]
        if burst_ends:
            await asyncio.sleep(0.08)  # the first round falls due (0.05) in the burst
        else:
            while garbage() is not None:  # a burst that never ends must not block upkeep
                await asyncio.sleep(0.005)
        collected_during_burst.append(garbage() is None)
        release.set()
        await asyncio.gather(*in_flight)
        while garbage() is not None:
            await asyncio.sleep(0.005)

    async with asyncio.timeout(5):
        await runtime.heap_upkeep(main())
    assert collected_during_burst == [not burst_ends]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_tune_malloc_sets_the_mmap_threshold_where_glibc_is() -> None:
    """mallopt accepts the threshold (returns 1); elsewhere tune_malloc does nothing."""
    assert runtime.malloc_trim() is not None
    runtime.tune_malloc()  # raises nothing, and the suite's allocations go on as before
    mallopt = runtime.ctypes.CDLL(None).mallopt
    assert mallopt(runtime.M_MMAP_THRESHOLD, runtime.MMAP_THRESHOLD) == 1
