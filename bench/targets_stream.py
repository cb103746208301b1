"""Target 7: results as they happen (StreamSequentialImages, WatchImageTask) and idle watches.

The fake Ark of this target runs inside the load driver (bench/client_stream.py),
so the moment it wrote an image frame and the moment that image reached the
client are read from one clock. One `sia serve` of its own (default settings,
SQLite tasks) is pointed at that fake; it is stopped once the rows are taken.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bench.config import MIB
from bench.processes import grpc_target
from bench.report import Row, verdict

if TYPE_CHECKING:
    from bench.harness import Harness

#: 7a's limit on the median delay from the upstream's frame to the client's message.
STREAM_P50_LIMIT_MS = 100.0
#: 7d's limit on the CPU idle watches add: well under one poll a second per watch
#: (1,000 watches re-reading their task each second would take some 0.2 cores).
IDLE_CORES_LIMIT = 0.01


def streams(h: Harness) -> list[Row]:
    """Rows 7a to 7d; every figure's raw measurement goes to `h.raw["streams"]`."""
    cfg = h.cfg
    h.log(
        f"target 7: {cfg.stream_groups} groups of {cfg.stream_images} images "
        f"({cfg.image_latency:g} s apart) streamed and watched; {cfg.watchers} idle watches"
    )
    url = h.client.run("fake_start", image_latency=cfg.image_latency)["base_url"]
    proc = h.fleet.sia("sia-stream", url, h.extra)
    proc.wait_ready("server_ready")
    h.client.watch.append(proc.pid)  # its CPU is ours, not another job's
    h.raw["pids"][str(proc.pid)] = proc.name
    group_s = cfg.stream_images * cfg.image_latency
    groups: dict[str, Any] = {
        "images": cfg.stream_images,
        "groups": cfg.stream_groups,
        "timeout": 60 + 2 * cfg.stream_groups * group_s,
    }
    target = grpc_target(proc)
    wide = cfg.stream_concurrency
    raw: dict[str, Any] = {
        "direct": h.client.run(
            "stream",
            direct=True,
            concurrency=1,
            **{**groups, "groups": max(2, cfg.stream_groups // 4)},
        ),
        "stream_1": h.client.run("stream", target=target, concurrency=1, **groups),
        f"stream_{wide}": h.client.run("stream", target=target, concurrency=wide, **groups),
        "watch_1": h.client.run("watch", target=target, concurrency=1, **groups),
        f"watch_{wide}": h.client.run("watch", target=target, concurrency=wide, **groups),
        "watchers": h.client.run(
            "watchers",
            target=target,
            server_pid=proc.pid,
            watchers=cfg.watchers,
            tasks=cfg.watch_tasks,
            channels=cfg.watch_channels,
            images=cfg.stream_images,
            idle=cfg.watch_idle,
            timeout=120 + 2 * cfg.watch_idle,
        ),
        "hold": h.client.run(
            "hold",
            target=grpc_target(h.echoes[0]),
            server_pid=h.echoes[0].pid,
            streams=cfg.watchers,
            channels=cfg.watch_channels,
        ),
    }
    proc.stop()
    h.client.run("fake_stop")
    h.raw["streams"] = raw
    return [*_delay_rows(h, raw), *_watcher_rows(h, raw["watchers"], raw["hold"])]


def _shown(figures: dict[str, Any]) -> str:
    """p50 and p99 of one delay measurement, and what went wrong, if anything."""
    text = f"p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms"
    if figures["missing"] or figures["errors"]:
        text += f" ({figures['missing']} images missing, {len(figures['errors'])} errors)"
    return text


def _sound(*figures: dict[str, Any]) -> bool:
    return not any(f["missing"] or f["errors"] for f in figures)


def _delay_rows(h: Harness, raw: dict[str, Any]) -> list[Row]:
    cfg = h.cfg
    wide = cfg.stream_concurrency
    one, many = raw["stream_1"], raw[f"stream_{wide}"]
    watch_one, watch_many = raw["watch_1"], raw[f"watch_{wide}"]
    groups = f"{cfg.stream_groups} groups of {cfg.stream_images}, {cfg.image_latency:g} s per image"
    p50 = one["p50_ms"]
    watch_ratio = watch_one["p50_ms"] / p50 if p50 else None
    return [
        Row(
            "7a",
            f"streamed group: upstream image frame -> StreamSequentialImages message, {groups}, "
            f"concurrency 1 (and {wide})",
            f"the fake's SSE read directly: p50 {raw['direct']['p50_ms']:.2f} ms",
            f"{_shown(one)}; at {wide}: {_shown(many)}",
            p50 / STREAM_P50_LIMIT_MS,
            f"{p50 / STREAM_P50_LIMIT_MS:.3f} of limit",
            f"p50 < {STREAM_P50_LIMIT_MS:.0f} ms; p99 reported",
            verdict(p50 < STREAM_P50_LIMIT_MS and _sound(one, many)),
        ),
        Row(
            "7b",
            f"async group: upstream image frame -> first WatchImageTask message with it, "
            f"{groups}, concurrency 1 (and {wide})",
            f"StreamSequentialImages p50 {p50:.1f} ms (7a)",
            f"{_shown(watch_one)}; at {wide}: {_shown(watch_many)}",
            watch_ratio,
            f"{watch_ratio:.1f}x" if watch_ratio is not None else "",
            "reported",
            "info" if _sound(watch_one, watch_many) else "FAIL",
        ),
    ]


def _watcher_rows(h: Harness, w: dict[str, Any], hold: dict[str, Any]) -> list[Row]:
    cfg = h.cfg
    n = w["watchers"]
    what = f"{n:,} idle WatchImageTask streams on {w['tasks']} running tasks"
    added = w["rss_idle"] - w["rss_before"]
    per_watch = added / n / 1024
    bare = (hold["rss_held"] - hold["rss_before"]) / n / 1024
    ratio = per_watch / bare if bare > 0 else None
    quiet, busy = w["no_watchers"]["cores"], w["with_watchers"]["cores"]
    clean = w["ends"] == {"cancelled": n} and w["tasks_cancelled"] == w["tasks"]
    clean = clean and not w["extra_messages"]
    ending = (
        f"all {n:,} cancelled, then the tasks"
        if clean
        else f"ends {w['ends']}, {w['tasks_cancelled']} tasks cancelled, "
        f"{w['extra_messages']} messages while idle"
    )
    return [
        Row(
            "7c",
            f"{what}, {cfg.watch_channels} connections: server RSS added",
            f"echo holding {n:,} streams: {bare:.1f} KiB each",
            f"+{added / MIB:.1f} MiB over {w['rss_before'] / MIB:.0f} MiB, {per_watch:.1f} KiB "
            f"per watch (all open in {w['open_s']:.2f} s)",
            ratio,
            f"{ratio:.2f}x" if ratio is not None else "",
            "reported",
            "info",
            {"rss_added": added, "kib_per_watch": per_watch, "kib_per_bare_stream": bare},
        ),
        Row(
            "7d",
            f"{what}: server CPU over {cfg.watch_idle:g} s while they idle",
            f"no watches {quiet:.3f} cores",
            f"{busy:.3f} cores; {ending}",
            busy - quiet,
            f"{busy - quiet:+.3f} cores",
            f"<= no watches + {IDLE_CORES_LIMIT} cores, all cancel cleanly",
            verdict(busy - quiet <= IDLE_CORES_LIMIT and clean),
            {"cores_idle": quiet, "cores_watched": busy},
        ),
    ]
