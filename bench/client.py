"""The load driver: a separate process that runs one measurement per command.

`bench.run` and `bench.ab` start it once and talk to it over pipes: one JSON
object per line on stdin (a command), one JSON object per line on stdout (its
result). It drives gRPC targets (SIA or the echo) with grpc.aio and the fake
upstream directly with aiohttp, and reads the server's CPU time and memory
from /proc (bench/procfs.py) at the edges of each measured window, so the
figures cover exactly the calls counted.

Commands (`op`):

    load    closed loop: `concurrency` coroutines call `method` back to back (with
            `metadata` pairs, e.g. an API key, when given);
            `warmup` seconds are run first and not counted, then `duration`
            seconds are measured (calls/s, latency percentiles, server CPU per call)
    burst   `calls` calls started at once over `channels` connections; wall time,
            errors, server peak RSS
    http    closed loop of aiohttp POSTs of `body` to `url` (the upstream directly, or
            SIA's REST API with `server_pid`) over one keep-alive connection per
            coroutine; an answer other than 200 counts as an error, by status
    e2e     submit `tasks` GenerateImageAsync calls at once, poll each with
            GetImageTask until it finishes; tasks/s from the server's timestamps
    probe   one call; writes the serialized response to `out`
    quit    exit

and target 7's commands (streams, watches and the fake Ark they need), in
bench/client_stream.py.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import grpc.aio
import orjson

from bench.config import GENERATE, SUBMIT
from bench.procfs import Window, memory, reset_peak
from sia.api.image.v1 import image_service_pb2 as pb

MAX_MESSAGE = 64 * 1024 * 1024
GET_TASK = "/image.v1.ImageService/GetImageTask"
_FORMATS = {"URL": pb.RESPONSE_FORMAT_URL, "B64_JSON": pb.RESPONSE_FORMAT_B64_JSON}
_RESPONSES: dict[str, Any] = {
    GENERATE: pb.GenerateImageResponse,
    SUBMIT: pb.GenerateImageAsyncResponse,
    GET_TASK: pb.GetImageTaskResponse,
}
_TERMINAL = {pb.TASK_STATUS_SUCCEEDED, pb.TASK_STATUS_FAILED, pb.TASK_STATUS_CANCELLED}


# --- gRPC ---------------------------------------------------------------------------------


def make_request(fields: dict[str, Any]) -> pb.GenerateImageRequest:
    """A GenerateImageRequest from JSON fields; response_format by name."""
    values = dict(fields)
    if "response_format" in values:
        values["response_format"] = _FORMATS[values["response_format"]]
    return pb.GenerateImageRequest(**values)


def channels(target: str, count: int) -> list[grpc.aio.Channel]:
    """`count` channels, each its own HTTP/2 connection."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.use_local_subchannel_pool", 1),  # else channels share one connection
    ]
    return [grpc.aio.insecure_channel(target, options=options) for _ in range(count)]


def callable_for(
    channel: grpc.aio.Channel, method: str, response: str | None
) -> grpc.aio.UnaryUnaryMultiCallable[Any, Any]:
    """A unary callable for `method`; `response` names the reply type (for the echo's paths)."""
    reply = getattr(pb, response) if response else _RESPONSES[method]
    return channel.unary_unary(
        method,
        request_serializer=lambda msg: msg.SerializeToString(),
        response_deserializer=reply.FromString,
    )


def percentiles(latencies: list[float]) -> dict[str, float]:
    """p50, p90 and p99 in milliseconds."""
    if not latencies:
        return {"p50_ms": 0.0, "p90_ms": 0.0, "p99_ms": 0.0}
    ordered = sorted(latencies)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"p50_ms": statistics.median(ordered) * 1000, "p90_ms": at(0.9), "p99_ms": at(0.99)}


