"""What every fake upstream shares: the HTTP server, the request log and scripting.

`FakeUpstream` binds an aiohttp app (port 0 by default), stamps a request id on
every response, logs each call of the generation route as a `RecordedRequest`
and decides each valid request's outcome from the prompt's trigger words and
the queue of scripted outcomes. An API's module (`fake_ark`, `fake_openai`)
adds its routes, its validation and its answers in its own wire format.

Trigger words every fake understands (an API adds its own):

    [error:CODE]      the whole request fails with CODE and its status
    [retry-after:S]   adds `Retry-After: S` to that error response
    [latency:S]       answer after S seconds

`fake.script(*outcomes)` queues outcomes, one taken by each generation request
that passes the key check and validation, in order; they override the trigger
words. A string names an outcome ("ok", for Ark also "drop") or an error code.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final, Generic, Protocol, Self, TypedDict, TypeVar

from aiohttp import web

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

DEFAULT_API_KEY = "fake-key"

TRIGGER_ERROR = "[error:{}]"
TRIGGER_RETRY_AFTER = "[retry-after:{}]"
TRIGGER_LATENCY = "[latency:{}]"

#: How a logged request ended, besides "error:<code>".
OK: Final = "ok"
DROPPED: Final = "dropped"
CLIENT_DISCONNECTED: Final = "client_disconnected"
CANCELLED: Final = "cancelled"  # the fake itself was closing
PENDING: Final = "pending"


@dataclass(slots=True)
class RecordedRequest:
    """One request to an API route, as received, and how it ended."""

    received: float  # time.monotonic()
    received_at: float  # time.time()
    method: str
    path: str
    headers: dict[str, str]
    request_id: str
    client_request_id: str | None
    body: Any = None
    outcome: str = PENDING
    status: int | None = None
    images: int = 0
    ended: float | None = None  # time.monotonic()
    frames_sent: list[float] = field(default_factory=list)  # time.monotonic() of each image frame

    def header(self, name: str) -> str | None:
        """A request header by case-insensitive name."""
        lowered = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == lowered), None)

    @property
    def duration(self) -> float | None:
        """Seconds from arrival to the end, once ended."""
        return None if self.ended is None else self.ended - self.received


class Outcome(Protocol):
    """A scripted outcome: each API's `FakeOK`, `FakeError` and the like."""

    @property
    def latency(self) -> float | None:
        """Seconds before answering; None leaves the prompt's or the fake's."""


class Reject(Exception):
    """The request fails with an error body; each API's subclass names its table."""

    #: The status of a code the table lacks when none is given.
    fallback_status: ClassVar[int] = 500

    def __init__(
        self,
        code: str | None,
        message: str | None = None,
        param: str | None = None,
        *,
        status: int | None = None,
    ) -> None:
        super().__init__(message or self.message_of(code or "") or "The request failed.")
        self.code, self.param = code, param
        self.status = status or self.status_of(code or "") or self.fallback_status
        self.retry_after: str | None = None

    @staticmethod
    def status_of(code: str) -> int | None:
        """The HTTP status of an error code; None if the API does not know it."""
        return None

    @staticmethod
    def message_of(code: str) -> str | None:
        """The API's message for an error code; None if it has none."""
        return None


@dataclass(frozen=True, slots=True)
class FakeError:
    """Fail the whole request with an error code (status from the API's table unless given).

    Each fake's module subclasses it to name its `Reject`, whose table it checks.
    """

    reject: ClassVar[type[Reject]] = Reject

    code: str
    message: str | None = None
    retry_after: float | None = None
    status: int | None = None
    param: str | None = None
    latency: float | None = None

    def __post_init__(self) -> None:
        if self.status is None and self.reject.status_of(self.code) is None:
            raise ValueError(f"unknown error code {self.code!r}; pass status=")


@dataclass(slots=True)
class Plan:
    """What to do with one valid request: the trigger words merged with the script."""

    error: Reject | None = None
    retry_after: str | None = None
    latency: float | None = None


