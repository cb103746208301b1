"""Targets 1 to 4: SIA against the echo, repetition by repetition, on the fast upstream.

Each function measures through a started `Harness` and returns its rows of
the table; every repetition's raw figures go to `harness.raw`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bench.config import GENERATE, MIB, PROMPT, SIZE, image_request
from bench.report import Row, median, verdict

if TYPE_CHECKING:
    from bench.harness import Harness
    from bench.processes import Proc

ECHO_SMALL = "/bench.Echo/Small"
ECHO_LARGE = "/bench.Echo/Large"


def throughput(h: Harness) -> tuple[list[Row], float]:
    """Targets 1 and 2: calls/s and server CPU per call at concurrency 64, URL results.

    Also returns SIA's calls/s, the baseline of target 6's submissions.
    """
    cfg = h.cfg
    h.log(f"targets 1-2: throughput at concurrency {cfg.concurrency}")

    def measure(echo_proc: Proc, sia_proc: Proc) -> dict[str, Any]:
        echo = h.load(
            echo_proc, ECHO_SMALL, response="GenerateImageResponse", concurrency=cfg.concurrency
        )
        sia = h.load(sia_proc, GENERATE, request=image_request(), concurrency=cfg.concurrency)
        keyed_proc, key = h.keyed_for(sia_proc)
        keyed = h.load(keyed_proc, GENERATE, request=image_request(), concurrency=cfg.concurrency,
                       metadata=[("authorization", f"Bearer {key}")])  # fmt: skip
        floor = h.load(h.forwarder, GENERATE, request=image_request(), concurrency=cfg.concurrency)
        rep = {"echo": echo, "sia": sia, "keyed": keyed, "forwarder": floor}
        if h.keyed_redis is not None and sia_proc is h.sias[0]:
            proc, key = h.keyed_redis
            rep["keyed_redis"] = h.load(proc, GENERATE, request=image_request(),
                                        concurrency=cfg.concurrency,
                                        metadata=[("authorization", f"Bearer {key}")])  # fmt: skip
        return rep

    reps = h.repeat("throughput", measure)
    h.raw["throughput"] = reps
    sia_calls_per_s = median([r["sia"]["calls_per_s"] for r in reps])
    echo_calls_per_s = median([r["echo"]["calls_per_s"] for r in reps])
    ratio = median([r["sia"]["calls_per_s"] / r["echo"]["calls_per_s"] for r in reps])
    echo_cpu = median([r["echo"]["server_cpu_per_call_ms"] for r in reps])
    sia_cpu = median([r["sia"]["server_cpu_per_call_ms"] for r in reps])
    cpu_ratio = median(
        [r["sia"]["server_cpu_per_call_ms"] / r["echo"]["server_cpu_per_call_ms"] for r in reps]
    )
    errors = sum(sum(r["sia"]["errors"].values()) for r in reps)
    floor_ratio = median([r["forwarder"]["calls_per_s"] / r["echo"]["calls_per_s"] for r in reps])
    rows = [
        Row(
            "1",
            f"throughput, concurrency {cfg.concurrency}, URL results",
            f"echo {echo_calls_per_s:,.0f} calls/s",
            f"{sia_calls_per_s:,.0f} calls/s" + (f", {errors} errors" if errors else ""),
            ratio,
            f"{ratio:.2f}",
            ">= 0.45",
            verdict(ratio >= 0.45 and errors == 0),
        ),
        Row(
            "1f",
            "reference: bare forwarder (gRPC + the same upstream client, no logic)",
            f"echo {echo_calls_per_s:,.0f} calls/s",
            f"{median([r['forwarder']['calls_per_s'] for r in reps]):,.0f} calls/s",
            floor_ratio,
            f"{floor_ratio:.2f}",
            "the floor under 1",
            "info",
        ),
        Row(
            "2",
            "server CPU per call",
            f"echo {echo_cpu:.3f} ms",
            f"{sia_cpu:.3f} ms",
            cpu_ratio,
            f"{cpu_ratio:.2f}x",
            "<= 3x",
            verdict(cpu_ratio <= 3),
        ),
    ]
    return rows + _keyed_rows(reps), sia_calls_per_s


def _keyed_rows(reps: list[dict[str, Any]]) -> list[Row]:
    """Rows 1k and 2k: target 1 with an API key and its limits, against the open server of
    the same repetition; 1r, one figure with the limits counted in Redis."""
    open_calls = median([r["sia"]["calls_per_s"] for r in reps])
    keyed_calls = median([r["keyed"]["calls_per_s"] for r in reps])
    ratio = median([r["keyed"]["calls_per_s"] / r["sia"]["calls_per_s"] for r in reps])
    cpu = median(
        [r["keyed"]["server_cpu_per_call_ms"] / r["sia"]["server_cpu_per_call_ms"] for r in reps]
    )
    errors = sum(sum(r["keyed"]["errors"].values()) for r in reps)
    rows = [
        Row(
            "1k",
            "throughput with an API key, its limits counted in memory",
            f"open {open_calls:,.0f} calls/s",
            f"{keyed_calls:,.0f} calls/s" + (f", {errors} errors" if errors else ""),
            ratio,
            f"{ratio:.2f}",
            ">= 0.90",
            verdict(ratio >= 0.90 and errors == 0),
        ),
        Row(
            "2k",
            "server CPU per call with an API key",
            f"open {median([r['sia']['server_cpu_per_call_ms'] for r in reps]):.3f} ms",
            f"{median([r['keyed']['server_cpu_per_call_ms'] for r in reps]):.3f} ms",
            cpu,
            f"{cpu:.2f}x",
            "<= 1.10x",
            verdict(cpu <= 1.10),
        ),
    ]
    redis = [r for r in reps if "keyed_redis" in r]
    if not redis:
        rows.append(Row("1r", "throughput with an API key, limits in Redis", "", "Redis off",
                        None, "", "reported", "skipped"))  # fmt: skip
    else:
        rep = redis[0]
        share = rep["keyed_redis"]["calls_per_s"] / rep["sia"]["calls_per_s"]
        rows.append(
            Row(
                "1r",
                "throughput with an API key, its limits counted in Redis (one repetition)",
                f"open {rep['sia']['calls_per_s']:,.0f} calls/s",
                f"{rep['keyed_redis']['calls_per_s']:,.0f} calls/s, "
                f"{rep['keyed_redis']['server_cpu_per_call_ms']:.3f} ms CPU/call",
                share,
                f"{share:.2f}",
                "reported",
                "info",
            )
        )
    return rows


def latency(h: Harness) -> list[Row]:
    """Target 3: p50 at concurrency 1, SIA minus the upstream called directly."""
    cfg = h.cfg
    h.log("target 3: latency at concurrency 1")
    body = {
        "model": "doubao-seedream-4-0-250828",
        "prompt": PROMPT,
        "size": SIZE,
        "response_format": "url",
        "sequential_image_generation": "disabled",
    }
    args = {"concurrency": 1, "duration": cfg.latency_duration}

    def measure(echo_proc: Proc, sia_proc: Proc) -> dict[str, Any]:
        echo = h.load(echo_proc, ECHO_SMALL, response="GenerateImageResponse", **args)
        direct = h.client.run(
            "http", url=f"{h.fast_url}/api/v3/images/generations", body=body,
            headers={"Authorization": "Bearer fake-key"}, warmup=cfg.warmup,
            timeout=cfg.warmup + cfg.latency_duration + 60, **args,
        )  # fmt: skip
        sia = h.load(sia_proc, GENERATE, request=image_request(), **args)
        return {"echo": echo, "direct": direct, "sia": sia}

    reps = h.repeat("latency", measure)
    h.raw["latency"] = reps
    added = [r["sia"]["p50_ms"] - r["direct"]["p50_ms"] for r in reps]
    ratio = median([a / r["echo"]["p50_ms"] for a, r in zip(added, reps, strict=True)])
    sia_p50 = median([r["sia"]["p50_ms"] for r in reps])
    direct_p50 = median([r["direct"]["p50_ms"] for r in reps])
    return [
        Row(
            "3",
            "added latency, concurrency 1 (p50)",
            f"echo p50 {median([r['echo']['p50_ms'] for r in reps]):.2f} ms",
            f"SIA {sia_p50:.2f} - upstream {direct_p50:.2f} = {median(added):.2f} ms",
            ratio,
            f"{ratio:.2f}x",
            "<= 2x echo p50",
            verdict(ratio <= 2),
        )
    ]


def large(h: Harness) -> list[Row]:
    """Target 4: b64_json images decoded and returned as bytes."""
    cfg = h.cfg
    size = cfg.large_image_bytes
    h.log(f"target 4: {size / MIB:g} MiB images at concurrency {cfg.large_concurrency}")
    args = {"concurrency": cfg.large_concurrency}

    def measure(echo_proc: Proc, sia_proc: Proc) -> dict[str, Any]:
        echo = h.load(echo_proc, ECHO_LARGE, response="GenerateImageResponse", **args)
        sia = h.load(sia_proc, GENERATE, request=image_request("B64_JSON"), **args)
        return {"echo": echo, "sia": sia}

    reps = h.repeat("large", measure)
    h.raw["large"] = {"image_bytes": size, "reps": reps}
    echo_mib = median([r["echo"]["calls_per_s"] * size / MIB for r in reps])
    sia_mib = median([r["sia"]["calls_per_s"] * size / MIB for r in reps])
    ratio = median([r["sia"]["calls_per_s"] / r["echo"]["calls_per_s"] for r in reps])
    # The limit counts the image as the upstream sends it: base64, 4/3 of the bytes.
    image = size * 4 / 3
    allowed = 10 * image * cfg.large_concurrency
    growth = [r["sia"]["peak_rss"] - r["sia"]["idle_rss"] for r in reps]
    used = median([g / allowed for g in growth])
    idle = median([r["sia"]["idle_rss"] for r in reps])
    return [
        Row(
            "4a",
            f"large images: {image / MIB:g} MiB b64_json -> bytes, "
            f"concurrency {cfg.large_concurrency}",
            f"echo {echo_mib:,.0f} MiB/s",
            f"{sia_mib:,.1f} MiB/s",
            ratio,
            f"{ratio:.3f}",
            ">= 0.10",
            verdict(ratio >= 0.10),
        ),
        Row(
            "4b",
            "large images: peak RSS",
            f"idle {idle / MIB:.0f} MiB",
            f"+{median(growth) / MIB:.0f} MiB",
            used,
            f"{used:.2f} of limit",
            f"<= idle + {allowed / MIB:.0f} MiB",
            verdict(used <= 1),
            {"allowed_growth": allowed, "image_bytes_b64": image},
        ),
    ]
