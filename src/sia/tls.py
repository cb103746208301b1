"""TLS for both ports: certificates read from PEM files and re-read once renewed.

`grpc_server_credentials(settings)` gives the gRPC port's credentials
(GRPC_TLS_*; with GRPC_TLS_CLIENT_CA_FILE clients must present a certificate
that CA signed); `HttpTls` holds the HTTP port's `ssl.SSLContext`
(HTTP_TLS_*). Either is None/absent when its variables are unset: plaintext is
the default.

Renewal without restart: cert-manager rewrites the files in place, and a
Kubernetes Secret volume swaps a symlink to a new directory. Both change what
`os.stat` reports for the path (size, mtime, inode), so a check is a few stat
calls, and the files are read only when those changed. A check runs at most
every TLS_RELOAD_INTERVAL seconds: on the gRPC port grpc asks before every
new handshake (a connection storm costs one check per interval, not one per
connection), on the HTTP port a task of the server checks on that period.
New connections get the new certificate; open ones keep theirs.

A renewal is loaded only whole and checked: the certificate must parse, the
key must be its key, and the files must read the same before and after the
check (a writer still at work is caught and tried again at the next check).
A bad certificate at start-up is a `ConfigError` naming the variable; a bad
renewal is logged at error and the certificate in use stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import grpc

from sia.errors import ConfigError
from sia.logs import get_logger

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from sia.config import Settings

log = get_logger("sia.tls")

_FIRST_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)

#: What `os.stat` says about each file; any change means "read them again".
Stamp = tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Certificate:
    """One loaded certificate: PEM chain, key and, for mutual TLS, the client CA."""

    chain: bytes = field(repr=False)
    key: bytes = field(repr=False)
    client_ca: bytes | None = field(default=None, repr=False)
    #: SHA-256 of the leaf certificate (DER) in hex: `openssl x509 -fingerprint -sha256`'s digits.
    sha256: str = ""


class FilesChanging(ConfigError):
    """The files changed while they were read: a renewal is being written."""


def _no_password() -> bytes:
    """An encrypted key fails instead of prompting on the terminal."""
    return b""


class CertificateFiles:
    """The PEM files of one port; `prefix` names its variables in errors (`GRPC_TLS`)."""

    def __init__(
        self, port: str, prefix: str, cert: Path, key: Path, client_ca: Path | None = None
    ) -> None:
        self.port = port
        self.prefix = prefix
        self.cert = cert
        self.key = key
        self.client_ca = client_ca

    @property
    def mode(self) -> str:
        """`tls`, or `mtls` when clients must present a certificate."""
        return "tls" if self.client_ca is None else "mtls"

    def _paths(self) -> list[Path]:
        return [self.cert, self.key, *([] if self.client_ca is None else [self.client_ca])]

    def stamp(self) -> Stamp:
        """Identity, size and times of each file (following symlinks); cheap to compare."""
        stamps: list[tuple[int, ...]] = []
        for path in self._paths():
            try:
                st = os.stat(path)
            except OSError as exc:
                stamps.append((-1, exc.errno or 0))
            else:
                stamps.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(stamps)

    def load(self) -> Certificate:
        """Read and check the files; ConfigError naming the variable of the bad one."""
        chain = self._read(self.cert, "CERT_FILE")
        key = self._read(self.key, "KEY_FILE")
        client_ca = None if self.client_ca is None else self._read(self.client_ca, "CLIENT_CA_FILE")
        self._check_certificates(chain, "CERT_FILE", self.cert)
        if self.client_ca is not None and client_ca is not None:
            self._check_certificates(client_ca, "CLIENT_CA_FILE", self.client_ca)
        scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            scratch.load_cert_chain(self.cert, self.key, password=_no_password)
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                problem = f"not the key of the certificate in {self.prefix}_CERT_FILE"
            else:
                problem = "no unencrypted PEM private key"
            raise self._error("KEY_FILE", self.key, problem) from None
        except OSError as exc:
            raise self._error("KEY_FILE", self.key, _reason(exc)) from None
        if (self._read(self.cert, "CERT_FILE"), self._read(self.key, "KEY_FILE")) != (chain, key):
            raise FilesChanging(f"{self.prefix}_CERT_FILE: {self.cert}: changed while being read")
        return Certificate(chain, key, client_ca, _fingerprint(chain))

    def _read(self, path: Path, variable: str) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise self._error(variable, path, _reason(exc)) from None

    def _check_certificates(self, pem: bytes, variable: str, path: Path) -> None:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(
                cadata=pem.decode("ascii")
            )
        except (ssl.SSLError, UnicodeDecodeError, ValueError):
            raise self._error(variable, path, "no PEM certificate") from None

    def _error(self, variable: str, path: Path, problem: str) -> ConfigError:
        return ConfigError(f"{self.prefix}_{variable}: {path}: {problem}")


def _fingerprint(chain: bytes) -> str:
    """SHA-256 of the chain's first certificate; empty for an unusual PEM (it is only logged)."""
    if (match := _FIRST_CERTIFICATE.search(chain)) is None:
        return ""
    try:
        der = ssl.PEM_cert_to_DER_cert(match.group().decode("ascii"))
    except ValueError:
        return ""
    return hashlib.sha256(der).hexdigest()


