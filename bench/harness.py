"""One run's processes and the measurements every target is built from.

`Harness.start` brings up the fake upstreams, the SIA servers, the echoes,
the forwarder and the load driver; `load` runs one closed loop through the
driver, and `repeat` runs a target's repetitions, measuring a noisy one again.
The targets themselves live in bench/targets_echo.py, bench/targets_slow.py,
bench/targets_stream.py and bench/targets_rest.py.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from bench.config import GENERATE, Config, image_request
from bench.processes import Client, Fleet, Proc, base_env, grpc_target
from bench.report import noise

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path


class Harness:
    """The processes of one configuration's run, and how to measure them."""

    def __init__(self, cfg: Config, scratch: Path) -> None:
        self.cfg = cfg
        self.scratch = scratch
        self.fleet = Fleet(scratch)
        self.raw: dict[str, Any] = {"discarded_as_noisy": []}
        self.extra = dict(cfg.sia_env)
        self.sia_redis: Proc | None = None
        self.redis_note = "off (--redis off)"
        self.redis_queue = f"bench-{os.getpid()}-{int(time.time())}"

    def log(self, message: str) -> None:
        """Progress on stderr (stdout carries the table)."""
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def start(self) -> None:
        """Start the upstreams, the SIA servers, the client and the echo; wait until ready."""
        cfg = self.cfg
        nice = cfg.upstream_nice
        self.fast = self.fleet.fake("fake-fast", b64_bytes=cfg.large_image_bytes, nice=nice)
        self.slow = self.fleet.fake("fake-slow", latency=cfg.slow_latency, nice=nice)
        fast_url = self.fast.wait_ready("fake_ark_listening")["base_url"]
        slow_url = self.slow.wait_ready("fake_ark_listening")["base_url"]
        self.fast_url = fast_url
        # One SIA and one echo per repetition: a process's own luck (memory layout, hash
        # seed) moves its CPU per call, so the median is over processes, not over one.
        self.sias = [self.fleet.sia(f"sia-{i + 1}", fast_url, self.extra) for i in range(cfg.reps)]
        self.sia = self.sias[0]
        # Target 1 again with access control on: an API key with generous in-memory limits
        # (each checked per call), one server per repetition; one with the limits in Redis.
        self.keyed = [self._keyed(f"sia-keys-{i + 1}", fast_url) for i in range(cfg.reps)]
        if cfg.redis != "off":
            redis = {"LIMITS_STORAGE": "redis", "REDIS_URL": cfg.redis_url}
            self.keyed_redis: tuple[Proc, str] | None = self._keyed(
                "sia-keys-redis", fast_url, REDIS_QUEUE=self.redis_queue, **redis
            )
        else:
            self.keyed_redis = None
        self.sia_burst = self.fleet.sia("sia-burst", slow_url, self.extra)
        huge = str(10_000_000)  # submissions must not be refused as a full queue
        self.sia_sqlite = self.fleet.sia("sia-sqlite", slow_url, self.extra, TASK_QUEUE_LIMIT=huge)
        if cfg.redis != "off" and "6" in cfg.only:
            self.sia_redis = self.fleet.sia(
                "sia-redis",
                slow_url,
                self.extra,
                TASK_QUEUE_LIMIT=huge,
                TASK_BACKEND="redis",
                REDIS_URL=cfg.redis_url,
                REDIS_QUEUE=self.redis_queue,
            )
        self.client = Client(base_env(), self.scratch)
        keyed = [proc for proc, _ in self.keyed]
        if self.keyed_redis is not None:
            keyed.append(self.keyed_redis[0])
        for proc in (*self.sias, *keyed, self.sia_burst, self.sia_sqlite):
            proc.wait_ready("server_ready")
        if self.sia_redis is not None:
            try:
                self.sia_redis.wait_ready("server_ready", timeout=20)
                self.redis_note = "measured"
            except RuntimeError as exc:
                self.redis_note = f"pending: `sia serve` with TASK_BACKEND=redis: {exc}"
                self.log(self.redis_note)
                self.sia_redis.stop(5)
                self.sia_redis = None
        self.echoes = self._start_echoes()
        self.forwarder = self.fleet.forwarder("forwarder", fast_url)
        self.forwarder.wait_ready("forwarder_ready")
        self.client.watch = [p.pid for p in self.fleet.procs if p.popen.poll() is None]
        self.log(f"processes ready: {', '.join(p.name for p in self.fleet.procs)}")

        pid_names = {str(p.pid): p.name for p in self.fleet.procs}
        pid_names[str(self.client.popen.pid)] = "client"
        self.raw["pids"] = pid_names

    def _keyed(self, name: str, upstream: str, **settings: str) -> tuple[Proc, str]:
        """A SIA server whose one API key has every per-minute and concurrency limit set,
        far above the load (so each is counted, none refuses); the server and the key."""
        env = self.fleet.sia_env(name, upstream, self.extra, **settings)
        key = self.fleet.create_key(env, rpm=10**9, ipm=10**9, concurrency=10**6)
        return self.fleet.sia(name, upstream, self.extra, **settings), key

    def keyed_for(self, sia: Proc) -> tuple[Proc, str]:
        """The keyed server measured beside open server `sia` (same repetition)."""
        return self.keyed[self.sias.index(sia)]

    def _start_echoes(self) -> list[Proc]:
        """Capture SIA's two answers, then start the echoes that return exactly those bytes."""
        small, large = self.scratch / "answer-url.bin", self.scratch / "answer-b64.bin"
        target = grpc_target(self.sia)
        self.client.run(
            "probe", target=target, method=GENERATE, request=image_request(), out=str(small)
        )
        self.client.run(
            "probe",
            target=target,
            method=GENERATE,
            request=image_request("B64_JSON"),
            out=str(large),
        )
        echoes = [
            self.fleet.echo(f"echo-{i + 1}", small, large, uvloop=self.cfg.echo_uvloop)
            for i in range(self.cfg.reps)
        ]
        for echo in echoes:
            echo.wait_ready("echo_ready")
        self.raw["answer_bytes"] = {"url": small.stat().st_size, "b64": large.stat().st_size}
        return echoes

    def close(self) -> None:
        """Stop every process and clean the Redis keys of this run."""
        with contextlib.suppress(Exception):
            self.client.close()
        self.fleet.stop()
        if self.cfg.redis != "off":
            self._clean_redis()

    def _clean_redis(self) -> None:
        try:
            import redis  # noqa: PLC0415 - only when the Redis variant ran

            conn = redis.Redis.from_url(self.cfg.redis_url, socket_timeout=5)
            keys = list(conn.scan_iter(match=f"*{self.redis_queue}*", count=1000))
            for start in range(0, len(keys), 500):
                conn.delete(*keys[start : start + 500])
            conn.close()
        except Exception as exc:  # best effort: a missing Redis means nothing to clean
            self.log(f"redis clean-up skipped: {exc}")

    def repeat(
        self, name: str, measure: Callable[[Proc, Proc], dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """`cfg.reps` repetitions of `measure(echo, sia)`; a noisy one is measured again.

        Noisy: some window of it saw processes outside the benchmark use more than
        `noisy_cores` cores (another job on a shared machine), and retries are left.
        Discarded repetitions stay in the raw results.
        """
        reps: list[dict[str, Any]] = []
        retries = self.cfg.noisy_retries
        while len(reps) < self.cfg.reps:
            index = len(reps) % len(self.sias)
            rep = measure(self.echoes[index], self.sias[index])
            worst = max(noise(rep), default=0.0)
            if worst > self.cfg.noisy_cores and retries > 0:
                retries -= 1
                self.log(f"{name}: other processes used {worst:.2f} cores; measuring again")
                self.raw["discarded_as_noisy"].append({"target": name, "rep": rep})
                time.sleep(1.0)
                continue
            reps.append(rep)
        return reps

    def load(self, proc: Proc, method: str, **args: Any) -> dict[str, Any]:
        """One closed-loop measurement of `proc` (the client's `load` command)."""
        cfg = self.cfg
        args.setdefault("warmup", cfg.warmup)
        args.setdefault("duration", cfg.duration)
        timeout = args["warmup"] + args["duration"] + 60
        return self.client.run(
            "load", timeout=timeout, target=grpc_target(proc), method=method, server_pid=proc.pid,
            **args,
        )  # fmt: skip
