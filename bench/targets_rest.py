"""Target 8: the REST API against gRPC on the same server, and the CLI's start-up time.

8a measures `POST /v1/images/generations` (the OpenAI-compatible route on the
HTTP port) and GenerateImage on the same `sia serve`, the same fast upstream
and the same load, back to back in each repetition (which goes first
alternates), so the ratio is the REST edge's cost against the gRPC edge's.
8b times `sia generate --help` as a user runs it: the console script next to
this interpreter, a whole process from start to exit.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.config import GENERATE, PROMPT, SIZE, image_request
from bench.processes import base_env
from bench.report import Row, median, verdict

if TYPE_CHECKING:
    from bench.harness import Harness
    from bench.processes import Proc

#: 8a: REST calls/s at least this share of gRPC's on the same server.
REST_SHARE = 0.8
#: 8b: `sia generate --help` exits within this many seconds (median).
CLI_LIMIT_S = 0.3
CLI_ARGV = ("generate", "--help")


def rest_body() -> dict[str, Any]:
    """The OpenAI-style request matching `image_request()`: same prompt, size, URL results."""
    return {"prompt": PROMPT, "size": SIZE, "response_format": "url"}


def rest(h: Harness) -> list[Row]:
    """Row 8a: REST calls/s over gRPC calls/s, repetition by repetition on one server each."""
    cfg = h.cfg
    h.log(f"target 8a: REST against gRPC at concurrency {cfg.concurrency}")
    body = rest_body()

    def measure(_: Proc, sia_proc: Proc) -> dict[str, Any]:
        url = f"http://127.0.0.1:{sia_proc.ready['http_port']}/v1/images/generations"

        def grpc() -> dict[str, Any]:
            return h.load(sia_proc, GENERATE, request=image_request(), concurrency=cfg.concurrency)

        def http() -> dict[str, Any]:
            return h.client.run(
                "http", url=url, body=body, server_pid=sia_proc.pid, warmup=cfg.warmup,
                duration=cfg.duration, concurrency=cfg.concurrency,
                timeout=cfg.warmup + cfg.duration + 60,
            )  # fmt: skip

        # Alternate which goes first, so neither always meets the fresher process.
        if h.sias.index(sia_proc) % 2 == 0:
            grpc_figures = grpc()
            return {"grpc": grpc_figures, "rest": http(), "first": "grpc"}
        rest_figures = http()
        return {"grpc": grpc(), "rest": rest_figures, "first": "rest"}

    reps = h.repeat("rest", measure)
    h.raw["rest"] = reps
    grpc_calls = median([r["grpc"]["calls_per_s"] for r in reps])
    rest_calls = median([r["rest"]["calls_per_s"] for r in reps])
    ratio = median([r["rest"]["calls_per_s"] / r["grpc"]["calls_per_s"] for r in reps])
    cpu = {
        side: median([r[side]["server_cpu_per_call_ms"] for r in reps]) for side in ("grpc", "rest")
    }
    client = {
        side: median([r[side]["client_cpu_s"] / r[side]["calls"] * 1000 for r in reps])
        for side in ("grpc", "rest")
    }
    errors = {side: sum(sum(r[side]["errors"].values()) for r in reps) for side in ("grpc", "rest")}
    failed = ", ".join(f"{n} {side} errors" for side, n in errors.items() if n)
    return [
        Row(
            "8a",
            f"REST POST /v1/images/generations against gRPC GenerateImage, same server, "
            f"concurrency {cfg.concurrency}, URL results",
            f"gRPC {grpc_calls:,.0f} calls/s, {cpu['grpc']:.3f} ms CPU/call",
            f"{rest_calls:,.0f} calls/s, {cpu['rest']:.3f} ms CPU/call"
            + (f", {failed}" if failed else ""),
            ratio,
            f"{ratio:.2f}",
            f">= {REST_SHARE}",
            verdict(ratio >= REST_SHARE and not failed),
            {
                "server_cpu_per_call_ms": cpu,
                "client_cpu_per_call_ms": client,
                "errors": errors,
            },
        )
    ]


def cli_startup(h: Harness) -> list[Row]:
    """Row 8b: the median wall time of `sia generate --help`, one untimed run first."""
    cfg = h.cfg
    sia = Path(sys.executable).with_name("sia")
    if not sia.exists():
        return [Row("8b", "`sia generate --help` start-up", "", f"no {sia}", None, "",
                    f"< {CLI_LIMIT_S} s", "pending")]  # fmt: skip
    h.log(f"target 8b: `sia generate --help`, {cfg.cli_runs} runs")
    argv = [str(sia), *CLI_ARGV]
    times, failures = _timed(h, argv, b"usage: sia generate")
    # For scale, not a baseline of the target: the interpreter starting and exiting.
    bare, _ = _timed(h, [sys.executable, "-c", "pass"], b"")
    h.raw["cli_startup"] = {"argv": argv, "wall_s": times, "failures": failures, "bare_s": bare}
    p50 = median(times)
    low, high = min(times, default=0.0), max(times, default=0.0)
    shown = f"median {p50:.3f} s of {len(times)} (min {low:.3f}, max {high:.3f})"
    if failures:
        shown += f", {len(failures)} failed"
    return [
        Row(
            "8b",
            "`sia generate --help` start-up: the whole process, wall time",
            f"the interpreter alone (`python -c pass`): {median(bare):.3f} s",
            shown,
            p50 / CLI_LIMIT_S,
            f"{p50 / CLI_LIMIT_S:.2f} of limit",
            f"< {CLI_LIMIT_S} s",
            verdict(p50 < CLI_LIMIT_S and not failures),
        )
    ]


def _timed(h: Harness, argv: list[str], expect: bytes) -> tuple[list[float], list[str]]:
    """Wall times of `cfg.cli_runs` runs of `argv` after one untimed run (it fills the page
    and bytecode caches), and the runs that failed: a non-zero exit or `expect` missing."""
    times: list[float] = []
    failures: list[str] = []
    env = base_env()
    for run in range(h.cfg.cli_runs + 1):
        start = time.perf_counter()
        done = subprocess.run(  # noqa: S603 - our interpreter or its console script
            argv, env=env, cwd=h.scratch, capture_output=True, check=False
        )
        elapsed = time.perf_counter() - start
        if done.returncode != 0 or expect not in done.stdout:
            failures.append(
                f"exit {done.returncode}: {done.stderr[-300:].decode(errors='replace')}"
            )
        elif run > 0:
            times.append(elapsed)
    return times, failures
