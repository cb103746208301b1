"""The webhook dispatcher: events stored at once, POSTed by a worker until delivered.

`Webhooks.enqueue` turns a task's event into a `Delivery` and stores it
before anything is sent, then wakes the worker. The worker claims due
deliveries from the store (a few at a time: `concurrency` attempts in
flight at most), signs each attempt according to Standard Webhooks
(`webhook-id`, `webhook-timestamp`, `webhook-signature`; the id stays the
same on every attempt, the timestamp and signature are the attempt's own)
and POSTs it with `Sender`. Then, by the answer:

- 2xx: delivered, the delivery is forgotten;
- 429, 5xx, a timeout or a connection failure: retried after the next delay
  of `retry_delays` (with jitter; the receiver's Retry-After when longer, up
  to the longest delay), until WEBHOOK_RETRY_PERIOD after the event, when it
  is given up ("expired");
- anything else (3xx: redirects are not followed; other 4xx; an address the
  SSRF rules refuse): given up at once ("rejected").

Every failed attempt logs `webhook_attempt_failed` (warning); giving up logs
`webhook_gave_up` (error). Logs show the receiver as scheme://host:port only:
the path and query are the caller's and may hold a token. Metrics:
`sia_webhook_deliveries_total{outcome}` per attempt and
`sia_webhook_delivery_seconds` per attempt.

The store, not this object, holds what is pending: a dispatcher closed in
the middle (or a process that dies) leaves its deliveries there, and the
next one to start on the same store sends them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import random
import time
import weakref
from datetime import UTC, datetime
from typing import TYPE_CHECKING, ClassVar, Final, Self

from prometheus_client import CollectorRegistry, Counter, Histogram
from standardwebhooks import Webhook

from sia.errors import ConfigError, FailedPrecondition, InvalidArgument, SiaError
from sia.logs import get_logger
from sia.webhooks.events import TASK_IMAGE, task_event
from sia.webhooks.sender import INVALID_URL, Answer, Sender
from sia.webhooks.store import Delivery
from sia.webhooks.urls import check_webhook_url, origin, parse_target

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType

    import aiohttp

    from sia.config import Settings
    from sia.domain import GeneratedImage, GenerationRequest, Task
    from sia.metrics import Metrics
    from sia.webhooks.store import DeliveryStore

log = get_logger("sia.webhooks")

#: Seconds before each retry: the last one repeats until the retry period ends.
RETRY_DELAYS: Final = (5.0, 30.0, 120.0, 600.0, 3600.0)
#: Each delay is drawn from [d * (1 - JITTER), d * (1 + JITTER)].
JITTER: Final = 0.2
#: Attempts in flight at once, per dispatcher.
CONCURRENCY: Final = 8
#: How often the worker looks for due deliveries it was not woken for (retries, other replicas').
POLL_INTERVAL: Final = 1.0
#: How long aclose() lets attempts in flight finish before it interrupts them.
CLOSE_GRACE: Final = 2.0
#: How long a claim hides a delivery beyond the attempt's own timeout: a dispatcher that died
#: mid-attempt leaves its claim, which then runs out and the delivery is sent again.
LEASE_MARGIN: Final = 30.0
#: Standard Webhooks secrets are 24 to 64 random bytes.
SECRET_BYTES = (24, 64)

DELIVERED, RETRIED, REJECTED, EXPIRED = "delivered", "retried", "rejected", "expired"
OUTCOMES = (DELIVERED, RETRIED, REJECTED, EXPIRED)
_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class WebhookMetrics:
    """The dispatcher's Prometheus metrics, defined once per registry."""

    _by_registry: ClassVar[weakref.WeakKeyDictionary[CollectorRegistry, WebhookMetrics]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, registry: CollectorRegistry) -> None:
        self.deliveries = Counter(
            "sia_webhook_deliveries",
            "Webhook delivery attempts by outcome: delivered, retried (failed, will be retried), "
            "rejected (not retried: 3xx, 4xx, refused address) and expired (retry period over).",
            ["outcome"],
            registry=registry,
        )
        self.seconds = Histogram(
            "sia_webhook_delivery_seconds",
            "Time of one webhook delivery attempt, from connecting to the answer's status.",
            buckets=_SECONDS_BUCKETS,
            registry=registry,
        )
        for outcome in OUTCOMES:
            self.deliveries.labels(outcome)

    @classmethod
    def on(cls, registry: CollectorRegistry) -> WebhookMetrics:
        """The metrics on `registry`, defined there on first use (a restarted dispatcher
        reuses them)."""
        metrics = cls._by_registry.get(registry)
        if metrics is None:
            metrics = cls._by_registry[registry] = cls(registry)
        return metrics


