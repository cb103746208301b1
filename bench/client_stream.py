"""The load driver's commands for results as they happen (target 7), with a fake Ark in-process.

The fake Ark runs in the load driver itself, on its event loop: the moment it
wrote an image frame (`RecordedRequest.frames_sent`) and the moment the image
reached us are read from one clock, `time.monotonic()`. Each group's prompt
carries a tag of its own, which pairs the fake's request with our call.

Commands (`op`), registered by bench/client.py:

    fake_start  start the fake (`image_latency` seconds per image); answers its base_url
    fake_stop   stop it
    stream      `groups` StreamSequentialImages calls of `images` images, `concurrency`
                at once; the delay from each frame to its image (with `direct`, the same
                groups read straight from the fake over SSE, without SIA)
    watch       the same through GenerateSequentialImagesAsync and WatchImageTask: the
                delay from each frame to the first watch message that shows the image
    watchers    `watchers` WatchImageTask streams on `tasks` long tasks over `channels`
                connections; the server's RSS and CPU while they idle, then all cancelled
    hold        the same number of streams held open on the echo (/bench.Echo/Hold): the
                baseline of their RSS
"""

from __future__ import annotations

import asyncio
import time
from itertools import count
from typing import TYPE_CHECKING, Any

import aiohttp
import grpc
import grpc.aio
import orjson

from bench.client import channels, percentiles
from bench.config import PROMPT, SIZE
from bench.procfs import Window, rss
from sia.api.image.v1 import image_service_pb2 as pb
from sia.testing.fake_ark import GENERATIONS_PATH, TRIGGER_LATENCY, FakeArk

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sia.testing.fake_ark import RecordedRequest

SERVICE = "/image.v1.ImageService/"
HOLD = "/bench.Echo/Hold"
LONG = 3600.0  # seconds a watched task's generation takes: it stays RUNNING throughout
_fake: FakeArk | None = None
_tags = count()
Arrivals = dict[str, dict[int, float]]  # prompt -> image index -> time.monotonic() received


def _stub(chan: grpc.aio.Channel, method: str, reply: Any, stream: bool = False) -> Any:
    """A callable for ImageService's `method`, unary or server-streaming."""
    make = chan.unary_stream if stream else chan.unary_unary
    return make(
        SERVICE + method,
        request_serializer=lambda msg: msg.SerializeToString(),
        response_deserializer=reply.FromString,
    )


def _default_model() -> str:
    """IMAGE_MODEL's default, the model SIA asks the fake for."""
    from sia.config import Settings  # noqa: PLC0415 - only for its default

    return str(Settings.model_fields["image_model"].default)


def _the_fake() -> FakeArk:
    if _fake is None:
        raise RuntimeError("no fake: send fake_start first")
    return _fake


def _group(images: int, extra: str = "") -> pb.GenerateSequentialImagesRequest:
    """A group request whose prompt is unique in this process."""
    prompt = f"{PROMPT} {extra}#{next(_tags)}"
    return pb.GenerateSequentialImagesRequest(prompt=prompt, size=SIZE, max_images=images)


async def op_fake_start(cmd: dict[str, Any]) -> dict[str, Any]:
    """Start the fake on a free port of 127.0.0.1."""
    global _fake  # noqa: PLW0603 - one fake per driver
    if _fake is not None:
        await _fake.close()
    _fake = FakeArk(image_latency=cmd["image_latency"], max_records=None)
    await _fake.start()
    return {"base_url": _fake.base_url}


async def op_fake_stop(cmd: dict[str, Any]) -> dict[str, Any]:
    """Stop the fake."""
    global _fake  # noqa: PLW0603
    if _fake is not None:
        await _fake.close()
        _fake = None
    return {}


async def _run_groups(
    cmd: dict[str, Any],
    one: Callable[[pb.GenerateSequentialImagesRequest, dict[int, float]], Awaitable[None]],
) -> dict[str, Any]:
    """`warmup` groups one by one (not counted), then `groups` groups, `concurrency` at once;
    the delays from each frame the fake wrote to the moment its image arrived."""
    for _ in range(cmd.get("warmup", 1)):
        await one(_group(cmd["images"]), {})
    arrivals: Arrivals = {}
    errors: list[str] = []
    gate = asyncio.Semaphore(cmd["concurrency"])

    async def run(request: pb.GenerateSequentialImagesRequest) -> None:
        async with gate:
            try:
                await one(request, arrivals.setdefault(request.prompt, {}))
            except (grpc.aio.AioRpcError, aiohttp.ClientError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])

    start = time.perf_counter()
    await asyncio.gather(*(run(_group(cmd["images"])) for _ in range(cmd["groups"])))
    wall = time.perf_counter() - start
    return {"wall_s": wall, "errors": errors, **_delays(arrivals, cmd["images"])}


