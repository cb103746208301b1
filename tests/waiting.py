"""Waiting in tests for something another task does, failing by assertion, not by hanging."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


async def within(awaitable: Awaitable[T], failure: str, timeout: float = 10) -> T:
    """Await `awaitable`; fail the test with `failure` if it has not ended within `timeout` s."""
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            return await awaitable
    except TimeoutError:
        if deadline.expired():
            pytest.fail(failure)
        raise


async def until(condition: Callable[[], bool], failure: str, timeout: float = 10) -> None:
    """Poll until `condition()` holds; fail the test with `failure` if it has not in time."""

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.005)

    await within(poll(), failure, timeout)
