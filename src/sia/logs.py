"""Logging: configured once, one JSON object per line on stdout.

The id of the RPC being served (`REQUEST_ID`, set by the gRPC interceptor)
and the task ids that task runners bind with `bound_contextvars` appear on
every line logged meanwhile. Standard-library loggers (grpc, aiohttp,
asyncio) go through the same renderer and the same output, so the whole
process speaks one format, in order. The one access line per RPC
(`AccessLog`) is rendered without the processor chain, to the same shape.
Exception traces carry frames (file, line, function) but never their local
variables, which may hold prompts or URLs.

Lines written on an event loop leave together every FLUSH_INTERVAL rather
than one by one (`LineOutput`): under load one write(2) carries the access
lines of every call that finished meanwhile, and a crash can lose only the
lines of the last interval.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import json
import logging
import sys
import threading
import time
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import orjson
import structlog

if TYPE_CHECKING:
    from structlog.typing import EventDict, Processor, WrappedLogger

#: The id of the RPC being served: `request_id` on every line logged while it runs.
REQUEST_ID: ContextVar[str | None] = ContextVar("sia_request_id", default=None)
#: The name of the API key that made the call being served: `key_name` on its lines.
KEY_NAME: ContextVar[str | None] = ContextVar("sia_key_name", default=None)

_SECRET_WORDS = ("api_key", "apikey", "authorization", "password", "secret", "token")
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
#: The levels an access line may have, from its call's status.
ACCESS_LEVELS = ("info", "warning", "error")


def _request_id(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """`request_id`: the RPC being served, if any (a plain ContextVar, cheaper per call
    than structlog's context)."""
    request_id = REQUEST_ID.get()
    if request_id is not None:
        event_dict.setdefault("request_id", request_id)
        key_name = KEY_NAME.get()
        if key_name is not None:
            event_dict.setdefault("key_name", key_name)
    return event_dict


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


def _timestamp(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """`timestamp`: UTC, ISO 8601 with microseconds and a Z, like TimeStamper(fmt="iso", utc=True).

    The date and time of day are formatted once per second; each line adds only
    its microseconds (a quarter of the cost of datetime.isoformat per line).
    """
    second, micros = divmod(round(time.time() * 1_000_000), 1_000_000)
    event_dict["timestamp"] = f"{_second_prefix(second)}.{micros:06d}Z"
    return event_dict


@functools.lru_cache(maxsize=2)
def _second_prefix(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


#: Seconds a line written on an event loop may wait for the lines after it: under load a
#: loop iteration finishes about one call, so a flush per iteration is a write(2) per line.
FLUSH_INTERVAL = 0.01


class LineOutput:
    """Writes rendered lines to sys.stdout (as it is when they leave).

    On an event loop, lines wait here and leave together FLUSH_INTERVAL after
    the first of them: one write and one flush, whatever stdout's own
    buffering (with PYTHONUNBUFFERED=1, which many container set-ups add,
    stdout itself makes a system call per write). Elsewhere (start-up, worker
    threads) each line leaves at once, taking any still waiting with it.
    Lines left waiting by a loop that closed first leave with the next line
    written, or at exit.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: list[str] = []
        self._flush_on: asyncio.AbstractEventLoop | None = None
        self._flush_thread = 0
        atexit.register(self.flush)

    def write(self, line: str) -> None:
        """Write one line (without its newline)."""
        with self._lock:
            self._waiting.append(line)
            pending = self._flush_on
            if (
                pending is not None
                and self._flush_thread == threading.get_ident()
                and not pending.is_closed()
            ):
                return  # this thread's loop writes them shortly
        # On Python 3.11 get_running_loop() costs a getpid() system call, hence the check above.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._flush_on, self._flush_thread = loop, threading.get_ident()
        loop.call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        """Write every waiting line now."""
        with self._lock:
            self._flush_on = None
            if not self._waiting:
                return
            text = "\n".join(self._waiting) + "\n"
            self._waiting.clear()
            stream = sys.stdout
            # Closed (tests swap stdout) or broken (a log collector gone): the lines are
            # lost, but a log line never fails the call that wrote it.
            with contextlib.suppress(ValueError, OSError):
                stream.write(text)
                stream.flush()


class _OutputHandler(logging.Handler):
    """The standard library's records, rendered by structlog, out through the same LineOutput."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            OUTPUT.write(self.format(record))
        except Exception:  # logging's own convention: report, never raise
            self.handleError(record)


class _LineLogger:
    """structlog's logger: every level writes its rendered line to the shared output."""

    def __init__(self, output: LineOutput) -> None:
        self._output = output

    def msg(self, message: str) -> None:
        """Write one rendered line."""
        self._output.write(message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


#: The process's one log output (structlog's loggers all write through it).
OUTPUT = LineOutput()
_LOGGER = _LineLogger(OUTPUT)


def _dumps(obj: Any, **kw: Any) -> str:
    """JSON by orjson (several times faster than json.dumps), or by json for what it refuses."""
    try:
        return orjson.dumps(obj, **kw).decode()
    except TypeError:  # integers beyond 64 bits, keys that are not strings
        return json.dumps(obj, **kw)


class AccessLog:
    """The line written for every served RPC, without the processor chain.

    In JSON format the line is built here: its fields, then `event`,
    `request_id`, `level`, `timestamp` and `logger`, the shape structlog
    gives every other line (tests/test_logs.py compares the two). The chain
    (context merge, level, timestamp, name, redaction, stack and traceback
    renderers) is a noticeable share of SIA's own work per GenerateImage, and
    an access line needs none of it but the timestamp. Its fields must
    therefore hold no secrets (no redaction here).
    `level` is one of ACCESS_LEVELS (the caller picks it from the status);
    lines below LOG_LEVEL are not written. With LOG_FORMAT=console the line
    goes through structlog.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._log = get_logger(name)

    def __call__(self, event: str, level: str = "info", /, **fields: Any) -> None:
        """Write the line for `event` with `fields` at `level`."""
        # One lookup decides both whether the level is written and how.
        mode = _ACCESS[level]
        if mode != "json":
            if mode == "structlog":
                getattr(self._log, level)(event, **fields)
            return
        fields["event"] = event
        request_id = REQUEST_ID.get()
        if request_id is not None:
            fields["request_id"] = request_id
            key_name = KEY_NAME.get()
            if key_name is not None:
                fields["key_name"] = key_name
        fields["level"] = level
        _timestamp(None, level, fields)
        fields["logger"] = self.name
        OUTPUT.write(_dumps(fields))


#: How AccessLog writes each level: "json" (built directly), "structlog" or "off" (LOG_LEVEL).
_ACCESS = dict.fromkeys(ACCESS_LEVELS, "structlog")

#: Exception traces as data, without frame locals (prompts, URLs, request bodies).
_tracebacks = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


def configure_logging(level: str = "info", fmt: str = "json", *, cache: bool = True) -> None:
    """Set up structlog and the standard library's root logger; safe to call again.

    `cache=False` lets a later reconfiguration (or structlog.testing.capture_logs)
    reach loggers already in use; tests want that, servers want the speed.
    """
    numeric = _LEVELS.get(level, logging.ERROR)
    for name in ACCESS_LEVELS:
        written = _LEVELS.get(name, logging.ERROR) >= numeric
        _ACCESS[name] = ("json" if fmt == "json" else "structlog") if written else "off"
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        _request_id,
        structlog.processors.add_log_level,
        _timestamp,
        _logger_name,
        _redact,
    ]
    renderer: Processor
    if fmt == "console":
        # Pinned: the defaults when rich or better-exceptions is installed print locals.
        renderer = structlog.dev.ConsoleRenderer(
            colors=sys.stdout.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
    tracebacks = _tracebacks if fmt == "json" else _noop
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), tracebacks, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_: _LOGGER,
        cache_logger_on_first_use=cache,
    )

    handler = _OutputHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                tracebacks,
                renderer,
            ],
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
