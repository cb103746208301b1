"""`sia keys create|list|revoke` and `sia usage`: the operator's side of access control.

They read the same settings as `sia serve` and open the same access store
(`factory.build_access_store`), so a key created here reaches a running server (every
replica) within KEYS_REFRESH_INTERVAL seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import defaultdict
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sia.access.base import MICROS, ApiKey, KeyLimits
from sia.access.factory import build_access_store
from sia.access.keys import SHOWN_CHARS, check_name, hash_key, new_key
from sia.access.usage import today
from sia.domain import utcnow
from sia.errors import ConfigError, SiaError

#: Largest budget accepted, in the currency unit (a typo guard, not a policy).
MAX_AMOUNT = 1e12

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sia.access.base import AccessStore
    from sia.config import Settings


def add_commands(commands: Any, settings: Callable[[], Settings]) -> None:
    """Add `keys` and `usage` to the `sia` command's sub-parsers."""
    keys = commands.add_parser("keys", help="manage client API keys (docs/access-control.md)")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key and print it (shown only once)")
    create.add_argument("--name", required=True, help="a unique name; labels logs and metrics")
    create.add_argument("--rpm", type=_positive, help="requests per minute")
    create.add_argument("--ipm", type=_positive, help="images per minute")
    create.add_argument("--concurrency", type=_positive, help="generations at a time")
    create.add_argument("--images-per-day", type=_positive, help="images per UTC day")
    create.add_argument("--budget-per-day", type=_amount, help="spend per UTC day")
    create.add_argument("--budget-per-month", type=_amount, help="spend per UTC month")
    create.add_argument("--models", type=_models, default=frozenset(), help="M1,M2 (all if unset)")
    create.set_defaults(run=_create)
    listing = actions.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--json", action="store_true", help="one JSON object per key")
    listing.set_defaults(run=_list)
    revoke = actions.add_parser("revoke", help="revoke a key (refused within seconds)")
    revoke.add_argument("name")
    revoke.set_defaults(run=_revoke)
    usage = commands.add_parser("usage", help="usage and estimated spend per key and model")
    usage.add_argument("--key", help="only this key")
    usage.add_argument("--month", action="store_true", help="this month (default: today)")
    usage.add_argument("--days", type=_positive, help="the last N days, today included")
    usage.add_argument("--json", action="store_true", help="one JSON object per row")
    usage.set_defaults(run=_usage)
    for parser in (create, listing, revoke, usage):
        parser.set_defaults(func=lambda args: _run(settings, args.run, args))


def _run(
    settings: Callable[[], Settings],
    command: Callable[[AccessStore, argparse.Namespace, Settings], Awaitable[None]],
    args: argparse.Namespace,
) -> int:
    """Open the store of the settings, run `command`, and map errors to exit codes."""
    try:
        loaded = settings()
        store = build_access_store(loaded)

        async def main() -> None:
            await store.open()
            try:
                await command(store, args, loaded)
            finally:
                await store.aclose()

        asyncio.run(main())
    except SiaError as exc:
        print(f"sia: {exc.message}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    return 0


async def _create(store: AccessStore, args: argparse.Namespace, settings: Settings) -> None:
    key = new_key()
    limits = KeyLimits(
        requests_per_minute=args.rpm,
        images_per_minute=args.ipm,
        concurrency=args.concurrency,
        images_per_day=args.images_per_day,
        budget_per_day_micros=args.budget_per_day,
        budget_per_month_micros=args.budget_per_month,
    )
    record = ApiKey(
        name=check_name(args.name),
        key_hash=hash_key(key),
        prefix=key[:SHOWN_CHARS],
        created_at=utcnow(),
        limits=limits,
        models=args.models,
    )
    await store.add_key(record)
    print(key)
    print(
        f"created key {record.name!r}: this is the only time it is shown; "
        f"servers accept it within {settings.keys_refresh_interval:g} s",
        file=sys.stderr,
    )


async def _list(store: AccessStore, args: argparse.Namespace, settings: Settings) -> None:
    keys = await store.keys()
    rows = [_describe(key, settings.price_currency) for key in keys]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    if not rows:
        print("no keys: the server runs open in development (sia keys create --name NAME)")
        return
    _table(rows, ("name", "prefix", "created", "revoked", "limits", "models"))


async def _revoke(store: AccessStore, args: argparse.Namespace, settings: Settings) -> None:
    key = await store.revoke_key(args.name, utcnow())
    print(
        f"revoked key {key.name!r}; servers refuse it within {settings.keys_refresh_interval:g} s",
        file=sys.stderr,
    )


async def _usage(store: AccessStore, args: argparse.Namespace, settings: Settings) -> None:
    last = today()
    first = last.replace(day=1) if args.month else last - timedelta(days=(args.days or 1) - 1)
    totals: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for entry in await store.usage(args.key, first, last):
        counts = totals[entry.key, entry.model]
        for index, value in enumerate(
            (entry.requests, entry.images, entry.output_tokens, entry.cost_micros)
        ):
            counts[index] += value
    rows = [
        {
            "key": key,
            "model": model,
            "requests": requests,
            "images": images,
            "output_tokens": tokens,
            "cost": round(micros / MICROS, 6),
            "currency": settings.price_currency,
        }
        for (key, model), (requests, images, tokens, micros) in sorted(totals.items())
    ]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"usage from {first} to {last} (UTC)")
    if rows:
        _table(rows, ("key", "model", "requests", "images", "output_tokens", "cost", "currency"))
    else:
        print("nothing used")


def _describe(key: ApiKey, currency: str) -> dict[str, Any]:
    limits = {
        name.removesuffix("_micros"): (
            f"{value / MICROS:g} {currency}" if name.endswith("_micros") else value
        )
        for name, value in (
            ("rpm", key.limits.requests_per_minute),
            ("ipm", key.limits.images_per_minute),
            ("concurrency", key.limits.concurrency),
            ("images_per_day", key.limits.images_per_day),
            ("budget_per_day_micros", key.limits.budget_per_day_micros),
            ("budget_per_month_micros", key.limits.budget_per_month_micros),
        )
        if value is not None
    }
    return {
        "name": key.name,
        "prefix": key.prefix + "…",
        "created": key.created_at.isoformat(timespec="seconds"),
        "revoked": key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else "",
        "limits": ", ".join(f"{name}={value}" for name, value in limits.items()) or "none",
        "models": ",".join(sorted(key.models)) or "all",
    }


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    widths = [max(len(column), *(len(str(row[column])) for row in rows)) for column in columns]
    print(
        "  ".join(
            column.upper().ljust(width) for column, width in zip(columns, widths, strict=True)
        )
    )
    for row in rows:
        print(
            "  ".join(str(row[c]).ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()
        )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _amount(text: str) -> int:
    """A money amount, as micros."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an amount: {text!r}") from None
    if not 0 < value <= MAX_AMOUNT:  # also refuses NaN
        raise argparse.ArgumentTypeError("must be a positive amount")
    return round(value * MICROS)


def _models(text: str) -> frozenset[str]:
    return frozenset(model.strip() for model in text.split(",") if model.strip())
