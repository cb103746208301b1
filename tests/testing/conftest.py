"""Fixtures shared by the fakes' tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp
import pytest

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for driving a fake over loopback HTTP."""
    async with aiohttp.ClientSession() as client:
        yield client