async def closed_loop(
    call: Any, concurrency: int, warmup: float, duration: float, window: Window
) -> dict[str, Any]:
    """Run `call()` from `concurrency` coroutines; measure `duration` s after `warmup` s."""
    done = 0
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    measuring = False
    stop = False

    async def worker() -> None:
        nonlocal done
        while not stop:
            start = time.perf_counter()
            counted = measuring
            try:
                await call()
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
                continue
            except aiohttp.ClientResponseError as exc:
                errors[f"HTTP {exc.status}"] += 1
                continue
            except aiohttp.ClientError as exc:
                errors[type(exc).__name__] += 1
                continue
            done += 1
            if counted and measuring:
                latencies.append(time.perf_counter() - start)

    workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await asyncio.sleep(warmup)
    window.open()
    before, measuring = done, True
    await asyncio.sleep(duration)
    calls, measuring = done - before, False
    figures = window.close()
    stop = True
    await asyncio.gather(*workers)
    return {
        "calls": calls,
        "calls_per_s": calls / figures["elapsed_s"],
        "server_cpu_per_call_ms": figures["server_cpu_s"] / calls * 1000 if calls else None,
        "errors": dict(errors),
        **percentiles(latencies),
        **figures,
    }


async def op_load(cmd: dict[str, Any]) -> dict[str, Any]:
    """The `load` command."""
    pid = cmd.get("server_pid")
    chans = channels(cmd["target"], cmd.get("channels", 1))
    try:
        stubs = [callable_for(c, cmd["method"], cmd.get("response")) for c in chans]
        request = make_request(cmd.get("request", {}))
        timeout = cmd.get("timeout", 30.0)
        metadata = tuple((str(k), str(v)) for k, v in cmd.get("metadata", ())) or None
        turn = 0

        async def call() -> None:
            nonlocal turn
            turn += 1
            await stubs[turn % len(stubs)](request, timeout=timeout, metadata=metadata)

        if pid:
            idle = memory(pid)["VmRSS"]
            reset_peak(pid)
        result = await closed_loop(
            call, cmd["concurrency"], cmd.get("warmup", 0.5), cmd["duration"], _window(cmd)
        )
        if pid:
            result.update(idle_rss=idle, peak_rss=memory(pid)["VmHWM"])
        return result
    finally:
        for chan in chans:
            await chan.close()