def _delays(arrivals: Arrivals, images: int) -> dict[str, Any]:
    """Pair every image received with its frame in the fake's request of the same prompt."""
    sent: dict[str, RecordedRequest] = {r.body["prompt"]: r for r in _the_fake().requests if r.body}
    delays: list[float] = []
    missing = 0
    for prompt, seen in arrivals.items():
        frames = sent[prompt].frames_sent if prompt in sent else []
        missing += images - len(seen)
        delays += [at - frames[i] for i, at in seen.items() if i < len(frames)]
    return {
        "images": len(delays),
        "missing": missing,
        "min_ms": min(delays, default=0.0) * 1000,
        "max_ms": max(delays, default=0.0) * 1000,
        **percentiles(delays),
    }


async def op_stream(cmd: dict[str, Any]) -> dict[str, Any]:
    """The `stream` command."""
    if cmd.get("direct"):
        return await _direct(cmd)
    (chan,) = channels(cmd["target"], 1)
    try:
        call = _stub(chan, "StreamSequentialImages", pb.StreamSequentialImagesResponse, True)

        async def one(request: pb.GenerateSequentialImagesRequest, seen: dict[int, float]) -> None:
            async for message in call(request, timeout=60):
                if message.WhichOneof("event") == "image":
                    seen[message.image.index] = time.monotonic()

        return await _run_groups(cmd, one)
    finally:
        await chan.close()


