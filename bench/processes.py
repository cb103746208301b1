"""The benchmark's processes: starting the fakes, echoes, forwarder and SIA servers, and the client.

Every server is a separate process that logs JSON lines to a file in the
run's scratch folder; readiness is the line with its ready event. `bench.run`
and `bench.ab` both start their processes through `Fleet`.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sia.config import without_settings

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


@dataclass
class Proc:
    """A started process whose stdout goes to `log`."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    ready: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    def wait_ready(self, event: str, timeout: float = 45.0) -> dict[str, Any]:
        """Wait for the JSON log line whose `event` is `event`; raise if the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log.read_text(errors="replace").splitlines():
                if f'"{event}"' in line:
                    with contextlib.suppress(ValueError):
                        self.ready = json.loads(line)
                        return self.ready
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-5:])
        state = f"exited {self.popen.returncode}" if self.popen.poll() is not None else "timed out"
        raise RuntimeError(f"{self.name}: {state} before {event}:\n{tail}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def grpc_target(proc: Proc) -> str:
    """The gRPC address a started server (SIA, echo or forwarder) listens on."""
    port = proc.ready.get("grpc_port") or proc.ready.get("port")
    return f"127.0.0.1:{port}"


def base_env() -> dict[str, str]:
    """The environment without any SIA setting, with the repository importable."""
    env = without_settings(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class Client:
    """The load driver process (bench/client.py): one JSON command in, one JSON result out."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "bench.client"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=cwd,
            text=True,
        )
        self.watch: list[int] = []

    def run(self, op: str, timeout: float = 120.0, **args: Any) -> dict[str, Any]:
        """Send one command and wait for its result."""
        assert self.popen.stdin is not None
        assert self.popen.stdout is not None
        self.popen.stdin.write(json.dumps({"op": op, "watch_pids": self.watch, **args}) + "\n")
        self.popen.stdin.flush()
        ready, _, _ = select.select([self.popen.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError(f"client: no answer to {op} within {timeout} s")
        line = self.popen.stdout.readline()
        if not line:
            raise RuntimeError(f"client exited during {op}")
        result: dict[str, Any] = json.loads(line)
        if "failed" in result:
            raise RuntimeError(f"client {op}: {result['failed']}")
        return result

    def close(self) -> None:
        """Ask it to quit."""
        if self.popen.poll() is None:
            assert self.popen.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                self.popen.stdin.write('{"op": "quit"}\n')
                self.popen.stdin.close()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()


class Fleet:
    """Every process of one run; stops them all on exit."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        """Start `argv` with stdout and stderr in scratch/<name>.log."""
        log = self.scratch / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(  # noqa: S603 - the harness's own commands
                argv, stdout=out, stderr=subprocess.STDOUT, env=env or base_env(), cwd=self.scratch
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def fake(
        self, name: str, *, latency: float = 0.0, b64_bytes: int | None = None, nice: int = 0
    ) -> Proc:
        """A fake Ark upstream on a free port, at scheduling niceness `nice`."""
        argv = [sys.executable, "-m", "bench.fake_upstream", "--port", "0"]
        argv += ["--latency", str(latency)]
        if b64_bytes:
            argv += ["--b64-bytes", str(b64_bytes)]
        proc = self.start(name, argv)
        if nice:
            os.setpriority(os.PRIO_PROCESS, proc.pid, nice)
        return proc

    def sia(
        self,
        name: str,
        upstream: str,
        extra: dict[str, str],
        *,
        python: str = sys.executable,
        **settings: str,
    ) -> Proc:
        """`sia serve` run by `python`, on its defaults but for ports, data dir and upstream."""
        env = self.sia_env(name, upstream, extra, **settings)
        return self.start(name, [python, "-m", "sia", "serve"], env)

    def sia_env(
        self, name: str, upstream: str, extra: dict[str, str], **settings: str
    ) -> dict[str, str]:
        """The environment `sia` commands of server `name` run in."""
        env = base_env()
        env.update(
            GRPC_HOST="127.0.0.1",
            GRPC_PORT="0",
            HTTP_HOST="127.0.0.1",
            HTTP_PORT="0",
            DATA_DIR=str(self.scratch / name),
            IMAGE_PROVIDER="ark",
            IMAGE_API_KEY="fake-key",
            IMAGE_BASE_URL=upstream,
            SHUTDOWN_GRACE="1",
            **settings,
        )
        env.update(extra)
        return env

    def create_key(self, env: dict[str, str], **limits: int) -> str:
        """`sia keys create` in a server's environment, as an operator would; the key."""
        argv = [sys.executable, "-m", "sia", "keys", "create", "--name", "bench"]
        for option, value in limits.items():
            argv += [f"--{option.replace('_', '-')}", str(value)]
        done = subprocess.run(  # noqa: S603 - the harness's own command
            argv, env=env, cwd=self.scratch, capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    def echo(self, name: str, small: Path, large: Path, *, uvloop: bool = False) -> Proc:
        """The bare echo server (bench/echo_server.py), answering with these captured bytes."""
        argv = [sys.executable, "-m", "bench.echo_server", "--small", str(small)]
        argv += ["--large", str(large)]
        if uvloop:
            argv.append("--uvloop")
        return self.start(name, argv)

    def forwarder(self, name: str, upstream: str) -> Proc:
        """The bare forwarder (bench/forwarder.py) in front of `upstream`."""
        return self.start(name, [sys.executable, "-m", "bench.forwarder", "--upstream", upstream])

    def stop(self) -> None:
        """Stop every process, newest first."""
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()