async def op_burst(cmd: dict[str, Any]) -> dict[str, Any]:
    """The `burst` command."""
    pid = cmd.get("server_pid")
    chans = channels(cmd["target"], cmd.get("channels", 1))
    try:
        stubs = [callable_for(c, cmd["method"], cmd.get("response")) for c in chans]
        request = make_request(cmd.get("request", {}))
        timeout = cmd.get("timeout", 30.0)
        for chan in chans:  # connect first: the burst measures calls, not handshakes
            await chan.channel_ready()
        errors: Counter[str] = Counter()
        latencies: list[float] = []
        start = time.perf_counter()

        async def call(i: int) -> None:
            try:
                await stubs[i % len(stubs)](request, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
            else:
                latencies.append(time.perf_counter() - start)

        window = _window(cmd)
        if pid:
            idle = memory(pid)["VmRSS"]
            reset_peak(pid)
        window.open()
        start = time.perf_counter()
        await asyncio.gather(*(call(i) for i in range(cmd["calls"])))
        wall = time.perf_counter() - start
        figures = window.close()
        result: dict[str, Any] = {
            "calls": cmd["calls"],
            "ok": len(latencies),
            "errors": dict(errors),
            "wall_s": wall,
            "calls_per_s": len(latencies) / wall,
            **percentiles(latencies),
            **figures,
        }
        if pid:
            result.update(idle_rss=idle, peak_rss=memory(pid)["VmHWM"], rss=memory(pid)["VmRSS"])
        return result
    finally:
        for chan in chans:
            await chan.close()


async def op_http(cmd: dict[str, Any]) -> dict[str, Any]:
    """The `http` command: JSON POSTs, each answer read and parsed (as gRPC's are)."""
    body = orjson.dumps(cmd["body"])
    headers = {"Content-Type": "application/json", **cmd.get("headers", {})}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def call() -> None:
            async with session.post(cmd["url"], data=body, headers=headers) as resp:
                payload = orjson.loads(await resp.read())
                if resp.status != 200:
                    raise aiohttp.ClientResponseError(
                        resp.request_info, (), status=resp.status, message=str(payload)
                    )

        return await closed_loop(
            call, cmd["concurrency"], cmd.get("warmup", 0.5), cmd["duration"], _window(cmd)
        )


async def op_e2e(cmd: dict[str, Any]) -> dict[str, Any]:
    """The `e2e` command: async tasks from submission to the end of the last one."""
    (chan,) = channels(cmd["target"], 1)
    try:
        submit = callable_for(chan, SUBMIT, None)
        get = callable_for(chan, GET_TASK, None)
        request = make_request(cmd.get("request", {}))
        poll = cmd.get("poll", 0.05)
        deadline = time.monotonic() + cmd.get("timeout", 120.0)
        start = time.perf_counter()
        submitted = await asyncio.gather(
            *(submit(request, timeout=30) for _ in range(cmd["tasks"]))
        )

        async def wait(task_id: str) -> pb.GetImageTaskResponse:
            while True:
                state: pb.GetImageTaskResponse = await get(
                    pb.GetImageTaskRequest(task_id=task_id), timeout=30
                )
                if state.status in _TERMINAL or time.monotonic() > deadline:
                    return state
                await asyncio.sleep(poll)

        finals = await asyncio.gather(*(wait(s.task_id) for s in submitted))
        wall = time.perf_counter() - start
        first = min(f.created_at.ToNanoseconds() for f in finals)
        last = max(f.finished_at.ToNanoseconds() for f in finals)
        span = (last - first) / 1e9
        statuses = Counter(pb.TaskStatus.Name(f.status) for f in finals)
        return {
            "tasks": len(finals),
            "statuses": dict(statuses),
            "span_s": span,
            "wall_s": wall,
            "tasks_per_s": len(finals) / span if span > 0 else None,
        }
    finally:
        await chan.close()


async def op_probe(cmd: dict[str, Any]) -> dict[str, Any]:
    """The `probe` command: one call, its serialized answer written to `out`."""
    (chan,) = channels(cmd["target"], 1)
    try:
        raw: grpc.aio.UnaryUnaryMultiCallable[Any, bytes] = chan.unary_unary(
            cmd["method"],
            request_serializer=lambda msg: msg.SerializeToString(),
            response_deserializer=None,
        )
        answer: bytes = await raw(make_request(cmd.get("request", {})), timeout=30)
        await asyncio.to_thread(Path(cmd["out"]).write_bytes, answer)
        return {"bytes": len(answer)}
    finally:
        await chan.close()


def _window(cmd: dict[str, Any]) -> Window:
    return Window(cmd.get("server_pid"), cmd.get("watch_pids", []))


OPS = {"load": op_load, "burst": op_burst, "http": op_http, "e2e": op_e2e, "probe": op_probe}


def all_ops() -> dict[str, Any]:
    """These commands and bench/client_stream.py's (which imports this module's helpers)."""
    from bench import client_stream  # noqa: PLC0415 - imported after this module is complete

    return {**OPS, **client_stream.OPS}


async def main_async() -> None:
    """Answer commands until `quit` or end of input."""
    loop = asyncio.get_running_loop()
    ops = all_ops()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line or not line.strip():
            return
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            return
        try:
            result = await ops[cmd["op"]](cmd)
        except Exception as exc:  # reported to the orchestrator, which decides
            result = {"failed": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


def main() -> None:
    """Run on uvloop when it is installed (less client CPU per call on a shared machine)."""
    try:
        import uvloop  # noqa: PLC0415 - optional
    except ImportError:
        asyncio.run(main_async())
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main_async())


if __name__ == "__main__":
    main()