class Webhooks:
    """Sends task events to the webhook URLs tasks name; `start()` (or `async with`) first.

    Without WEBHOOK_SECRET `enabled` is False: `check` refuses any webhook_url,
    `enqueue` drops events and no worker runs. The store is the caller's: it
    is opened before and closed after this object.
    """

    def __init__(
        self,
        settings: Settings,
        store: DeliveryStore,
        metrics: Metrics | CollectorRegistry | None = None,
        *,
        client: aiohttp.ClientSession | None = None,
        retry_delays: Sequence[float] = RETRY_DELAYS,
        jitter: float = JITTER,
        concurrency: int = CONCURRENCY,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        if not retry_delays or min(retry_delays) < 0:
            raise ValueError("retry_delays must be one or more delays of 0 s or more")
        self.allow_private = settings.webhook_allow_private
        self.retry_period = settings.webhook_retry_period
        self.retry_delays = tuple(retry_delays)
        self.jitter = jitter
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self._signer = _signer(settings)
        self._store = store
        if isinstance(metrics, CollectorRegistry):
            registry = metrics
        else:
            registry = CollectorRegistry() if metrics is None else metrics.registry
        self.metrics = WebhookMetrics.on(registry)
        self._sender = Sender(
            timeout=settings.webhook_timeout,
            allow_private=self.allow_private,
            concurrency=concurrency,
            client=client,
        )
        self._lease = settings.webhook_timeout + LEASE_MARGIN
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._in_flight: dict[asyncio.Task[None], Delivery] = {}
        self._closed = False

    @property
    def enabled(self) -> bool:
        """True when WEBHOOK_SECRET is set: webhook URLs are accepted and events sent."""
        return self._signer is not None

    def check(self, request: GenerationRequest) -> None:
        """Refuse, at submit, a webhook this server cannot send.

        FailedPrecondition when a webhook_url is given and webhooks are off;
        InvalidArgument naming the field when the URL is not one webhooks may
        reach (its syntax, or an address the SSRF rules refuse).
        """
        if not request.webhook_url:
            if request.webhook_images:
                raise InvalidArgument.field("webhook_each_image", "needs webhook_url")
            return
        if not self.enabled:
            raise FailedPrecondition(
                "webhooks are off on this server: WEBHOOK_SECRET is not set",
                metadata={"field": "webhook_url"},
            )
        check_webhook_url(request.webhook_url, "webhook_url", allow_private=self.allow_private)

    async def start(self) -> None:
        """Open the HTTP session and start the worker; nothing when webhooks are off."""
        if self._closed:
            raise RuntimeError("Webhooks cannot start again once closed; make a new one")
        if self._worker is not None or not self.enabled:
            return
        await self._sender.start()
        self._worker = asyncio.create_task(self._run(), name="sia-webhooks")

    async def enqueue(self, task: Task, kind: str, *, image: GeneratedImage | None = None) -> None:
        """Store the `kind` event of `task` for delivery, then wake the worker.

        Nothing happens when the task has no webhook_url, or for a `task.image`
        event when it did not ask for one per image. Unavailable when the store
        cannot take it.
        """
        request = task.request
        if not request.webhook_url or (kind == TASK_IMAGE and not request.webhook_images):
            return
        if not self.enabled:
            log.warning("webhook_dropped", task_id=task.id, reason="WEBHOOK_SECRET is not set")
            return
        event = task_event(task, kind, image=image)
        now = time.time()
        delivery = Delivery(
            id=event.id,
            task_id=task.id,
            type=event.type,
            url=request.webhook_url,
            payload=event.payload.decode(),
            created_at=now,
            next_at=now,
        )
        await self._store.add(delivery)
        self._wake.set()

    async def aclose(self, grace: float = CLOSE_GRACE) -> None:
        """Stop the worker, give attempts in flight up to `grace` s, close the session.

        Attempts still running then are interrupted and their deliveries made
        due at once, for whichever dispatcher runs next on the store.
        Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        if self._in_flight and grace > 0:
            await asyncio.wait(list(self._in_flight), timeout=grace)
        interrupted = dict(self._in_flight)
        for attempt in interrupted:
            attempt.cancel()
        if interrupted:
            await asyncio.gather(*interrupted, return_exceptions=True)
        now = time.time()
        for delivery in interrupted.values():
            with contextlib.suppress(SiaError):
                await self._store.reschedule(
                    delivery.id, now, delivery.attempts, "interrupted by shutdown"
                )
        await self._sender.aclose()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _run(self) -> None:
        """Claim due deliveries and start their attempts, for as long as the dispatcher runs."""
        failures = 0
        while not self._closed:
            self._wake.clear()
            free = self.concurrency - len(self._in_flight)
            claimed: list[Delivery] = []
            if free > 0:
                try:
                    claimed = await self._store.claim_due(time.time(), free, lease=self._lease)
                except SiaError:  # logged by the store; the deliveries wait there
                    failures += 1
                    await asyncio.sleep(min(self.poll_interval * 2**failures, 5.0))
                    continue
                except Exception:  # a bug must not stop every later delivery
                    log.exception("webhook_worker_error")
                    await asyncio.sleep(max(self.poll_interval, 1.0))
                    continue
                failures = 0
                for delivery in claimed:
                    attempt = asyncio.create_task(self._attempt(delivery))
                    self._in_flight[attempt] = delivery
                    attempt.add_done_callback(self._finished)
            if free > 0 and len(claimed) == free:
                continue  # more may be due: claim again once a slot frees
            # Not wait_for: on 3.11 it swallows a cancel that lands as the event is set.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._wake.wait()

    def _finished(self, attempt: asyncio.Task[None]) -> None:
        self._in_flight.pop(attempt, None)
        if not attempt.cancelled() and (exc := attempt.exception()) is not None:
            log.error("webhook_attempt_error", error=type(exc).__name__, detail=str(exc)[:200])
        self._wake.set()

    async def _attempt(self, delivery: Delivery) -> None:
        """One attempt of `delivery`, and what the store should do after it."""
        answer = await self._send(delivery)
        self.metrics.seconds.observe(answer.seconds)
        if answer.ok:
            self.metrics.deliveries.labels(DELIVERED).inc()
            log.debug(
                "webhook_delivered",
                task_id=delivery.task_id,
                webhook_id=delivery.id,
                attempt=delivery.attempts,
                status=answer.status,
            )
            await self._forget(delivery)
            return
        now = time.time()
        next_at: float | None = None
        if answer.retryable:
            next_at = now + self._delay(delivery.attempts, answer.retry_after)
            outcome = RETRIED if next_at <= delivery.created_at + self.retry_period else EXPIRED
        else:
            outcome = REJECTED
        if outcome != RETRIED:
            next_at = None
        self.metrics.deliveries.labels(outcome).inc()
        fields = {
            "task_id": delivery.task_id,
            "webhook_id": delivery.id,
            "event_type": delivery.type,
            "target": origin(delivery.url),
            "attempt": delivery.attempts,
            "status": answer.status,
            "error": answer.error or f"http_{answer.status}",
            "detail": answer.detail,
            "outcome": outcome,
        }
        log.warning(
            "webhook_attempt_failed",
            next_attempt_at=None if next_at is None else _iso(next_at),
            **fields,
        )
        if next_at is None:
            log.error("webhook_gave_up", **fields)
            await self._forget(delivery)
            return
        last_error = fields["error"] if answer.status is None else f"HTTP {answer.status}"
        with contextlib.suppress(SiaError):  # logged by the store; the claim runs out instead
            await self._store.reschedule(delivery.id, next_at, delivery.attempts, str(last_error))

    async def _send(self, delivery: Delivery) -> Answer:
        try:
            target = parse_target(delivery.url, "webhook_url", allow_private=self.allow_private)
        except InvalidArgument as exc:  # the rules may have tightened since it was accepted
            return Answer(error=INVALID_URL, detail=exc.message)
        signer = self._signer
        assert signer is not None  # the worker runs only when enabled
        moment = datetime.now(UTC)
        headers = {
            "content-type": "application/json",
            "webhook-id": delivery.id,
            "webhook-timestamp": str(int(moment.timestamp())),
            "webhook-signature": signer.sign(delivery.id, moment, delivery.payload),
        }
        return await self._sender.post(target.url, delivery.payload.encode(), headers)

    async def _forget(self, delivery: Delivery) -> None:
        with contextlib.suppress(SiaError):  # logged by the store; it is sent again, at worst
            await self._store.done(delivery.id)

    def _delay(self, attempts: int, retry_after: float | None) -> float:
        """Seconds before the attempt after attempt number `attempts` (1-based)."""
        delays = self.retry_delays
        base = delays[min(attempts, len(delays)) - 1]
        delay = base * random.uniform(1 - self.jitter, 1 + self.jitter)  # noqa: S311 - jitter
        if retry_after is not None:
            delay = max(delay, min(retry_after, max(delays)))
        return delay


def _signer(settings: Settings) -> Webhook | None:
    """The signer for WEBHOOK_SECRET, None without one; ConfigError when it is malformed."""
    if settings.webhook_secret is None:
        return None
    text = settings.webhook_secret.get_secret_value()
    prefix = "whsec_"
    problem = f"WEBHOOK_SECRET must be {prefix} and the base64 of 24 to 64 random bytes"
    if not text.startswith(prefix):
        raise ConfigError(problem)
    encoded = text.removeprefix(prefix)
    try:
        # Strict, padding included: receivers' standardwebhooks decodes it so.
        raw = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise ConfigError(problem) from None
    if not SECRET_BYTES[0] <= len(raw) <= SECRET_BYTES[1]:
        raise ConfigError(problem)
    return Webhook(raw)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")
