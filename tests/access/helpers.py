"""Keys for tests: created in an app's own access store, as `sia keys create` would."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sia.access.base import ApiKey, KeyLimits
from sia.access.keys import SHOWN_CHARS, hash_key, new_key
from sia.domain import utcnow

if TYPE_CHECKING:
    from sia.access.base import AccessStore
    from sia.app import App


async def create_key(
    store: AccessStore, name: str, *, models: frozenset[str] = frozenset(), **limits: Any
) -> str:
    """Store a new key called `name` with `limits` (KeyLimits fields); return the key."""
    key = new_key()
    await store.add_key(
        ApiKey(
            name=name,
            key_hash=hash_key(key),
            prefix=key[:SHOWN_CHARS],
            created_at=utcnow(),
            limits=KeyLimits(**limits),
            models=models,
        )
    )
    return key


async def app_key(app: App, name: str, **options: Any) -> str:
    """A key of `app`'s store that the running app already knows."""
    key = await create_key(app.access.store, name, **options)
    await app.access.keys.refresh()
    return key


def bearer(key: str) -> tuple[tuple[str, str]]:
    """The call metadata that presents `key`."""
    return (("authorization", f"Bearer {key}"),)
