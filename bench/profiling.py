"""py-spy profiles of SIA under targets 1 and 4, and where the event loop's time goes.

`--profile DIR` records py-spy's raw stacks of one SIA server per case and
writes a summary beside them: busy time by component (grpc, asyncio,
aiohttp, logging, metrics, protobuf, json/base64, SIA) and the busiest frames.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from bench.config import GENERATE, image_request

if TYPE_CHECKING:
    from bench.harness import Harness


def record(h: Harness, folder: Path) -> None:
    """py-spy profiles of SIA under targets 1 and 4 (not counted in the table)."""
    folder.mkdir(parents=True, exist_ok=True)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    cases = [
        ("throughput", image_request(), h.cfg.concurrency),
        ("large", image_request("B64_JSON"), h.cfg.large_concurrency),
    ]
    for name, request, concurrency in cases:
        duration = max(5.0, h.cfg.duration)
        out = folder / f"{name}.txt"
        h.log(f"profiling {name} for {duration:g} s -> {out}")
        spy_proc = subprocess.Popen(  # noqa: S603 - our own tool, our own pid
            [spy, "record", "-p", str(h.sia.pid), "-d", str(int(duration)), "-r", "200",
             "-f", "raw", "-o", str(out), *spy_mode()],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        time.sleep(0.5)
        h.load(
            h.sia, GENERATE, request=request, concurrency=concurrency, warmup=0,
            duration=duration,
        )  # fmt: skip
        spy_proc.wait(30)
        if out.exists():
            (folder / f"{name}-summary.txt").write_text(summarize(out))


def spy_mode() -> list[str]:
    """py-spy flags: Python frames without pausing, or with BENCH_NATIVE=1 native frames too."""
    return ["--native"] if os.environ.get("BENCH_NATIVE") else ["--nonblocking"]


#: Where a sample's time goes: the first of these found from the leaf frame up.
COMPONENTS = (
    ("idle", ("epoll_wait", "EpollSelector.select", "SimpleQueue_get", "sem_clockwait")),
    ("logging", ("structlog/", "sia/logs.py", "logging/")),
    ("metrics", ("prometheus_client/",)),
    ("json, base64", ("orjson", "base64", "binascii", "json/")),
    ("protobuf", ("protobuf/", "_pb2", "upb", "sia/rpc/convert.py")),
    ("aiohttp (upstream client)", ("aiohttp/", "yarl/", "multidict/")),
    ("grpc", ("cygrpc", "grpc/")),
    ("sia", ("sia/",)),
    ("asyncio", ("asyncio/", "_asynciomodule", "uvloop")),
)


def summarize(collapsed: Path, top: int = 25) -> str:
    """Where the event loop thread's samples go, from py-spy's raw output.

    Only stacks of the thread running the event loop count, and its idle
    samples (waiting in epoll) are listed apart. Without BENCH_NATIVE=1, time
    in native code called straight from the loop (uvloop itself, grpc's Cython
    callbacks) cannot be told from idle time and is listed as such.
    """
    own: Counter[str] = Counter()
    parts: Counter[str] = Counter()
    sia: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or not ("run_forever" in stack or "Runner.run" in stack):
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        own[frames[-1]] += n
        if frames[-1].startswith(("Runner.run ", "BaseEventLoop.run_forever ")):
            # uvloop (or a native frame py-spy cannot see without --native) is running
            parts["native: event loop, grpc core, or idle"] += n
            continue
        for frame in reversed(frames):
            component = next((c for c, keys in COMPONENTS if any(k in frame for k in keys)), None)
            if component is not None:
                parts[component] += n
                break
        else:
            parts["other"] += n
        for frame in set(frames):
            if "sia/" in frame:
                sia[frame] += n
    if not total:
        return "no samples of the event loop thread\n"
    busy = total - parts["idle"]
    out = [f"{total} samples of the event loop thread, {busy} busy", "", "busy time by component:"]
    out += [f"{n / busy:6.1%}  {c}" for c, n in parts.most_common() if c != "idle"]
    out += ["", "busiest frames (self):"]
    out += [f"{n / busy:6.1%}  {f}" for f, n in own.most_common(top) if n and f not in ("",)]
    out += ["", "SIA frames (inclusive):"]
    out += [f"{n / busy:6.1%}  {f}" for f, n in sia.most_common(top)]
    return "\n".join(out) + "\n"
