"""A/B two builds or settings of SIA under target 1's load: `python -m bench.ab`.

`make bench` compares SIA with the echo; to tell whether a change helps,
compare SIA with SIA. This starts one fake upstream and `--pairs` fresh
`sia serve` processes per side, then measures them in turn (A, B, A, B, ...)
at concurrency 64, URL results, for `--duration` seconds each. A process's
own luck (memory layout) and the VM's drift then fall on both sides alike, so
a smaller difference shows than between two full runs (bench/README.md).

    git worktree add /tmp/before HEAD~1
    python -m bench.ab --b-src /tmp/before/src          # this tree (A) against HEAD~1 (B)
    python -m bench.ab --b-env PYTHONMALLOC=pymalloc    # a setting (B) against the defaults (A)

A is always this checkout with SIA's defaults. It prints each side's CPU per
call and calls/s (medians, and every process's figure) and B's difference.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.config import GENERATE, Config, image_request
from bench.processes import RESULTS, Client, Fleet, Proc, base_env, grpc_target

CONCURRENCY = 64  # target 1's


def measure(client: Client, proc: Proc, duration: float) -> dict[str, Any]:
    """One closed-loop measurement of `proc` at target 1's load."""
    return client.run(
        "load", timeout=duration + 60, target=grpc_target(proc), method=GENERATE,
        server_pid=proc.pid, request=image_request(), concurrency=CONCURRENCY, warmup=0.5,
        duration=duration,
    )  # fmt: skip


def side_env(src: Path | None, env: list[str]) -> dict[str, str]:
    """The extra environment of side B: its source tree first on the path, its settings."""
    extra = dict(item.split("=", 1) for item in env)
    if src is not None:
        extra["PYTHONPATH"] = os.pathsep.join([str(src.resolve()), base_env()["PYTHONPATH"]])
    return extra


def summary(name: str, results: list[dict[str, Any]]) -> tuple[float, float, str]:
    """Median CPU per call (ms), median calls/s, and the line that shows them."""
    cpu = [r["server_cpu_per_call_ms"] for r in results]
    rate = [r["calls_per_s"] for r in results]
    line = (
        f"{name}: CPU per call {statistics.median(cpu):.3f} ms "
        f"({', '.join(f'{c:.3f}' for c in cpu)}), {statistics.median(rate):,.0f} calls/s"
    )
    return statistics.median(cpu), statistics.median(rate), line


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; exit 1 when a process could not start."""
    parser = argparse.ArgumentParser(prog="bench.ab", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--b-src", type=Path, help="side B's `src` folder (e.g. a worktree's)")
    parser.add_argument(
        "--b-env", action="append", default=[], metavar="NAME=VALUE",
        help="an environment variable for side B's servers (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--b-python", default=sys.executable, metavar="PATH",
        help="the interpreter that runs side B's servers (e.g. another venv's python)",
    )  # fmt: skip
    parser.add_argument("--pairs", type=int, default=4, help="processes per side (default 4)")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    args = parser.parse_args(argv)
    if args.b_src is None and not args.b_env and args.b_python == sys.executable:
        parser.error("give side B a --b-src, a --b-env, a --b-python, or several")

    scratch = RESULTS / "tmp" / f"ab-{datetime.now(UTC):%Y%m%dT%H%M%S}-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    fleet = Fleet(scratch)
    client: Client | None = None
    try:
        fake = fleet.fake("fake-fast", nice=Config().upstream_nice)  # as make bench runs it
        url = fake.wait_ready("fake_ark_listening")["base_url"]
        b_env = side_env(args.b_src, args.b_env)
        sides: list[tuple[str, Proc]] = []
        for i in range(args.pairs):
            sides.append(("A", fleet.sia(f"a{i}", url, {})))
            sides.append(("B", fleet.sia(f"b{i}", url, b_env, python=args.b_python)))
        client = Client(base_env(), scratch)
        for _, proc in sides:
            proc.wait_ready("server_ready")
        results: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
        for name, proc in sides:
            results[name].append(measure(client, proc, args.duration))
    except RuntimeError as exc:
        print(f"bench.ab: {exc}", file=sys.stderr)
        return 1
    finally:
        if client is not None:
            client.close()
        fleet.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    a_cpu, a_rate, a_line = summary("A (this tree)", results["A"])
    b_cpu, b_rate, b_line = summary("B", results["B"])
    print(a_line)
    print(b_line)
    print(
        f"B against A: CPU per call {100 * (b_cpu / a_cpu - 1):+.1f} %, "
        f"calls/s {100 * (b_rate / a_rate - 1):+.1f} %"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
