"""What both access stores share: the JSON form of a key, usage merging, fault translation.

A key is stored as JSON (Redis keeps it whole; SQLite keeps its limits and
models as JSON columns). Datetimes are ISO 8601 in UTC, as the task codec
writes them; models are a sorted list. Nothing secret is stored: a key is
only its SHA-256 and its first characters.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

from sia.access.base import ApiKey, KeyLimits, UsageEntry
from sia.tasks.codec import from_iso, to_iso

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from datetime import date


#: The counters of a UsageEntry, in the order the stores keep them.
COUNTERS = ("requests", "images", "output_tokens", "cost_micros")
_LIMITS = tuple(f.name for f in dataclasses.fields(KeyLimits))


def limits_to_json(limits: KeyLimits) -> str:
    """The stored form of `limits`: an object holding only the limits that are set."""
    return json.dumps(_limits_dict(limits), sort_keys=True)


def limits_from_json(text: str) -> KeyLimits:
    """The limits stored as `text` by `limits_to_json`."""
    return _limits(json.loads(text))


def models_to_json(models: Iterable[str]) -> str:
    """The stored form of a key's models: a sorted list."""
    return json.dumps(sorted(models))


def models_from_json(text: str) -> frozenset[str]:
    """The models stored as `text` by `models_to_json`."""
    return _models(json.loads(text))


def key_to_json(key: ApiKey) -> str:
    """The stored form of `key`: its hash and prefix, never the key itself."""
    return json.dumps(
        {
            "name": key.name,
            "key_hash": key.key_hash,
            "prefix": key.prefix,
            "created_at": to_iso(key.created_at),
            "revoked_at": None if key.revoked_at is None else to_iso(key.revoked_at),
            "limits": _limits_dict(key.limits),
            "models": sorted(key.models),
        },
        sort_keys=True,
    )


def key_from_json(text: str) -> ApiKey:
    """The key stored as `text` by `key_to_json`; ValueError if it is not one."""
    try:
        data = json.loads(text)
        revoked_at = data.get("revoked_at")
        return ApiKey(
            name=data["name"],
            key_hash=data["key_hash"],
            prefix=data["prefix"],
            created_at=from_iso(data["created_at"]),
            limits=_limits(data.get("limits") or {}),
            models=_models(data.get("models") or []),
            revoked_at=None if revoked_at is None else from_iso(revoked_at),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a stored API key: {text[:200]!r}") from exc


def merge_usage(entries: Sequence[UsageEntry]) -> dict[tuple[str, str, date], tuple[int, ...]]:
    """The counts of `entries` summed per (key, model, day), in COUNTERS order.

    An entry that adds nothing is left out, so both stores keep the same rows.
    """
    merged: dict[tuple[str, str, date], tuple[int, ...]] = {}
    for entry in entries:
        counts = tuple(getattr(entry, counter) for counter in COUNTERS)
        if not any(counts):
            continue
        slot = (entry.key, entry.model, entry.day)
        before = merged.get(slot, (0,) * len(COUNTERS))
        merged[slot] = tuple(a + b for a, b in zip(before, counts, strict=True))
    return merged


def _limits_dict(limits: KeyLimits) -> dict[str, int]:
    return {name: value for name in _LIMITS if (value := getattr(limits, name)) is not None}


def _limits(data: dict[str, Any]) -> KeyLimits:
    # Limits a later version added are ignored rather than refused.
    return KeyLimits(**{name: data[name] for name in _LIMITS if data.get(name) is not None})


def _models(data: list[str]) -> frozenset[str]:
    return frozenset(str(model) for model in data)
