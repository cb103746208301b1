"""The baseline: a bare grpc.aio server that answers every call with fixed bytes.

It has no logic at all: no protobuf (requests and responses stay raw bytes),
no interceptor, no logging. Its methods answer with the serialized
GenerateImageResponse messages that `bench.run` captured from the SIA server
under test, so the client receives exactly the bytes SIA sends:

    /bench.Echo/Small   the answer to a URL GenerateImage call (a few hundred bytes)
    /bench.Echo/Large   the answer to a B64_JSON GenerateImage call (the image's bytes)
    /bench.Echo/Hold    a server stream: the Small answer once, then nothing until the
                        client cancels (target 7's idle watches, without SIA)

It uses the same channel options as SIA (message size, pending-call and stream
limits) and prints one JSON line `{"event": "echo_ready", "port": N}` once it
listens.

    python -m bench.echo_server --small FILE --large FILE [--port 0] [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import grpc.aio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

SERVICE = "bench.Echo"
MAX_MESSAGE = 64 * 1024 * 1024

#: The options SIA's server uses (sia.rpc.server.server_options), minus keepalive.
OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.server.max_pending_requests", 3000),
    ("grpc.max_concurrent_streams", 100_000),
    ("grpc.so_reuseport", 0),
]


def _handler(answer: bytes) -> grpc.RpcMethodHandler[bytes, bytes]:
    async def unary(_: bytes, __: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return answer

    return grpc.unary_unary_rpc_method_handler(unary)


def _hold(answer: bytes) -> grpc.RpcMethodHandler[bytes, bytes]:
    async def hold(_: bytes, __: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
        yield answer
        await asyncio.Event().wait()  # until the client cancels the call

    return grpc.unary_stream_rpc_method_handler(hold)


async def serve_until_signalled(
    server: grpc.aio.Server, host: str, port: int, ready_event: str
) -> None:
    """Bind, start, print `{"event": ready_event, "port": N}`, and stop on SIGTERM or SIGINT."""
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(json.dumps({"event": ready_event, "port": bound}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


async def serve(host: str, port: int, small: bytes, large: bytes) -> None:
    """Serve until SIGTERM or SIGINT."""
    server = grpc.aio.server(options=OPTIONS)
    handlers = {"Small": _handler(small), "Large": _handler(large), "Hold": _hold(small)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    await serve_until_signalled(server, host, port, "echo_ready")


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments and serve."""
    parser = argparse.ArgumentParser(prog="bench.echo_server", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--small", type=Path, required=True, help="bytes of the Small answer")
    parser.add_argument("--large", type=Path, required=True, help="bytes of the Large answer")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args(argv)
    coro = serve(args.host, args.port, args.small.read_bytes(), args.large.read_bytes())
    if args.uvloop:
        import uvloop  # noqa: PLC0415 - optional

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    main()
