"""What a benchmark run measures: its configuration and the request every measurement sends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MIB = 1024 * 1024
GENERATE = "/image.v1.ImageService/GenerateImage"
SUBMIT = "/image.v1.ImageService/GenerateImageAsync"
PROMPT = "a red fox in the snow, benchmark"
SIZE = "2048x2048"


@dataclass(frozen=True)
class Config:
    """What one run measures; `Config()` is `make bench`, `SMOKE` the test's tiny run."""

    #: Repetitions per target, each on fresh processes (targets 1 to 4, 8a): 5 keep one
    #: unlucky process from deciding the median.
    reps: int = 5
    warmup: float = 0.5
    duration: float = 3.0  # seconds measured per repetition of a closed loop
    concurrency: int = 64  # targets 1, 2 and 8a, and async submissions
    latency_duration: float = 1.5  # target 3, at concurrency 1
    large_concurrency: int = 8  # target 4
    large_image_bytes: int = 3 * MIB  # decoded; its base64 in the upstream's JSON is 4 MiB
    burst_calls: int = 2000  # target 5
    burst_channels: int = 4
    slow_latency: float = 2.0  # the upstream of targets 5 and 6
    rss_wait: float = 60.0  # target 5: RSS read this long after the burst
    e2e_tasks: int = 16  # target 6: tasks submitted at once, end to end
    #: Target 7: groups of `stream_images` images, `image_latency` s apart, one at a time and
    #: `stream_concurrency` at once; then `watchers` idle watches of `watch_tasks` running
    #: tasks over `watch_channels` connections, the server's CPU read over `watch_idle` s.
    stream_groups: int = 20
    stream_images: int = 4
    image_latency: float = 0.1
    stream_concurrency: int = 8
    watchers: int = 1000
    watch_tasks: int = 10
    watch_channels: int = 4
    watch_idle: float = 5.0
    cli_runs: int = 10  # target 8b: timed runs of `sia generate --help` (after one untimed)
    redis: str = "auto"  # "auto": measure when `sia serve` accepts TASK_BACKEND=redis; "off"
    redis_url: str = "redis://127.0.0.1:6379/0"
    echo_uvloop: bool = False
    sia_env: tuple[tuple[str, str], ...] = ()  # extra settings for every `sia serve`
    #: Scheduling niceness of the fake upstreams. 19: like the real upstream on its own
    #: machines, they take only CPU the servers and the client leave idle.
    upstream_nice: int = 19
    #: A repetition during which processes outside the benchmark used more than this many
    #: cores is measured again (at most `noisy_retries` times in a run).
    noisy_cores: float = 0.5
    noisy_retries: int = 2  # per target
    #: Targets to measure (2 comes with 1).
    only: tuple[str, ...] = ("1", "3", "4", "5", "6", "7", "8")

    @property
    def burst_wall_limit(self) -> float:
        """Target 5's wall-time limit: 3.5 s for the 2 s upstream, in proportion otherwise."""
        return 3.5 * self.slow_latency / 2.0


SMOKE = Config(
    reps=1,
    warmup=0.1,
    duration=0.3,
    latency_duration=0.3,
    concurrency=8,
    large_concurrency=2,
    large_image_bytes=256 * 1024,
    burst_calls=50,
    burst_channels=2,
    slow_latency=0.2,
    rss_wait=1.0,
    e2e_tasks=4,
    stream_groups=3,
    stream_images=2,
    image_latency=0.05,
    stream_concurrency=2,
    watchers=50,
    watch_tasks=2,
    watch_channels=2,
    watch_idle=0.5,
    cli_runs=2,
    redis="off",
)


def image_request(fmt: str = "URL") -> dict[str, Any]:
    """The GenerateImageRequest every measurement sends (as the client's JSON command)."""
    return {"prompt": PROMPT, "size": SIZE, "response_format": fmt}
