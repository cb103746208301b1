"""What the Ark and OpenAI providers share: the `HttpProvider` base and its helpers.

`HttpProvider` sends each generation over an `HttpClient` (the pooled
`Upstream` unless the caller hands it another, as tests do) as attempts under
`call_with_retries`, and reports a misconfigured provider (refused key or
account) to readiness until a later call succeeds. A subclass says how
to build its request body and how to read one attempt's answer, handing each
image to the caller's `on_image` as it has it. Once an attempt has handed one
over, that attempt is final: a retry would hand the caller its images twice.

The helpers read what both APIs answer alike: a JSON object body, an error
object, Retry-After, and `b64_json` images.
"""

from __future__ import annotations

import abc
import binascii
import time
from typing import TYPE_CHECKING, Any, ClassVar

import orjson
import pybase64
import structlog

from sia.domain import new_request_id
from sia.errors import (
    ProviderMisconfigured,
    Retryable,
    SiaError,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from sia.logs import REQUEST_ID, get_logger
from sia.providers.client import Upstream
from sia.providers.retry import RetryPolicy, call_with_retries, parse_retry_after

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from sia.domain import GeneratedImage, GenerationRequest, GenerationResult, OnImage
    from sia.providers.client import HttpClient

log = get_logger("sia.providers")


class HttpProvider(abc.ABC):
    """An ImageProvider over HTTP with a bearer key (see the module docstring).

    `client` is the HTTP client to send through; without one the provider
    opens an `Upstream` to `base_url` with `max_connections`. Either way the
    provider owns it: `aclose` closes it.
    """

    #: Short name shown in health answers, metrics and errors.
    provider: ClassVar[str]

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        max_retries: int = 3,
        max_connections: int = 4096,
        on_health: Callable[[str | None], None] | None = None,
        client: HttpClient | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        if client is None:
            client = Upstream(base_url, max_connections=max_connections, provider=self.provider)
        self._client = client
        self._authorization = f"Bearer {api_key}"
        self._secret = api_key
        self._policy = RetryPolicy(max_retries=max_retries)
        self._on_health = on_health or (lambda _: None)

    @property
    def name(self) -> str:
        """Short name shown in health answers and metrics."""
        return self.provider

    @abc.abstractmethod
    def encode_request(self, request: GenerationRequest) -> bytes:
        """The JSON body of `request`, as the provider's API expects it."""

    @abc.abstractmethod
    async def _attempt(
        self,
        request: GenerationRequest,
        body: bytes,
        headers: Mapping[str, str],
        on_image: OnImage,
    ) -> GenerationResult:
        """One call of the API; errors are the error tree's.

        Awaits `on_image` with each image of the answer, in the order the
        answer gives them, before returning them all.
        """

    async def generate(
        self, request: GenerationRequest, *, timeout: float, on_image: OnImage | None = None
    ) -> GenerationResult:
        """Generate `request`, retrying transient failures while `timeout` leaves time.

        `timeout` bounds the retries only; the caller enforces it on the call.
        `on_image` is awaited with each image as it arrives, never for an
        attempt that is then retried; what it raises ends the generation as is.
        """
        body = self.encode_request(request)
        headers = {
            "Authorization": self._authorization,
            "X-Client-Request-Id": client_request_id(),
        }
        deliver = _Delivery(on_image)

        async def attempt() -> GenerationResult:
            try:
                return await self._attempt(request, body, headers, deliver)
            except SiaError as exc:
                if deliver.count and isinstance(exc, Retryable):
                    exc.final = True  # a retry would hand the caller these images again
                raise

        try:
            result = await call_with_retries(
                attempt, policy=self._policy, deadline=time.monotonic() + timeout
            )
        except ProviderMisconfigured as exc:
            log.error(
                "provider_misconfigured",
                provider=self.provider,
                upstream_code=exc.metadata.get("upstream_code", ""),
                upstream_request_id=exc.metadata.get("upstream_request_id", ""),
            )
            self._on_health(exc.message)
            raise
        except _CallbackFailed as failed:
            error = failed.error
        else:
            self._on_health(None)
            return result
        self._on_health(None)  # the upstream answered: the key and account are fine
        # Raised outside the handler so that the caller's error is not chained to its carrier.
        raise error

    async def aclose(self) -> None:
        """Close the HTTP client; idempotent."""
        await self._client.aclose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"


class _CallbackFailed(Exception):
    """Carries what the caller's `on_image` raised past the parsing and retry code.

    Neither may mistake it for an upstream failure (a broken stream keeps its
    images, an error of the error tree may be retried): `HttpProvider.generate`
    raises `error` itself.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(repr(error))
        self.error = error


class _Delivery:
    """The caller's `on_image` (None: nobody listens), counting the images handed over."""

    __slots__ = ("_on_image", "count")

    def __init__(self, on_image: OnImage | None) -> None:
        self._on_image = on_image
        self.count = 0

    async def __call__(self, image: GeneratedImage) -> None:
        self.count += 1  # counted first: an image the callback saw, even in part, is delivered
        if self._on_image is None:
            return
        try:
            await self._on_image(image)
        except Exception as exc:
            raise _CallbackFailed(exc) from exc


async def deliver_all(result: GenerationResult, on_image: OnImage) -> GenerationResult:
    """Await `on_image` with each image of `result`, in index order; `result` back."""
    for image in sorted(result.images, key=lambda image: image.index):
        await on_image(image)
    return result


def client_request_id() -> str:
    """Our request or task id for X-Client-Request-Id, so a call can be traced upstream.

    Printable ASCII of at most 512 characters (OpenAI's limit); anything else,
    or no id bound, gets a fresh one.
    """
    value = REQUEST_ID.get() or str(structlog.contextvars.get_contextvars().get("task_id") or "")
    if value and len(value) <= 512 and value.isascii() and value.isprintable():
        return value
    return new_request_id()


def decode_b64_image(value: str) -> bytes:
    """The bytes of a `b64_json` image; binascii.Error (a ValueError) when it is not base64.

    Canonical base64 takes pybase64's SIMD decoder, as images are megabytes
    each; anything else, such as base64 broken into lines, takes the standard
    library's lenient decoder, which skips characters outside the alphabet.
    """
    try:
        return pybase64.b64decode(value, validate=True)
    except binascii.Error:
        return binascii.a2b_base64(value)


def json_object(raw: bytes, status: int, provider: str, *, final: bool) -> Mapping[str, Any]:
    """The answer body as a JSON object, or the `bad_answer` error when it is not one."""
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        payload = None
    if not isinstance(payload, dict):
        raise bad_answer(
            provider, f"HTTP {status} with a body that is not a JSON object", final=final
        )
    return payload


def bad_answer(provider: str, what: str, *, final: bool) -> UpstreamUnavailable:
    """The error for an answer that cannot be read; `final` when retrying could bill twice."""
    exc = UpstreamUnavailable(
        f"the {provider} provider's answer was unusable: {what}",
        metadata={"provider": provider, "upstream_code": "BadResponse", "upstream_request_id": ""},
    )
    exc.final = final
    return exc


def error_object(raw: bytes, **fallback: str) -> Mapping[str, Any]:
    """The `error` object of an error answer's JSON body.

    A body without one (a proxy's HTML page, say) gives `fallback` with the
    start of the body as its message.
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return error
    return {**fallback, "message": raw[:200].decode("utf-8", "replace")}


def with_retry_after(exc: SiaError, headers: Mapping[str, str]) -> SiaError:
    """`exc` with the answer's Retry-After, for the errors that are retried.

    The retry loop waits `upstream_retry_after`, and the caller gets it, exactly,
    as `retry_after` (gRPC RetryInfo) once retries give up.
    """
    if not isinstance(exc, UpstreamRateLimited | UpstreamUnavailable):
        return exc
    retry_after = parse_retry_after(headers.get("Retry-After"))
    if retry_after is not None:
        exc.upstream_retry_after = retry_after
        exc.retry_after = max(retry_after, 0.001)
    return exc
