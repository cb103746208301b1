"""API keys: how they are made, named and recognised, and the in-memory key ring.

A key is `sia_` and 43 URL-safe characters (256 random bits). Only its
SHA-256 is stored: a key has far too much entropy to guess from its hash, so
a slow password hash would only cost CPU on every call. `KeyRing` holds the
active keys by hash; the gate reloads it from the access store every
KEYS_REFRESH_INTERVAL seconds, so a key created or revoked on any replica (or
by `sia keys`) takes effect everywhere within that interval.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import TYPE_CHECKING, Literal

from sia.errors import InvalidArgument, Unauthenticated
from sia.logs import get_logger

if TYPE_CHECKING:
    from sia.access.base import AccessStore, ApiKey

log = get_logger("sia.access")

PREFIX = "sia_"
#: Characters of a key shown in listings: the prefix and 8 of the random part.
SHOWN_CHARS = len(PREFIX) + 8
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_BEARER = "bearer "

AuthMode = Literal["auto", "keys", "none"]


def new_key() -> str:
    """A fresh API key: `sia_` and 256 random bits, URL-safe base64."""
    return PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The stored form of a key: SHA-256, hex."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def check_name(name: str) -> str:
    """`name` when it is a valid key name (it labels metrics and log lines)."""
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidArgument.field(
            "name", "1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name


def bearer(value: str | None) -> str | None:
    """The token of an `authorization: Bearer <token>` value, else None."""
    if value is None or value[:7].lower() != _BEARER:
        return None
    token = value[7:].strip()
    return token or None


class KeyRing:
    """The keys callers may present, by hash, refreshed from the store.

    `enforcing` says whether calls need a key: always with AUTH_MODE=keys,
    never with `none`, and with `auto` once the store holds any key (a
    revoked one counts, so revoking the last key never opens the service).
    """

    def __init__(self, store: AccessStore, mode: AuthMode = "auto") -> None:
        self.store = store
        self.mode = mode
        self._active: dict[str, ApiKey] = {}
        self._names: dict[str, ApiKey] = {}
        self._any = False
        self.loaded = False

    @property
    def enforcing(self) -> bool:
        """True when a call without a valid key is refused."""
        if self.mode == "auto":
            return self._any
        return self.mode == "keys"

    @property
    def active(self) -> list[ApiKey]:
        """The keys that are not revoked, as last loaded."""
        return list(self._active.values())

    async def refresh(self) -> None:
        """Reload every key from the store (raises what the store raises)."""
        keys = await self.store.keys()
        active = {key.key_hash: key for key in keys if not key.revoked}
        if self.loaded and active.keys() != self._active.keys():
            log.info("api_keys_changed", active=len(active), total=len(keys))
        self._active, self._any, self.loaded = active, bool(keys), True
        self._names = {key.name: key for key in active.values()}

    def by_name(self, name: str) -> ApiKey | None:
        """The active key called `name`, as last loaded."""
        return self._names.get(name)

    def authenticate(self, authorization: str | None) -> ApiKey | None:
        """The key presented in `authorization` (a metadata or header value).

        None when keys are not enforced and none (or no valid one) was given;
        raises Unauthenticated, one message for every case, when they are.
        """
        token = bearer(authorization)
        if token is not None and token.startswith(PREFIX):
            digest = hash_key(token)
            found = self._active.get(digest)
            # The dict finds the candidate by hash; the compare is constant-time anyway.
            if found is not None and hmac.compare_digest(found.key_hash, digest):
                return found
        if self.enforcing:
            raise Unauthenticated
        return None

    def __repr__(self) -> str:
        return f"KeyRing(mode={self.mode!r}, active={len(self._active)})"
