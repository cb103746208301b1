"""How the `sia serve` process runs: event loop, garbage collection, heap.

- `run` drives the server on uvloop where it is installed (less CPU per
  call than asyncio's own loop), else on asyncio's.
- `tune_gc` freezes what start-up made and raises the young-generation
  threshold: a burst of waiting calls holds hundreds of thousands of tracked
  objects, and frequent young collections would walk them again and again.
- `heap_upkeep` instead runs a full collection every HEAP_UPKEEP_INTERVAL
  seconds (waiting while a burst is in flight), then `malloc_trim` on glibc
  so freed pages go back to the OS.
- `tune_malloc` gives payloads above MMAP_THRESHOLD mappings of their own,
  so a rejected oversized request returns its memory at once.
- `exec_with_malloc_heap` re-executes the command once under
  PYTHONMALLOC=malloc on glibc: pymalloc's arenas stay pinned by a few
  long-lived objects after a burst, while glibc's heap can be trimmed.
  Setting PYTHONMALLOC (for example to pymalloc) opts out.

bench/README.md tells how these settings were chosen.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

#: Seconds between two rounds of heap upkeep; cyclic garbage lives until the next round.
HEAP_UPKEEP_INTERVAL = 20.0
#: More live asyncio tasks than this means a burst is in flight (gRPC keeps two per call):
#: a round then waits, looking again every UPKEEP_BUSY_POLL seconds, for up to one more
#: interval, since a full collection would walk every waiting call and free none of them.
UPKEEP_BUSY_TASKS = 1_000
UPKEEP_BUSY_POLL = 0.5
#: Net allocations that start a young collection between rounds: a backstop above what a
#: burst of a few thousand calls holds, not the schedule.
GC_YOUNG_THRESHOLD = 500_000
#: Bytes from which glibc serves an allocation from its own mapping (see `tune_malloc`).
MMAP_THRESHOLD = 8 * 1024 * 1024
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` to completion on uvloop, or on asyncio's own loop where uvloop is missing."""
    try:
        import uvloop  # noqa: PLC0415 - optional: not built for every platform
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def tune_gc() -> None:
    """Freeze what start-up made (it lives as long as the process) and raise the threshold."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def tune_malloc() -> None:
    """Serve allocations of MMAP_THRESHOLD bytes or more from their own mappings (glibc).

    Payloads larger than any image the service handles (a client's oversized
    data URI, say) then go back to the OS the moment they are freed instead
    of waiting in the heap for the next trim. Images and per-call objects stay
    below it, in the heap, where reuse is cheaper than a fresh mapping. glibc
    would otherwise raise its threshold to the largest block freed so far.
    """
    if malloc_trim() is None:  # not glibc
        return
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


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


async def heap_upkeep(main: Coroutine[Any, Any, None]) -> None:
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


def exec_with_malloc_heap() -> None:
    """Run this command again under PYTHONMALLOC=malloc, unless set or useless (no glibc)."""
    if "PYTHONMALLOC" in os.environ or malloc_trim() is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    env = {**os.environ, "PYTHONMALLOC": "malloc"}
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)  # noqa: S606 - ourselves