PlanT = TypeVar("PlanT", bound=Plan)


class ServerOptions(TypedDict, total=False):
    """The keyword arguments of `FakeUpstream`, which each fake passes on."""

    api_key: str | None
    latency: float
    host: str
    port: int
    max_records: int | None


def trigger_pattern(*words: str) -> re.Pattern[str]:
    """The regex of the shared trigger words and an API's own `words`."""
    names = "|".join(("error", "retry-after", "latency", *words))
    return re.compile(rf"\[({names})(?::([^\]\s]*))?\]")


def number(text: str) -> float:
    """A trigger's seconds: a float, at least 0 (NaN refused)."""
    value = float(text)
    if not value >= 0:
        raise ValueError(text)
    return value


class FakeUpstream(Generic[PlanT]):
    """The server, the request log and the script; subclasses speak an API's wire format."""

    #: The route the log records and the script answers.
    generations_path: ClassVar[str]
    #: The header that carries the fake's request id, spelt as the API spells it.
    request_id_header: ClassVar[str] = "X-Request-Id"
    #: The prefix of bad-trigger messages, e.g. "fake-ark".
    name: ClassVar[str]
    #: The API's code for a bad parameter, and its scripted error (which names its `Reject`).
    bad_trigger_code: ClassVar[str]
    error_type: ClassVar[type[FakeError]]
    #: Outcomes a plain string names in `script`; any other string is an error code.
    named_outcomes: ClassVar[Mapping[str, Callable[[], Outcome]]]
    triggers: ClassVar[re.Pattern[str]] = trigger_pattern()
    max_body: ClassVar[int] = 1024**2  # aiohttp's default

    def __init__(
        self,
        *,
        api_key: str | None = DEFAULT_API_KEY,
        latency: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
        max_records: int | None = 10_000,
    ) -> None:
        self.api_key = api_key
        self.latency = latency
        self.max_records = max_records
        self.host = host
        self.requests: list[RecordedRequest] = []
        self.generations = 0  # requests answered with HTTP 200 (groups with failures too)
        self.images_generated = 0
        self.downloads = 0
        self._port = port
        self._script: deque[Outcome] = deque()
        self._runner: web.AppRunner | None = None
        self._closing = False
        self.app = web.Application(client_max_size=self.max_body)
        self.app.router.add_post(self.generations_path, self._generations)
        self.app.on_response_prepare.append(self._stamp)

    @property
    def port(self) -> int:
        """The bound port once started (the one asked for before)."""
        return self._port

    @property
    def base_url(self) -> str:
        """Where clients reach the fake, e.g. "http://127.0.0.1:18080"."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host  # noqa: S104
        return f"http://[{host}]:{self._port}" if ":" in host else f"http://{host}:{self._port}"

    def script(self, *outcomes: Outcome | str) -> None:
        """Queue outcomes for the next valid generation requests, one each, in order."""
        for item in outcomes:
            if isinstance(item, str):
                named = self.named_outcomes.get(item)
                item = named() if named is not None else self.error_type(item)  # noqa: PLW2901
            self._script.append(item)

    @property
    def scripted(self) -> int:
        """How many scripted outcomes are still queued."""
        return len(self._script)

    def reset(self) -> None:
        """Forget the request log, the script and the counters."""
        self.requests.clear()
        self._script.clear()
        self.generations = self.images_generated = self.downloads = 0

    async def start(self) -> None:
        """Bind and serve; `base_url` is valid afterwards."""
        runner = web.AppRunner(
            self.app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._port, backlog=4096)
        await site.start()
        self._runner, self._closing = runner, False
        self._port = runner.addresses[0][1]

    async def close(self) -> None:
        """Stop serving, cancelling requests still in flight; idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            self._closing = True
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # The API's side: ids, answers, errors and its own trigger words.

    def _new_request_id(self) -> str:
        raise NotImplementedError

    async def _generate(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        """Answer a generation request or raise the API's `Reject`."""
        raise NotImplementedError

    def _error_response(self, record: RecordedRequest, exc: Reject) -> web.Response:
        raise NotImplementedError

    def _new_plan(self) -> PlanT:
        raise NotImplementedError

    def _trigger(self, plan: PlanT, word: str, arg: str) -> None:
        """Apply one of the API's own trigger words; ValueError if its argument is bad."""
        raise ValueError(word)

    def _apply_ok(self, plan: PlanT, outcome: Outcome) -> None:
        """Apply a scripted outcome other than an error (the error is cleared already)."""

    # Shared by every API.

    async def _stamp(self, _: web.Request, response: web.StreamResponse) -> None:
        if self.request_id_header not in response.headers:
            response.headers[self.request_id_header] = self._new_request_id()

    def _headers(self, record: RecordedRequest, retry_after: str | None = None) -> dict[str, str]:
        """An answer's headers: the request id, and Retry-After when given."""
        headers = {self.request_id_header: record.request_id}
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        return headers

    def _refused_key(self, request: web.Request) -> str | None:
        """The bearer key a request presented if it is not the fake's ("" for none), else None."""
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if self.api_key is None or (scheme.lower() == "bearer" and key == self.api_key):
            return None
        return key

    def _record(self, request: web.Request) -> RecordedRequest:
        record = RecordedRequest(
            received=time.monotonic(),
            received_at=time.time(),
            method=request.method,
            path=request.path,
            headers=dict(request.headers),
            request_id=self._new_request_id(),
            client_request_id=request.headers.get("X-Client-Request-Id"),
        )
        if self.max_records is not None and len(self.requests) >= 2 * self.max_records:
            del self.requests[: len(self.requests) - self.max_records]
        self.requests.append(record)
        return record

    def _succeeded(self, record: RecordedRequest) -> None:
        record.outcome, record.status = OK, 200
        self.generations += 1

    async def _generations(self, request: web.Request) -> web.StreamResponse:
        record = self._record(request)
        try:
            return await self._generate(request, record)
        except Reject as exc:
            record.outcome, record.status = f"error:{exc.code}", exc.status
            return self._error_response(record, exc)
        except (asyncio.CancelledError, ConnectionResetError):
            if record.outcome == PENDING:
                record.outcome = CANCELLED if self._closing else CLIENT_DISCONNECTED
            raise asyncio.CancelledError from None
        finally:
            record.ended = time.monotonic()

    async def _plan(self, prompt: str) -> PlanT:
        """The plan of a valid request; a planned error is raised after its latency."""
        plan = self._parse_triggers(prompt)
        if self._script:
            self._apply(plan, self._script.popleft())
        if plan.error is not None:
            plan.error.retry_after = plan.retry_after
            if plan.latency:
                await asyncio.sleep(plan.latency)
            raise plan.error
        return plan

    def _parse_triggers(self, prompt: str) -> PlanT:
        plan = self._new_plan()
        if "[" not in prompt:
            return plan
        for match in self.triggers.finditer(prompt):
            word, arg = match[1], match[2] or ""
            try:
                if word == "error":
                    plan.error = self._rejection(self.error_type(arg))
                elif word == "retry-after":
                    number(arg)
                    plan.retry_after = arg
                elif word == "latency":
                    plan.latency = number(arg)
                else:
                    self._trigger(plan, word, arg)
            except ValueError:
                message = f"{self.name}: bad trigger {match[0]}"
                raise self.error_type.reject(self.bad_trigger_code, message, "prompt") from None
        return plan

    def _apply(self, plan: PlanT, outcome: Outcome) -> None:
        """Let a scripted outcome override the trigger words."""
        if outcome.latency is not None:
            plan.latency = outcome.latency
        if isinstance(outcome, FakeError):
            plan.error = self._rejection(outcome)
            retry = outcome.retry_after
            if retry is not None:
                plan.retry_after = str(int(retry)) if float(retry).is_integer() else str(retry)
        else:
            plan.error = None
            self._apply_ok(plan, outcome)

    def _rejection(self, error: FakeError) -> Reject:
        return error.reject(error.code, error.message, error.param, status=error.status)