async def _direct(cmd: dict[str, Any]) -> dict[str, Any]:
    """The baseline of `stream`: the fake's SSE read with aiohttp, no SIA in between."""
    fake = _the_fake()
    url = fake.base_url + GENERATIONS_PATH
    headers = {"Authorization": f"Bearer {fake.api_key}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:

        async def one(request: pb.GenerateSequentialImagesRequest, seen: dict[int, float]) -> None:
            body = {
                "model": _default_model(),
                "prompt": request.prompt,
                "size": request.size,
                "response_format": "url",
                "sequential_image_generation": "auto",
                "sequential_image_generation_options": {"max_images": request.max_images},
                "stream": True,
            }
            async with session.post(url, data=orjson.dumps(body), headers=headers) as resp:
                resp.raise_for_status()
                async for line in resp.content:
                    if line.startswith(b"data: {"):
                        event = orjson.loads(line[6:])
                        if event.get("type", "").endswith("partial_succeeded"):
                            seen[event["image_index"]] = time.monotonic()

        return await _run_groups(cmd, one)


async def op_watch(cmd: dict[str, Any]) -> dict[str, Any]:
    """The `watch` command."""
    (chan,) = channels(cmd["target"], 1)
    try:
        submit = _stub(chan, "GenerateSequentialImagesAsync", pb.GenerateImageAsyncResponse)
        watch = _stub(chan, "WatchImageTask", pb.GetImageTaskResponse, True)

        async def one(request: pb.GenerateSequentialImagesRequest, seen: dict[int, float]) -> None:
            task = await submit(request, timeout=30)
            async for state in watch(pb.WatchImageTaskRequest(task_id=task.task_id), timeout=60):
                now = time.monotonic()
                for image in state.result.images:
                    seen.setdefault(image.index, now)

        return await _run_groups(cmd, one)
    finally:
        await chan.close()


async def op_watchers(cmd: dict[str, Any]) -> dict[str, Any]:
    """The `watchers` command: many idle watches; what they cost the server while idle."""
    pid, idle = cmd["server_pid"], cmd["idle"]
    chans = channels(cmd["target"], cmd["channels"])
    try:
        get = _stub(chans[0], "GetImageTask", pb.GetImageTaskResponse)
        cancel = _stub(chans[0], "CancelImageTask", pb.CancelImageTaskResponse)
        tasks = await _running_tasks(chans[0], get, cmd["tasks"], cmd["images"])
        for chan in chans:  # connected before the first reading: RSS counts the streams only
            await chan.channel_ready()
        await asyncio.sleep(0.5)
        rss_before = rss(pid)
        quiet = await _idle_window(pid, cmd, idle)

        start = time.perf_counter()
        stubs = [_stub(c, "WatchImageTask", pb.GetImageTaskResponse, True) for c in chans]
        watches = _Streams(
            [
                stubs[i % len(stubs)](pb.WatchImageTaskRequest(task_id=tasks[i % len(tasks)]))
                for i in range(cmd["watchers"])
            ]
        )
        await asyncio.wait_for(watches.all_open.wait(), timeout=60)
        open_s = time.perf_counter() - start
        await asyncio.sleep(1.0)  # let the server settle (the watches' first reads, logs)
        rss_open = rss(pid)
        busy = await _idle_window(pid, cmd, idle)
        rss_idle = rss(pid)

        await watches.cancel()
        for task_id in tasks:
            await cancel(pb.CancelImageTaskRequest(task_id=task_id), timeout=30)
        finals = [(await get(pb.GetImageTaskRequest(task_id=t))).status for t in tasks]
        await asyncio.sleep(1.0)
        return {
            "watchers": cmd["watchers"],
            "tasks": len(tasks),
            "open_s": open_s,
            "rss_before": rss_before,
            "rss_open": rss_open,
            "rss_idle": rss_idle,
            "rss_after_cancel": rss(pid),
            "no_watchers": quiet,
            "with_watchers": busy,
            "extra_messages": watches.extra_messages,
            "ends": watches.ends,
            "tasks_cancelled": sum(1 for s in finals if s == pb.TASK_STATUS_CANCELLED),
        }
    finally:
        for chan in chans:
            await chan.close()


async def _running_tasks(chan: grpc.aio.Channel, get: Any, count: int, images: int) -> list[str]:
    """`count` group tasks whose generation takes `LONG` seconds, once each is RUNNING
    (from then on nothing changes them until they are cancelled)."""
    submit = _stub(chan, "GenerateSequentialImagesAsync", pb.GenerateImageAsyncResponse)
    slow = TRIGGER_LATENCY.format(int(LONG)) + " "
    tasks = [(await submit(_group(images, slow), timeout=30)).task_id for _ in range(count)]
    for task_id in tasks:
        status = pb.TASK_STATUS_QUEUED
        while status == pb.TASK_STATUS_QUEUED:
            await asyncio.sleep(0.05)
            status = (await get(pb.GetImageTaskRequest(task_id=task_id))).status
        if status != pb.TASK_STATUS_RUNNING:
            raise RuntimeError(f"task {task_id} is {pb.TaskStatus.Name(status)}, not running")
    return tasks


class _Streams:
    """Server-streaming calls each read by a task of ours until they end or are cancelled."""

    def __init__(self, calls: list[Any]) -> None:
        self.calls = calls
        self.all_open = asyncio.Event()  # every watch has its first message (the state now)
        self.opened = 0
        self.extra_messages = 0  # messages after the first: none while nothing changes
        self.ends: dict[str, int] = {}  # how the calls ended: cancelled, ended, a gRPC code
        self.readers = [asyncio.create_task(self._read(call)) for call in self.calls]

    async def _read(self, call: Any) -> None:
        first = True
        try:
            async for _ in call:
                if first:
                    first = False
                    self.opened += 1
                    if self.opened == len(self.calls):
                        self.all_open.set()
                else:
                    self.extra_messages += 1
            end = "ended"
        except asyncio.CancelledError:
            end = "cancelled"
        except grpc.aio.AioRpcError as exc:
            end = exc.code().name
        self.ends[end] = self.ends.get(end, 0) + 1

    async def cancel(self) -> None:
        """Cancel every call and wait until each reader has seen it end."""
        for call in self.calls:
            call.cancel()
        await asyncio.gather(*self.readers)


async def op_hold(cmd: dict[str, Any]) -> dict[str, Any]:
    """The `hold` command: `streams` idle streams on the echo; its RSS before and with them."""
    pid = cmd["server_pid"]
    chans = channels(cmd["target"], cmd["channels"])
    try:
        for chan in chans:
            await chan.channel_ready()
        stubs: list[Any] = [c.unary_stream(HOLD) for c in chans]  # raw bytes both ways
        await asyncio.sleep(0.5)
        before = rss(pid)
        streams = _Streams([stubs[i % len(stubs)](b"") for i in range(cmd["streams"])])
        await asyncio.wait_for(streams.all_open.wait(), timeout=60)
        await asyncio.sleep(1.0)
        held = rss(pid)
        await streams.cancel()
        return {
            "streams": cmd["streams"],
            "rss_before": before,
            "rss_held": held,
            "ends": streams.ends,
        }
    finally:
        for chan in chans:
            await chan.close()


async def _idle_window(pid: int, cmd: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The server's CPU over `seconds` in which we send nothing."""
    window = Window(pid, cmd.get("watch_pids", []))
    window.open()
    await asyncio.sleep(seconds)
    figures = window.close()
    return {"cores": figures["server_cpu_s"] / figures["elapsed_s"], **figures}


OPS = {
    "fake_start": op_fake_start,
    "fake_stop": op_fake_stop,
    "stream": op_stream,
    "watch": op_watch,
    "watchers": op_watchers,
    "hold": op_hold,
}
