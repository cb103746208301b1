"""Targets 5 and 6: many calls or tasks at once against the slow upstream.

Each function measures through a started `Harness` and returns its rows of
the table; every repetition's raw figures go to `harness.raw`.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from bench.config import GENERATE, MIB, SUBMIT, image_request
from bench.processes import grpc_target
from bench.procfs import rss
from bench.report import Row, median, verdict

if TYPE_CHECKING:
    from bench.harness import Harness
    from bench.processes import Proc


def burst(h: Harness) -> tuple[list[Row], float, int]:
    """Target 5: `burst_calls` calls at once against the slow upstream.

    Also returns when the burst ended and the idle RSS, for `rss_after_burst`.
    """
    cfg, proc = h.cfg, h.sia_burst
    h.log(f"target 5: burst of {cfg.burst_calls} against a {cfg.slow_latency:g} s upstream")
    target = grpc_target(proc)
    common: dict[str, Any] = {"target": target, "method": GENERATE, "request": image_request()}
    h.client.run("burst", calls=8, channels=cfg.burst_channels, **common)  # warm-up
    time.sleep(0.5)
    idle = rss(proc.pid)
    reps = []
    for _ in range(cfg.reps):
        reps.append(
            h.client.run(
                "burst",
                calls=cfg.burst_calls,
                channels=cfg.burst_channels,
                server_pid=proc.pid,
                timeout=60,
                **common,
            )
        )
        time.sleep(0.5)
    end = time.monotonic()
    h.raw["burst"] = {"idle_rss": idle, "reps": reps}
    wall = median([r["wall_s"] for r in reps])
    errors: Counter[str] = Counter()
    for r in reps:
        errors.update(r["errors"])
    failed = sum(errors.values())
    growth = median([(r["peak_rss"] - idle) / MIB for r in reps])
    rows = [
        Row(
            "5a",
            f"burst: {cfg.burst_calls} calls at once, {cfg.slow_latency:g} s upstream",
            f"ideal {cfg.slow_latency:.1f} s",
            f"{wall:.2f} s, {failed} failed"
            + (f" ({', '.join(f'{k} {v}' for k, v in errors.items())})" if failed else ""),
            wall / cfg.slow_latency,
            f"{wall / cfg.slow_latency:.2f}x ideal",
            f"<= {cfg.burst_wall_limit:.1f} s, all succeed",
            verdict(wall <= cfg.burst_wall_limit and failed == 0),
            {"wall_s": wall, "failed": failed, "errors": dict(errors)},
        ),
        Row(
            "5b",
            "burst: peak RSS",
            f"idle {idle / MIB:.0f} MiB",
            f"+{growth:.0f} MiB",
            growth / 100,
            f"{growth / 100:.2f} of limit",
            "<= idle + 100 MiB",
            verdict(growth <= 100),
            {"idle_rss": idle, "growth_mib": growth},
        ),
    ]
    return rows, end, idle


def rss_after_burst(h: Harness, burst_end: float, idle_burst: int) -> Row:
    """Target 5, last part: the burst server's RSS `rss_wait` seconds after the burst."""
    cfg = h.cfg
    wait = burst_end + cfg.rss_wait - time.monotonic()
    if wait > 0:
        h.log(f"waiting {wait:.0f} s to read RSS {cfg.rss_wait:.0f} s after the burst")
        time.sleep(wait)
    after = rss(h.sia_burst.pid)
    h.raw["burst_rss_after"] = {"idle_rss": idle_burst, "rss_after": after}
    ratio = after / idle_burst
    return Row(
        "5c",
        f"burst: RSS {cfg.rss_wait:.0f} s after",
        f"idle {idle_burst / MIB:.0f} MiB",
        f"{after / MIB:.0f} MiB",
        ratio,
        f"{ratio:.2f}x",
        "within 20 % of idle",
        verdict(abs(ratio - 1) <= 0.2),
        {"idle_rss": idle_burst, "rss_after": after},
    )


