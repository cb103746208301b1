"""The in-memory sliding windows, on a clock the test moves."""

from __future__ import annotations

import pytest

from sia.access import limits
from sia.access.limits import MemoryWindows

START = 1_800_000_000.0  # on a minute boundary


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The time limits.py sees: set `clock[0]`."""
    now = [START]
    monkeypatch.setattr(limits.time, "time", lambda: now[0])
    return now


async def test_n_pass_then_the_next_waits_for_the_window(clock: list[float]) -> None:
    windows = MemoryWindows()
    clock[0] = START + 15
    assert [await windows.hit(3, 1, "k") for _ in range(3)] == [None] * 3
    retry = await windows.hit(3, 1, "k")
    # Not before this minute ends (45 s): then 3 weighted by what is left floors to 2.
    assert retry == pytest.approx(45, abs=0.1)
    assert await windows.hit(3, 1, "other") is None  # windows are per name


async def test_the_last_minute_counts_by_what_is_left_of_it(clock: list[float]) -> None:
    windows = MemoryWindows()
    for _ in range(4):
        assert await windows.hit(4, 1, "k") is None
    clock[0] = START + 60 + 15  # 3/4 of the last minute still counts: floor(3.0) = 3
    assert await windows.hit(4, 1, "k") is None
    retry = await windows.hit(4, 1, "k")
    # 3 + 1 in use, room for 3: the last minute's share (4 x 45/60 = 3) must fall below
    # 3, which it does a moment later.
    assert retry == pytest.approx(0.05)
    clock[0] = START + 60 + 16
    assert await windows.hit(4, 1, "k") is None
    assert await windows.hit(4, 1, "k") is not None


async def test_a_minute_long_gone_counts_nothing(clock: list[float]) -> None:
    windows = MemoryWindows()
    for _ in range(2):
        await windows.hit(2, 1, "k")
    clock[0] = START + 180
    assert [await windows.hit(2, 1, "k") for _ in range(2)] == [None, None]


async def test_a_cost_takes_that_many(clock: list[float]) -> None:
    windows = MemoryWindows()
    assert await windows.hit(10, 7, "k") is None
    assert await windows.hit(10, 4, "k") is not None
    assert await windows.hit(10, 3, "k") is None
