"""Which webhook URLs are accepted at submit, and which addresses at delivery."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any

import pytest

from sia.errors import InvalidArgument
from sia.webhooks.urls import (
    RefusedAddress,
    check_webhook_url,
    is_public,
    origin,
    resolve_public,
)

PRIVATE = [
    "http://127.0.0.1/hook",
    "http://127.8.9.10:8080/hook",
    "http://10.1.2.3/hook",
    "http://172.16.0.1/hook",
    "http://192.168.1.1/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://100.64.0.1/hook",
    "http://0.0.0.0/hook",
    "http://224.0.0.1/hook",
    "http://255.255.255.255/hook",
    "http://240.0.0.1/hook",
    "http://[::1]/hook",
    "http://[::]/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://[::ffff:169.254.169.254]/hook",
    "http://[fc00::1]/hook",
    "http://[fd12:3456::1]/hook",
    "http://[fe80::1]/hook",
    "http://[ff02::1]/hook",
    "http://[64:ff9b::7f00:1]/hook",
    "http://[2002:7f00:1::]/hook",
    "http://localhost/hook",
    "http://LOCALHOST./hook",
    "http://api.localhost:9000/hook",
]
#: Spellings of an IPv4 address the C library accepts but only dotted quads may be used.
LEGACY_IPV4 = ["http://2130706433/", "http://0x7f.0.0.1/", "http://127.1/", "http://0177.0.0.1/"]
MALFORMED = [
    ("", "must not be empty"),
    ("ftp://hooks.example/in", "http:// or https://"),
    ("file:///etc/passwd", "http:// or https://"),
    ("hooks.example/in", "http:// or https://"),
    ("http:///in", "must name a host"),
    ("http://user:pw@hooks.example/in", "user name or password"),
    ("http://user@hooks.example/in", "user name or password"),
    ("http://hooks.example:0/in", "port"),
    ("http://hooks.example:65536/in", "valid URL"),
    ("http://hooks example/in", "spaces"),
    ("http://hooks.example/in\n", "control"),
    ("http://a.example\\@127.0.0.1/", "'\\'"),
    ("http://-bad-.example/in", "valid host name"),
    ("http://[fe80::1%25eth0]/in", "zone"),
    ("https://hooks.example/" + "a" * 2048, "2048"),
]
PUBLIC = [
    "https://hooks.example.com/in?token=abc",
    "http://93.184.216.34:8080/in",
    "https://[2606:4700:4700::1111]/in",
    "https://例え.jp/in",
    "https://hooks.example.com./in",
]


@pytest.mark.parametrize("url", PRIVATE)
def test_non_public_addresses_are_refused_unless_allowed(url: str) -> None:
    """Loopback, private, link-local, metadata, multicast and reserved hosts are refused,
    in every spelling, unless private addresses are allowed."""
    with pytest.raises(InvalidArgument) as caught:
        check_webhook_url(url, "webhook_url", allow_private=False)
    assert caught.value.violations[0].field == "webhook_url"
    assert check_webhook_url(url, "webhook_url", allow_private=True) == url


@pytest.mark.parametrize("url", LEGACY_IPV4)
def test_legacy_ipv4_spellings_are_refused(url: str) -> None:
    """An integer, hex, octal or short IPv4 host is refused even where private ones are allowed."""
    for allow_private in (False, True):
        with pytest.raises(InvalidArgument, match="dotted-quad"):
            check_webhook_url(url, "webhook_url", allow_private=allow_private)


@pytest.mark.parametrize(("url", "message"), MALFORMED)
def test_malformed_urls_are_refused_naming_the_field(url: str, message: str) -> None:
    """Each syntax rule is reported against the field the caller named."""
    with pytest.raises(InvalidArgument) as caught:
        check_webhook_url(url, "webhook_url", allow_private=True)
    [violation] = caught.value.violations
    assert violation.field == "webhook_url"
    assert message in violation.description


@pytest.mark.parametrize("url", PUBLIC)
def test_public_urls_are_accepted(url: str) -> None:
    """Names (IDN too), public IPv4 and IPv6 literals pass; names are resolved only later."""
    assert check_webhook_url(url, "webhook_url", allow_private=False) == url


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("::ffff:8.8.8.8", True),
        ("::ffff:10.0.0.1", False),
        ("64:ff9b::808:808", True),
        ("64:ff9b::a00:1", False),
        ("2002:c0a8:101::", False),
        ("198.18.0.1", False),
        ("192.0.2.1", False),
    ],
)
def test_is_public(address: str, public: bool) -> None:
    """Embedded IPv4 addresses (mapped, NAT64, 6to4) are judged by the address inside."""
    assert is_public(ipaddress.ip_address(address)) is public


def test_origin_keeps_only_scheme_host_and_port() -> None:
    """What a log line may show of a webhook URL: never its path or query."""
    assert (
        origin("https://hooks.example:8443/in/abc?token=s3cret#x") == "https://hooks.example:8443"
    )
    assert origin("http://[::1") == "<invalid url>"


async def test_resolve_public_refuses_a_name_for_loopback() -> None:
    """localhost resolves to loopback: refused, unless private addresses are allowed."""
    with pytest.raises(RefusedAddress, match="localhost resolves to"):
        await resolve_public("localhost", 80, allow_private=False)
    allowed = await resolve_public("localhost", 80, allow_private=True)
    assert allowed
    assert all(not is_public(ipaddress.ip_address(result["host"])) for result in allowed)
    assert {result["port"] for result in allowed} == {80}


def fake_getaddrinfo(monkeypatch: pytest.MonkeyPatch, *addresses: str) -> None:
    """Make the running loop resolve every name to `addresses`."""
    loop = asyncio.get_running_loop()

    async def getaddrinfo(host: str, port: int, **_: Any) -> list[Any]:
        infos: list[Any] = []
        for text in addresses:
            if ":" in text:
                infos.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (text, port, 0, 0)))
            else:
                infos.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (text, port)))
        return infos

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)


async def test_resolve_public_refuses_any_bad_address_among_good(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One private address among public ones refuses the name (a rebinding resolver's mix)."""
    fake_getaddrinfo(monkeypatch, "93.184.216.34", "169.254.169.254")
    with pytest.raises(RefusedAddress, match=r"169\.254\.169\.254"):
        await resolve_public("hooks.example", 443, allow_private=False)


async def test_resolve_public_returns_the_vetted_addresses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every public address comes back, numeric, for the connection to use as it is."""
    fake_getaddrinfo(monkeypatch, "93.184.216.34", "2606:4700:4700::1111")
    results = await resolve_public("hooks.example", 443, allow_private=False)
    assert [(r["host"], r["port"], r["hostname"]) for r in results] == [
        ("93.184.216.34", 443, "hooks.example"),
        ("2606:4700:4700::1111", 443, "hooks.example"),
    ]
