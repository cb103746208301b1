"""How both clients open their channel: options, the retry policy, TLS and the key.

Retries: gRPC itself retries UNAVAILABLE, with backoff, on the calls that read or
that are safe to repeat (IDEMPOTENT_METHODS). Generations and streams are never
retried: a failed call may already have reached the provider, and is billed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

SERVICE = "image.v1.ImageService"

#: Calls gRPC retries on UNAVAILABLE: reads, and a cancel (cancelling twice is harmless).
IDEMPOTENT_METHODS = (
    "GetImageTask",
    "ListImageTasks",
    "GetUsage",
    "HealthCheck",
    "CancelImageTask",
)

#: Default deadlines in seconds: generations and group streams, and every other call
#: but watches, which have none unless given one (a queued task may wait for long; the
#: server ends the watch at the final state, and keepalive notices a dead server).
#: 600 s is above the server's IMAGE_TIMEOUT (300 s by default), so its limit decides
#: and reports it, rather than cutting off a group that is being made (and billed).
GENERATION_TIMEOUT = 600.0
TIMEOUT = 10.0

MAX_RECEIVE_BYTES = 64 * 1024 * 1024  # a b64_json group of 4K images is tens of MB
KEEPALIVE_MS = 30_000  # the server accepts pings every 10 s, even without calls


def service_config() -> str:
    """The channel's service config (JSON): the retry policy for IDEMPOTENT_METHODS."""
    config = {
        "methodConfig": [
            {
                "name": [{"service": SERVICE, "method": method} for method in IDEMPOTENT_METHODS],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
    return json.dumps(config)


def channel_options(extra: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """Channel arguments: message size, keepalive, retries; `extra` is added last."""
    return [
        ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", service_config()),
        *extra,
    ]


def _read(path: str | os.PathLike[str] | None) -> bytes | None:
    return Path(path).read_bytes() if path is not None else None


@dataclass(frozen=True)
class ChannelSettings:
    """What a client was built with; the key never shows in repr."""

    target: str
    api_key: str | None = field(repr=False)
    tls: bool
    ca: str | os.PathLike[str] | None
    cert: str | os.PathLike[str] | None
    key: str | os.PathLike[str] | None = field(repr=False)
    timeout: float
    generation_timeout: float
    options: tuple[tuple[str, Any], ...]

    @classmethod
    def build(
        cls,
        target: str,
        *,
        api_key: str | None,
        tls: bool,
        ca: str | os.PathLike[str] | None,
        cert: str | os.PathLike[str] | None,
        key: str | os.PathLike[str] | None,
        timeout: float,
        generation_timeout: float,
        options: Sequence[tuple[str, Any]],
        environ: Mapping[str, str] | None,
    ) -> ChannelSettings:
        if api_key is None:
            api_key = (os.environ if environ is None else environ).get("SIA_API_KEY") or None
        if (cert is None) != (key is None):
            raise ValueError("a client certificate needs both cert and key")
        return cls(
            target=target,
            api_key=api_key or None,
            tls=tls or ca is not None or cert is not None,
            ca=ca,
            cert=cert,
            key=key,
            timeout=timeout,
            generation_timeout=generation_timeout,
            options=tuple(options),
        )

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata: the key as a bearer token, when there is one."""
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials (the system's roots unless `ca`), or None for plaintext."""
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca),
            private_key=_read(self.key),
            certificate_chain=_read(self.cert),
        )

    def describe(self, kind: str) -> str:
        key = ", api_key=<set>" if self.api_key else ""
        return f"{kind}(target={self.target!r}, tls={self.tls}{key})"