def _reason(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else type(exc).__name__


class Reloader:
    """The certificate in use and the check for a renewed one.

    `poll()` checks at most every `interval` seconds and may be called from
    any thread (grpc calls it from its own); `check()` checks now.
    """

    def __init__(
        self,
        files: CertificateFiles,
        *,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.files = files
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp: Stamp | None = files.stamp()
        self.current = files.load()  # ConfigError at start-up
        self._next = clock() + interval
        log.info("tls_certificate_loaded", port=files.port, sha256=self.current.sha256)

    def poll(self) -> Certificate | None:
        """A renewed certificate, when the interval has passed and the files changed."""
        if self._clock() < self._next or not self._lock.acquire(blocking=False):
            return None  # not yet, or another handshake is checking right now
        try:
            self._next = self._clock() + self.interval
            return self.check()
        finally:
            self._lock.release()

    def check(self) -> Certificate | None:
        """A renewed certificate when the files changed and hold a good one, else None."""
        stamp = self.files.stamp()
        if stamp == self._stamp:
            return None
        try:
            loaded = self.files.load()
        except FilesChanging:
            return None  # a writer is at work: the next check reads its result
        except ConfigError as exc:
            log.error("tls_reload_failed", port=self.files.port, error=exc.message)
            self._stamp = stamp  # one line per bad renewal, not one per check
            return None
        self._stamp = stamp
        if loaded == self.current:
            return None  # touched, not changed
        self.current = loaded
        log.info("tls_certificate_loaded", port=self.files.port, sha256=loaded.sha256)
        return loaded

    def forget(self) -> None:
        """Check the files again next time, changed or not (the last load did not take)."""
        self._stamp = None


def _grpc_configuration(cert: Certificate) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(cert.key, cert.chain)], root_certificates=cert.client_ca
    )


def grpc_files(settings: Settings) -> CertificateFiles | None:
    """The gRPC port's files: GRPC_TLS_CERT_FILE, _KEY_FILE, _CLIENT_CA_FILE; None if unset."""
    if settings.grpc_tls_cert_file is None or settings.grpc_tls_key_file is None:
        return None
    return CertificateFiles(
        "grpc",
        "GRPC_TLS",
        settings.grpc_tls_cert_file,
        settings.grpc_tls_key_file,
        settings.grpc_tls_client_ca_file,
    )


def grpc_server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """Credentials for the gRPC port, which re-read renewed files; None for plaintext.

    Raises ConfigError when a file is missing or bad.
    """
    files = grpc_files(settings)
    if files is None:
        return None
    reloader = Reloader(files, interval=settings.tls_reload_interval)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        """Called by grpc before each handshake: a new configuration, or None to keep it."""
        try:
            renewed = reloader.poll()
        except Exception:  # grpc only logs what escapes; the reason is better said here
            log.exception("tls_reload_failed", port="grpc")
            return None
        return None if renewed is None else _grpc_configuration(renewed)

    return grpc.dynamic_ssl_server_credentials(
        _grpc_configuration(reloader.current),
        # grpc takes None for "unchanged", as documented; the stubs leave it out.
        cast("Callable[[], grpc.ServerCertificateConfiguration]", fetch),
        require_client_authentication=files.client_ca is not None,
    )


class HttpTls:
    """The HTTP port's `ssl.SSLContext`, renewed in place by `watch()`.

    The context's `load_cert_chain` runs again on the same object (the
    listening socket keeps it), only after the new files passed the checks
    on a scratch context: a failed load can leave a context without its key.
    """

    def __init__(self, files: CertificateFiles, *, interval: float) -> None:
        self.reloader = Reloader(files, interval=interval)  # ConfigError when bad
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            self.context.load_cert_chain(files.cert, files.key, password=_no_password)
        except (OSError, ssl.SSLError) as exc:  # replaced since the check a moment ago
            raise ConfigError(f"HTTP_TLS_CERT_FILE: {files.cert}: {exc}") from None

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpTls | None:
        """HTTP_TLS_CERT_FILE and HTTP_TLS_KEY_FILE's context; None when unset."""
        if settings.http_tls_cert_file is None or settings.http_tls_key_file is None:
            return None
        files = CertificateFiles(
            "http", "HTTP_TLS", settings.http_tls_cert_file, settings.http_tls_key_file
        )
        return cls(files, interval=settings.tls_reload_interval)

    async def watch(self) -> None:
        """Check for renewed files every TLS_RELOAD_INTERVAL seconds, until cancelled."""
        while True:
            await asyncio.sleep(self.reloader.interval)
            try:
                await self.reload()
            except Exception:  # the watch must outlive one bad surprise
                log.exception("tls_reload_failed", port="http")

    async def reload(self) -> bool:
        """Load renewed files into the context now; whether it changed."""
        renewed = await asyncio.to_thread(self.reloader.check)  # stat and read off the loop
        if renewed is None:
            return False
        files = self.reloader.files
        # On the loop: handshakes use the context here, so it changes between them.
        try:
            self.context.load_cert_chain(files.cert, files.key, password=_no_password)
        except (OSError, ssl.SSLError) as exc:
            log.error("tls_reload_failed", port=files.port, error=str(exc))
            self.reloader.forget()
            return False
        with contextlib.suppress(OSError):
            if (files.cert.read_bytes(), files.key.read_bytes()) == (renewed.chain, renewed.key):
                return True
        self.reloader.forget()  # rewritten again meanwhile: load what is there next time
        return True
