"""Which webhook URLs SIA may POST to: the syntax checked at submit, the addresses at delivery.

A webhook URL is chosen by the caller, so without care it is a way to make
the server reach what only the server can reach (SSRF): its own loopback,
the private network, a cloud's metadata service at 169.254.169.254. Two
checks keep it out:

- at submit, `check_webhook_url` parses the URL and refuses anything but
  http(s) with a host and no user info, and refuses a host that is itself a
  non-public address (every spelling: IPv4, IPv6, IPv4-mapped IPv6, legacy
  numeric forms such as `2130706433`) or `localhost`;
- at delivery, the name is resolved and refused if ANY of its addresses is
  non-public (`resolve_public`). `VettedResolver` is the aiohttp resolver that
  does this, so the connection goes to exactly the addresses checked: a name
  that resolves to a public address for the check and to 127.0.0.1 a moment
  later (DNS rebinding) cannot slip through between the two.

`WEBHOOK_ALLOW_PRIVATE` lifts the address rules (a receiver on the same
network, the tests' loopback receiver); the syntax rules always hold.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from typing import NamedTuple

from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from sia.errors import InvalidArgument
from sia.validation import MAX_WEBHOOK_URL_CHARS

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_SCHEMES = ("http", "https")
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
# Characters no URL SIA sends may hold: whitespace, controls, backslash (parsers disagree on it).
_FORBIDDEN = re.compile(r"[\x00-\x20\x7f\\]")
# IPv6 ranges that carry an IPv4 address inside: judged by that address.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class RefusedAddress(Exception):
    """The target host is, or resolves to, an address webhooks may not reach.

    Raised inside the aiohttp resolver, so it is no OSError: aiohttp would
    wrap that as a DNS failure and the delivery would be retried.
    """


class Target(NamedTuple):
    """A parsed webhook URL: what the dispatcher connects to and what a log line may show."""

    url: URL
    host: str  # IDNA-encoded, without a trailing dot
    port: int
    address: IPAddress | None  # when the host is an IP literal

    @property
    def origin(self) -> str:
        """scheme://host[:port]: the URL without path, query or fragment, for logs."""
        return str(self.url.origin())


def check_webhook_url(value: str, field: str, *, allow_private: bool) -> str:
    """`value` if it is a URL webhooks may be sent to; InvalidArgument naming `field` if not.

    Only the URL itself is checked here (no DNS): a name is resolved and its
    addresses checked at each delivery.
    """
    target = parse_target(value, field, allow_private=allow_private)
    if not allow_private and target.address is None and _is_local_name(target.host):
        raise InvalidArgument.field(
            field, f"{target.host!r} is this server itself; webhooks may not reach it"
        )
    return value


def parse_target(value: str, field: str, *, allow_private: bool) -> Target:
    """The URL parsed, with its syntax checked and an IP-literal host vetted."""
    if not value:
        raise InvalidArgument.field(field, "must not be empty")
    if len(value) > MAX_WEBHOOK_URL_CHARS:
        raise InvalidArgument.field(field, f"must be at most {MAX_WEBHOOK_URL_CHARS} characters")
    if _FORBIDDEN.search(value):
        raise InvalidArgument.field(field, "must not hold spaces, control characters or '\\'")
    try:
        url = URL(value)
        raw_host = url.raw_host
        port = url.port
    except (ValueError, UnicodeError) as exc:
        raise InvalidArgument.field(field, f"is not a valid URL: {exc}") from exc
    if url.scheme not in _SCHEMES:
        raise InvalidArgument.field(field, "must be an http:// or https:// URL")
    if not raw_host:
        raise InvalidArgument.field(field, "must name a host")
    if url.raw_user is not None or url.raw_password is not None:
        raise InvalidArgument.field(field, "must not hold a user name or password")
    if port is None or not 1 <= port <= 65535:
        raise InvalidArgument.field(field, "port must be between 1 and 65535")
    host = raw_host.lower().removesuffix(".")
    address = _literal_address(host, field)
    if address is not None and not allow_private and not is_public(address):
        raise InvalidArgument.field(
            field, f"{address} is not a public address; webhooks may not reach it"
        )
    return Target(url=url, host=host, port=port, address=address)


