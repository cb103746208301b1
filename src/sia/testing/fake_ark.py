"""A fake Volcengine Ark image server: the real wire format over real HTTP.

Integration tests run SIA against it, benchmarks use it as the upstream, and
people start it by hand (`sia fake-ark --port 18080`). It follows the Ark wire
notes of docs/providers.md field by field and checks requests against the model
catalogue of `sia.models`.

    async with FakeArk(api_key="test-key") as fake:   # binds 127.0.0.1, port 0
        fake.base_url                                  # "http://127.0.0.1:<port>"
        fake.requests[-1].body                         # the request log

Routes: `POST /api/v3/images/generations` (the Ark API), `GET /images/<name>.jpeg`
(what result URLs point at) and `GET /healthz`. Every response carries
`X-Request-Id`. Images are real JPEGs, 64x64 solid colours rendered once and
cached; the `size` field reports the requested size all the same.

Trigger words in the prompt script an outcome without any configuration (the
constants `TRIGGER_*` of this module hold them as format strings):

    [moderate:N]      image N (from 0; also "1,3") fails OutputImageSensitiveContentDetected;
                      a group continues
    [internal:N]      image N fails InternalServiceError and the group stops there
    [count:N]         the model "decides" to make N images (at most max_images)
    [error:CODE]      the whole request fails with CODE and its status (ERROR_STATUS)
    [retry-after:S]   adds `Retry-After: S` to that error response
    [latency:S]       answer after S seconds (a stream spreads them over its images)
    [drop]            close the connection without a response
    [drop:N]          streams: close the connection after N image frames (else like [drop])

A request without `sequential_image_generation: "auto"` makes one image; when
that image fails and the request is not a stream, the whole request fails with
the image's error (400 or 500). Groups report failed images as `data` items
`{"error": {...}}` with HTTP 200, or as `partial_failed` frames when streaming.

Scripting: `fake.script(*outcomes)` queues outcomes, one taken by each
generation request that passes the key check and validation, in order; they
override the prompt's trigger words. When the queue is empty normal behaviour
resumes.

    fake.script(
        FakeError("ModelAccountRpmRateLimitExceeded", retry_after=1),  # a 429
        FakeDrop(),                           # "drop" works too
        FakeOK(count=2, moderate=(1,)),        # "ok" works too
        "QuotaExceeded",                      # any other string is an error code
    )

The request log `fake.requests` holds a `RecordedRequest` per call of the API
route (body, headers, times, request ids) with its `outcome`: "ok", "error:<code>",
"dropped", "client_disconnected" (the client went away first) or "cancelled"
(the fake closed while it ran). It keeps the last `max_records` or more.

Latency: errors answer at once unless the prompt or the outcome gives one;
everything else waits `fake.latency` seconds per request plus
`fake.image_latency` per image attempted.

`b64_bytes=N` makes every image (b64_json payloads and URL downloads) one cached
real JPEG of exactly N bytes: a small picture padded with JPEG comment segments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import Any

from sia.logs import configure_logging, get_logger
from sia.testing.fake_ark_requests import ERROR_STATUS, ERRORS, error_status
from sia.testing.fake_ark_server import (
    GENERATIONS_PATH,
    TRIGGER_COUNT,
    TRIGGER_DROP,
    TRIGGER_DROP_AFTER,
    TRIGGER_INTERNAL,
    TRIGGER_MODERATE,
    FakeArk,
    FakeDrop,
    FakeError,
    FakeOK,
    padded_jpeg,
)
from sia.testing.fake_upstream import (
    CANCELLED,
    CLIENT_DISCONNECTED,
    DEFAULT_API_KEY,
    DROPPED,
    OK,
    PENDING,
    TRIGGER_ERROR,
    TRIGGER_LATENCY,
    TRIGGER_RETRY_AFTER,
    RecordedRequest,
)

__all__ = [
    "CANCELLED",
    "CLIENT_DISCONNECTED",
    "DEFAULT_API_KEY",
    "DROPPED",
    "ERRORS",
    "ERROR_STATUS",
    "GENERATIONS_PATH",
    "OK",
    "PENDING",
    "TRIGGER_COUNT",
    "TRIGGER_DROP",
    "TRIGGER_DROP_AFTER",
    "TRIGGER_ERROR",
    "TRIGGER_INTERNAL",
    "TRIGGER_LATENCY",
    "TRIGGER_MODERATE",
    "TRIGGER_RETRY_AFTER",
    "FakeArk",
    "FakeDrop",
    "FakeError",
    "FakeOK",
    "RecordedRequest",
    "error_status",
    "main",
    "padded_jpeg",
    "run_fake_ark",
]

_log = get_logger("sia.testing.fake_ark")


async def run_fake_ark(
    host: str = "127.0.0.1",
    port: int = 18080,
    api_key: str | None = DEFAULT_API_KEY,
    latency: float = 0.0,
    **options: Any,
) -> None:
    """Serve a FakeArk until cancelled; logs its base URL. `options` go to FakeArk."""
    options.setdefault("max_records", 1000)
    async with FakeArk(api_key=api_key, latency=latency, host=host, port=port, **options) as fake:
        _log.info("fake_ark_listening", base_url=fake.base_url, latency=latency)
        try:
            await asyncio.Event().wait()
        finally:
            _log.info("fake_ark_stopping", generations=fake.generations)


def main(argv: list[str] | None = None) -> None:
    """`sia fake-ark` (or `python -m sia.testing.fake_ark`): serve until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="sia fake-ark", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18080)
    parser.add_argument("--api-key", default=DEFAULT_API_KEY)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--image-latency", type=float, default=0.0, help="seconds per image")
    parser.add_argument("--b64-bytes", type=int, default=None, help="bytes per image")
    args = parser.parse_args(argv)
    configure_logging()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


async def _serve(args: argparse.Namespace) -> None:
    """Run until Ctrl-C or SIGTERM, so scripts can stop it with a plain `kill`."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await run_fake_ark(
            args.host,
            args.port,
            args.api_key,
            args.latency,
            image_latency=args.image_latency,
            b64_bytes=args.b64_bytes,
        )


if __name__ == "__main__":
    main()
