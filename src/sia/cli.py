"""The `sia` command: `sia serve` runs the service, `sia fake-ark` a fake upstream.

`sia serve` runs on uvloop where it is installed. The cyclic GC runs as a full
collection every HEAP_UPKEEP_INTERVAL seconds rather than every few thousand
allocations (see GC_YOUNG_THRESHOLD). On glibc it also keeps its heap lean: it
runs under PYTHONMALLOC=malloc (re-executing itself once, same PID, unless
PYTHONMALLOC is set) and gives freed heap pages back to the OS after each of
those collections with malloc_trim. Python's own allocator
keeps 1 MiB arenas that a few long-lived objects pin after a burst; in glibc's
heap the pages around them can be returned. Measured with bench/ (2,000
concurrent calls): RSS a minute later is 1.13x to 1.19x idle instead of 1.6x,
at no measurable cost per call. PYTHONMALLOC=pymalloc opts out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import os
import sys
from typing import TYPE_CHECKING, Any

from sia import __version__
from sia.config import load_settings
from sia.errors import ConfigError
from sia.logs import configure_logging, get_logger

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

log = get_logger("sia.cli")

#: Seconds between two rounds of heap upkeep: a full GC collection, then malloc_trim on
#: glibc (under 20 ms). Cyclic garbage, 5 small objects per call (grpc.aio's handler
#: lookup, `_find_method_handler`, interceptors or not; roughly 400 bytes), lives until
#: the next round: 8 MiB at 1,000 calls/s.
HEAP_UPKEEP_INTERVAL = 20.0
#: While more asyncio tasks than this are alive (a burst in flight: gRPC keeps two per
#: call), an upkeep round waits, looking again every UPKEEP_BUSY_POLL seconds, for up to
#: HEAP_UPKEEP_INTERVAL more: a full collection then walks every waiting call (0.15 to
#: 0.19 s for 2,000 on a 2-core VM) and frees none of them.
UPKEEP_BUSY_TASKS = 1_000
UPKEEP_BUSY_POLL = 0.5
#: Net container allocations that start a young-generation collection between two rounds
#: of upkeep (Python's default is 700): a backstop, not the schedule. A call in flight
#: holds some 50 to 100 tracked objects (tasks, coroutines, gRPC and aiohttp state), so
#: a burst of 2,000 calls holds 100,000 to 200,000 of them while it waits on the
#: upstream, and any lower threshold traverses the burst again and again (bench target
#: 5, 2-core VM: with 700 collections took 8.6 % of its CPU; with 10,000 warm bursts took
#: 3.5 to 3.8 s and 2.3 to 2.5 s of CPU; with 200,000, which a burst could still reach on
#: top of what earlier ones left, 2.9 to 3.8 s; with 500,000 and upkeep rounds that wait
#: for bursts to pass, 3.0 to 3.4 s and 1.7 to 2.1 s). A young collection this size would
#: hold the event loop for about 0.3 s.
GC_YOUNG_THRESHOLD = 500_000


def _serve(_: argparse.Namespace) -> int:
    from sia.app import serve  # noqa: PLC0415 - keeps `sia --help` fast

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"sia: configuration error: {exc.message}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    tune_gc()
    if settings.provider == "offline":
        log.warning(
            "offline_provider",
            message="no IMAGE_API_KEY set: images are rendered locally by the offline provider",
        )
    try:
        run(_heap_upkeep(serve(settings)))
    except ConfigError as exc:
        log.error("startup_failed", error=exc.message)
        print(f"sia: configuration error: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        log.error("startup_failed", error=str(exc))
        return 1
    return 0


def tune_gc() -> None:
    """Freeze what start-up made and collect the young generation less often.

    What is alive now (modules, descriptors, settings) lives as long as the
    process: kept out of the cyclic GC's way, a full collection takes
    milliseconds, not 100. See GC_YOUNG_THRESHOLD for the threshold.
    """
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` to completion on uvloop, or on asyncio's own loop where uvloop is missing.

    uvloop takes some 10 to 20 % less CPU per call off the event loop, which
    runs the gRPC handlers and the upstream client alike (see bench/).
    """
    try:
        import uvloop  # noqa: PLC0415 - optional: not built for every platform
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the symbols already loaded: the C library's
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


async def _heap_upkeep(main: Coroutine[Any, Any, None]) -> None:
    """Await `main`; meanwhile collect cyclic garbage and give freed heap pages back."""
    trim = malloc_trim()

    async def upkeep_forever() -> None:
        while True:
            await asyncio.sleep(HEAP_UPKEEP_INTERVAL)
            waited = 0.0
            while len(asyncio.all_tasks()) > UPKEEP_BUSY_TASKS and waited < HEAP_UPKEEP_INTERVAL:
                await asyncio.sleep(UPKEEP_BUSY_POLL)
                waited += UPKEEP_BUSY_POLL
            gc.collect()  # a full collection also empties the interpreter's free lists
            if trim is not None:
                await asyncio.to_thread(trim, 0)  # ctypes lets go of the GIL meanwhile

    upkeep = asyncio.create_task(upkeep_forever(), name="sia-heap-upkeep")
    try:
        await main
    finally:
        upkeep.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await upkeep


def _exec_with_malloc_heap() -> None:
    """Run this command again under PYTHONMALLOC=malloc, unless set or useless (no glibc)."""
    if "PYTHONMALLOC" in os.environ or malloc_trim() is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    env = {**os.environ, "PYTHONMALLOC": "malloc"}
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)  # noqa: S606 - ourselves


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its sub-commands."""
    parser = argparse.ArgumentParser(prog="sia", description="SIA image-generation service")
    parser.add_argument("--version", action="version", version=f"sia {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC and HTTP servers (settings from env)")
    serve.set_defaults(func=_serve)
    # Listed for --help; main() hands its arguments to the fake's own parser.
    commands.add_parser(
        "fake-ark", help="run a fake Volcengine Ark API on loopback (`sia fake-ark --help`)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sia` console script (argv None: this process's command line)."""
    own_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fake-ark"]:
        from sia.testing import fake_ark  # noqa: PLC0415 - only this command needs it

        fake_ark.main(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    if own_command_line and args.command == "serve":
        _exec_with_malloc_heap()  # returns only where it does not apply
    code: int = args.func(args)
    return code
