"""Running `sia serve` as a real process in tests: environment, start-up, a client."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc.aio

from sia.api.image.v1 import image_service_pb2_grpc as pb_grpc
from sia.config import without_settings


@dataclass
class Server:
    """A running `sia serve` process and what it has printed."""

    proc: asyncio.subprocess.Process
    grpc_port: int
    http_port: int
    lines: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    async def exit_code(self, timeout: float = 20) -> int:
        """Wait for the process to exit and return its code."""
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self.reader is not None:
            await self.reader
        return code


def server_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for a test server: free ports, its own data dir, no other SIA setting."""
    env = without_settings(os.environ)
    env.update(
        GRPC_HOST="127.0.0.1",
        GRPC_PORT="0",
        HTTP_HOST="127.0.0.1",
        HTTP_PORT="0",
        DATA_DIR=str(data_dir),
        IMAGE_DEFAULT_SIZE="1280x720",
        LOG_LEVEL="info",
        LOG_FORMAT="json",
    )
    env.update(extra)
    return env


@asynccontextmanager
async def serve(env: dict[str, str], cwd: Path) -> AsyncIterator[Server]:
    """Start `python -m sia serve`, wait for server_ready, and kill it if the test leaves it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sia", "serve",
        env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    ready: dict[str, Any] = {}
    async with asyncio.timeout(20):
        while not ready:
            raw = await proc.stdout.readline()
            assert raw, "server exited before it was ready:\n" + "".join(lines)
            lines.append(raw.decode())
            if '"server_ready"' in lines[-1]:
                ready = json.loads(lines[-1])

    async def read_rest() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            lines.append(raw.decode())

    server = Server(proc, ready["grpc_port"], ready["http_port"], lines)
    server.reader = asyncio.create_task(read_rest())
    try:
        yield server
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await server.reader


@asynccontextmanager
async def client(server: Server) -> AsyncIterator[pb_grpc.ImageServiceStub]:
    """An ImageService stub connected to the server process."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        yield pb_grpc.ImageServiceStub(channel)
