"""`make bench`: SIA against a bare gRPC echo, on loopback, as ratios measured in one run.

It starts, as separate processes: two fake Ark upstreams (one answering at once
with 3 MiB images when asked for b64_json, one answering after 2 s), the SIA
servers under test (`sia serve`, default settings but for ports, data dir,
upstream and the task queue limit), the bare echo server (bench/echo_server.py)
and the load driver (bench/client.py); target 7 adds a fake Ark inside the load
driver and a SIA server in front of it; target 8 also drives SIA's REST API and
times the `sia` command's start-up. Each target compares SIA with a
baseline measured in the same run, repetition by repetition; the table shows
the medians and the median of the per-repetition ratios.

    python -m bench.run                    # the full run, ~6 minutes on 2 cores
    python -m bench.run --smoke --out F    # a tiny configuration that checks the harness
    python -m bench.run --profile DIR      # also py-spy profiles of SIA under targets 1 and 4

The table goes to stdout (Markdown); the same figures and every repetition's
raw measurements go to `--out` (default bench/results/latest.json). Scratch
files (server logs, data dirs) go under bench/results/tmp/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import profiling
from bench.config import SMOKE, Config
from bench.harness import Harness
from bench.processes import RESULTS
from bench.report import Report, Row, table
from bench.targets_echo import large, latency, throughput
from bench.targets_rest import cli_startup, rest
from bench.targets_slow import async_tasks, burst, rss_after_burst
from bench.targets_stream import streams


def measure(harness: Harness, profile: Path | None) -> list[Row]:
    """Start every process, measure the configured targets, and return the table's rows.

    The burst runs first so that the wait before its RSS reading, `rss_wait`
    seconds after it, passes while the other targets are measured.
    """
    only = harness.cfg.only
    harness.start()
    rows: list[Row] = []
    if "5" in only:
        burst_rows, burst_end, idle_burst = burst(harness)
    if "1" in only or "6" in only:
        throughput_rows, sia_calls_per_s = throughput(harness)
        rows += throughput_rows
    if "3" in only:
        rows += latency(harness)
    if "4" in only:
        rows += large(harness)
    if "6" in only:
        rows += async_tasks(harness, sia_calls_per_s)
    if "7" in only:
        rows += streams(harness)
    if "8" in only:
        rows += [*rest(harness), *cli_startup(harness)]
    if profile is not None:
        profiling.record(harness, profile)
    if "5" in only:
        rows += [*burst_rows, rss_after_burst(harness, burst_end, idle_burst)]
    return sorted(rows, key=lambda r: r.id)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit 0 when it ran (whatever the verdicts), 1 when it could not."""
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--smoke", action="store_true", help="tiny configuration (tests)")
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    parser.add_argument("--reps", type=int, help="repetitions (default 5)")
    parser.add_argument("--duration", type=float, help="seconds per closed-loop measurement")
    parser.add_argument("--redis", choices=("auto", "off"), help="measure the Redis backend")
    parser.add_argument("--redis-url", help="Redis for the Redis backend")
    parser.add_argument("--echo-uvloop", action="store_true", help="run the echo on uvloop")
    parser.add_argument(
        "--sia-env", action="append", default=[], metavar="NAME=VALUE",
        help="an environment variable for every SIA server (repeatable; to try a setting)",
    )  # fmt: skip
    parser.add_argument(
        "--upstream-nice", type=int, metavar="N",
        help="run the fake upstreams at niceness N (default 19: they use only idle CPU; "
        "0: they compete with the servers for the cores)",
    )  # fmt: skip
    parser.add_argument("--only", help="comma-separated targets to measure, e.g. 1,4")
    parser.add_argument("--profile", type=Path, help="write py-spy profiles under this folder")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (logs)")
    parser.add_argument("--strict", action="store_true", help="exit 3 when a target is not met")
    args = parser.parse_args(argv)

    cfg = SMOKE if args.smoke else Config()
    overrides: dict[str, Any] = {
        "reps": args.reps,
        "duration": args.duration,
        "redis": args.redis,
        "redis_url": args.redis_url,
        "echo_uvloop": args.echo_uvloop or None,
        "only": tuple(args.only.split(",")) if args.only else None,
        "sia_env": tuple(tuple(a.split("=", 1)) for a in args.sia_env) or None,
        "upstream_nice": args.upstream_nice,
    }
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    stamp = datetime.now(UTC)
    scratch = RESULTS / "tmp" / f"{stamp:%Y%m%dT%H%M%S}-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    started = time.monotonic()
    harness = Harness(cfg, scratch)
    try:
        rows = measure(harness, args.profile)
    except RuntimeError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        harness.close()
    report = Report(
        cfg,
        rows,
        harness.raw,
        harness.redis_note,
        taken_at=stamp,
        elapsed=time.monotonic() - started,
        load_before=load_before,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report.as_json(), indent=1) + "\n")

    print(table(rows))
    print()
    print(report.footer(args.out))
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    return 3 if args.strict and not report.all_met else 0


if __name__ == "__main__":
    sys.exit(main())