def async_tasks(h: Harness, sia_calls_per_s: float) -> list[Row]:
    """Target 6: async submissions/s and end-to-end tasks/s, SQLite and Redis.

    `sia_calls_per_s` is target 1's figure, the submissions' baseline.
    """
    rows: list[Row] = []
    backends: list[tuple[str, str, Proc | None]] = [
        ("a", "sqlite", h.sia_sqlite),
        ("b", "redis", h.sia_redis),
    ]
    h.raw["async"] = {}
    for letter, name, proc in backends:
        if proc is None:
            for kind in ("submissions/s", "end-to-end tasks/s"):
                rows.append(
                    Row(
                        f"6{letter}" if kind.startswith("sub") else f"6{chr(ord(letter) + 2)}",
                        f"async {kind}, {name}",
                        "",
                        "not measured",
                        None,
                        "",
                        "report",
                        "pending" if h.cfg.redis != "off" else "skipped",
                        {"note": h.redis_note},
                    )
                )
            continue
        rows += _async_backend(h, letter, name, proc, sia_calls_per_s)
    return rows


def _async_backend(
    h: Harness, letter: str, name: str, proc: Proc, sia_calls_per_s: float
) -> list[Row]:
    cfg = h.cfg
    h.log(f"target 6: async tasks, {name}")
    workers = default_workers()
    target = grpc_target(proc)
    e2e, direct = [], []
    for _ in range(cfg.reps):
        timeout = 60 + cfg.e2e_tasks * cfg.slow_latency
        e2e.append(
            h.client.run(
                "e2e",
                target=target,
                tasks=cfg.e2e_tasks,
                request=image_request(),
                timeout=timeout + 10,
            )
        )
        direct.append(
            h.client.run(
                "burst",
                target=target,
                method=GENERATE,
                request=image_request(),
                calls=cfg.e2e_tasks,
                timeout=60,
            )
        )
    submits = [
        h.load(proc, SUBMIT, request=image_request(), concurrency=cfg.concurrency)
        for _ in range(cfg.reps)
    ]
    h.raw["async"][name] = {"e2e": e2e, "generate": direct, "submit": submits}
    submit_rate = median([s["calls_per_s"] for s in submits])
    submit_ratio = submit_rate / sia_calls_per_s
    submit_errors = sum(sum(s["errors"].values()) for s in submits)
    e2e_rate = median([e["tasks_per_s"] or 0.0 for e in e2e])
    direct_rate = median([d["calls_per_s"] for d in direct])
    unfinished = sum(e["tasks"] - e["statuses"].get("TASK_STATUS_SUCCEEDED", 0) for e in e2e)
    e2e_letter = chr(ord(letter) + 2)
    return [
        Row(
            f"6{letter}",
            f"async submissions/s, {name}, concurrency {cfg.concurrency}",
            f"GenerateImage {sia_calls_per_s:,.0f} calls/s (target 1)",
            f"{submit_rate:,.0f} submissions/s"
            + (f", {submit_errors} errors" if submit_errors else ""),
            submit_ratio,
            f"{submit_ratio:.2f}",
            "report",
            "info",
        ),
        Row(
            f"6{e2e_letter}",
            f"async end to end, {name}, {workers} workers, {cfg.slow_latency:g} s upstream, "
            f"{cfg.e2e_tasks} tasks at once",
            f"GenerateImage {direct_rate:.1f} calls/s ({cfg.e2e_tasks} at once)",
            f"{e2e_rate:.2f} tasks/s" + (f", {unfinished} did not succeed" if unfinished else ""),
            e2e_rate / direct_rate,
            f"{e2e_rate / direct_rate:.2f}",
            "report",
            "info",
            {"workers": workers},
        ),
    ]


def default_workers() -> int:
    """TASK_WORKERS' default, as `sia serve` will use it."""
    from sia.config import Settings  # noqa: PLC0415 - only for its default

    value = Settings.model_fields["task_workers"].default
    return int(value)
