"""Logging: configured once, one JSON object per line on stdout.

Request and task ids are bound per call with `bind_contextvars` and appear on
every line logged while the call runs. Standard-library loggers (grpc,
aiohttp, asyncio) go through the same renderer, so the whole process speaks
one format.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from typing import TYPE_CHECKING, Any

import orjson
import structlog

if TYPE_CHECKING:
    from structlog.typing import EventDict, Processor, WrappedLogger

_SECRET_WORDS = ("api_key", "apikey", "authorization", "password", "secret", "token")
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


def _logger_name(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Show the name bound by get_logger as `logger` (structlog reserves that keyword)."""
    if "logger_name" in event_dict:
        event_dict["logger"] = event_dict.pop("logger_name")
    return event_dict


@functools.lru_cache(maxsize=4096)
def _is_secret(key: str) -> bool:
    """True for a field name that says it holds a secret (names come from code: few, cached)."""
    lowered = key.lower()
    return key != "output_tokens" and any(word in lowered for word in _SECRET_WORDS)


def _redact(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Mask any field whose name says it holds a secret."""
    for key in event_dict:
        if _is_secret(key):
            event_dict[key] = "***"
    return event_dict


def _dumps(obj: Any, **kw: Any) -> str:
    """JSON by orjson (several times faster than json.dumps), or by json for what it refuses."""
    try:
        return orjson.dumps(obj, **kw).decode()
    except TypeError:  # integers beyond 64 bits, keys that are not strings
        return json.dumps(obj, **kw)


def configure_logging(level: str = "info", fmt: str = "json", *, cache: bool = True) -> None:
    """Set up structlog and the standard library's root logger; safe to call again.

    `cache=False` lets a later reconfiguration (or structlog.testing.capture_logs)
    reach loggers already in use; tests want that, servers want the speed.
    """
    numeric = _LEVELS.get(level, logging.ERROR)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _logger_name,
        _redact,
    ]
    renderer: Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.dict_tracebacks if fmt == "json" else _noop,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # No file given: each logger writes to sys.stdout as it is when the logger is made.
        logger_factory=structlog.WriteLoggerFactory(),
        cache_logger_on_first_use=cache,
    )

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.INFO) if numeric > logging.DEBUG else numeric)
    # aiohttp's access log duplicates our access lines, aiosqlite logs every
    # statement and saq every job: keep them quiet whatever LOG_LEVEL says.
    for name in ("aiohttp.access", "aiosqlite", "saq"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _noop(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    return event_dict


def get_logger(name: str) -> Any:
    """A structlog logger whose lines carry `logger=name`.

    The logger stays lazy, so module-level loggers follow configure_logging.
    """
    return structlog.get_logger(logger_name=name)
