"""Constants and helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

from collections.abc import Callable

from sia.config import Settings

#: Small enough to render fast, large enough for Seedream 4.0's minimum.
TEST_SIZE = "1280x720"

#: The make_settings fixture: keyword overrides to Settings.
MakeSettings = Callable[..., Settings]

#: The log_config fixture: `log_config(level, format="json")`.
LogConfig = Callable[..., None]