def is_public(address: IPAddress) -> bool:
    """True for a globally routable unicast address: not private, loopback, link-local,
    multicast, unspecified or reserved, whichever way it is written."""
    if isinstance(address, ipaddress.IPv6Address):
        # Mapped and NAT64 addresses reach the IPv4 address inside: that one decides.
        if address.ipv4_mapped is not None:
            return is_public(address.ipv4_mapped)
        if address in _NAT64:
            return is_public(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if address.sixtofour is not None and not is_public(address.sixtofour):
            return False
    return address.is_global and not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_unspecified
        or address.is_reserved
    )


async def resolve_public(
    host: str, port: int, *, allow_private: bool, family: int = socket.AF_UNSPEC
) -> list[ResolveResult]:
    """The addresses of `host`, every one checked; RefusedAddress if any is not public.

    One bad address refuses the name: a resolver that answers with a mix
    would otherwise let a later connection attempt reach the bad one.
    OSError (socket.gaierror) when the name does not resolve.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
    results: list[ResolveResult] = []
    for info_family, _, proto, _, sockaddr in infos:
        text = str(sockaddr[0])
        try:
            address = ipaddress.ip_address(text.partition("%")[0])
        except ValueError:
            continue  # not an internet address (cannot happen for AF_INET/AF_INET6)
        if not allow_private and not is_public(address):
            raise RefusedAddress(f"{host} resolves to {address}, which is not a public address")
        results.append(
            ResolveResult(
                hostname=host,
                host=text,
                port=int(sockaddr[1]),
                family=info_family,
                proto=proto,
                flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            )
        )
    if not results:
        raise OSError(f"{host} has no internet address")
    return results


class VettedResolver(AbstractResolver):
    """An aiohttp resolver that only ever hands out addresses `resolve_public` let through."""

    def __init__(self, *, allow_private: bool) -> None:
        self.allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """The vetted addresses of `host`; RefusedAddress if one is not public."""
        return await resolve_public(host, port, allow_private=self.allow_private, family=family)

    async def close(self) -> None:
        """Nothing to release."""


def _literal_address(host: str, field: str) -> IPAddress | None:
    """The address when `host` is an IP literal; None for a name; InvalidArgument when it is
    neither (a bad label, or a legacy numeric IPv4 form such as 127.1 or 0x7f.0.0.1)."""
    if ":" in host:
        if "%" in host:
            raise InvalidArgument.field(field, f"{host!r}: IPv6 zone ids are not allowed")
        try:
            return ipaddress.IPv6Address(host)
        except ValueError as exc:  # zone ids (fe80::1%eth0) end up here too
            raise InvalidArgument.field(field, f"{host!r} is not a valid IPv6 address") from exc
    try:
        return ipaddress.IPv4Address(host)
    except ValueError:
        pass
    if _legacy_ipv4(host):
        raise InvalidArgument.field(
            field, f"{host!r} is not a dotted-quad IPv4 address (write a.b.c.d)"
        )
    if len(host) > 253 or not all(_LABEL.match(label) for label in host.split(".")):
        raise InvalidArgument.field(field, f"{host!r} is not a valid host name")
    return None


def _legacy_ipv4(host: str) -> bool:
    """True when the C library would read `host` as an IPv4 address (2130706433, 0x7f.1)."""
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


def _is_local_name(host: str) -> bool:
    return host == "localhost" or host.endswith(".localhost")


def origin(url: str) -> str:
    """scheme://host[:port] of `url`, for logs: its path and query may hold secrets."""
    try:
        return str(URL(url).origin())
    except ValueError:
        return "<invalid url>"
