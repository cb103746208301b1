"""Tests of TLS on both ports with real servers: TLS, mutual TLS, renewal without restart,
HTTPS, bad certificates at start-up and in renewals."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sia import cli
from sia.api.image.v1 import image_service_pb2 as pb
from sia.api.image.v1 import image_service_pb2_grpc as pb_grpc
from sia.app import App
from sia.config import Settings
from sia.errors import ConfigError
from sia.logs import OUTPUT
from sia.tls import CertificateFiles, HttpTls, Reloader, grpc_server_credentials
from tests.helpers import TEST_SIZE, LogConfig, MakeSettings
from tests.waiting import within

#: Reload checks in tests: often enough that a renewal shows within a fraction of a second.
RELOAD = 0.05


@dataclass
class Issued:
    """A certificate and its key as PEM, with its subject's common name."""

    cert: bytes
    key: bytes
    name: str


class TestCA:
    """A throwaway certificate authority that issues server and client certificates."""

    __test__ = False  # a helper, not a test class

    def __init__(self, name: str = "SIA test CA") -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self._cert = (
            self._builder(subject, self._key.public_key())
            .issuer_name(subject)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.pem = self._cert.public_bytes(serialization.Encoding.PEM)

    @staticmethod
    def _builder(
        subject: x509.Name, public_key: ec.EllipticCurvePublicKey
    ) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    def issue(self, name: str, *, server: bool = True) -> Issued:
        """A certificate for `name`; a server's is valid for localhost and 127.0.0.1."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = self._builder(subject, key.public_key()).issuer_name(self._cert.subject)
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem, name)


@dataclass
class Pki:
    """Files on disk: the CA, the server's certificate and key, a client's."""

    ca: TestCA
    ca_file: Path
    cert_file: Path
    key_file: Path
    client: Issued


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A test CA and a server certificate for localhost in tmp_path/tls."""
    ca = TestCA()
    server = ca.issue("server-one")
    directory = tmp_path / "tls"
    directory.mkdir()
    return Pki(
        ca=ca,
        ca_file=write(directory / "ca.crt", ca.pem),
        cert_file=write(directory / "tls.crt", server.cert),
        key_file=write(directory / "tls.key", server.key),
        client=ca.issue("client-one", server=False),
    )


def peer_name(der: bytes) -> str:
    """The common name in a DER certificate."""
    cert = x509.load_der_x509_certificate(der)
    [attribute] = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attribute.value)


async def served_name(port: int, ca: bytes) -> str:
    """The common name of the certificate a new TLS connection to `port` is shown."""
    context = ssl.create_default_context(cadata=ca.decode())
    context.set_alpn_protocols(["h2", "http/1.1"])  # grpc refuses a handshake without h2
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.transport.abort()  # no TLS shutdown: a gRPC server has already spoken
        await writer.wait_closed()
    return peer_name(der)


async def health_check(channel: grpc.aio.Channel) -> pb.HealthCheckResponse:
    """ImageService/HealthCheck on `channel`."""
    return await pb_grpc.ImageServiceStub(channel).HealthCheck(pb.HealthCheckRequest(), timeout=10)


def secure(port: int, credentials: grpc.ChannelCredentials) -> grpc.aio.Channel:
    """A TLS channel to `localhost:port` (the name the test certificates carry)."""
    return grpc.aio.secure_channel(f"localhost:{port}", credentials)


def tls_settings(make_settings: MakeSettings, pki: Pki, **overrides: object) -> Settings:
    return make_settings(
        grpc_tls_cert_file=pki.cert_file,
        grpc_tls_key_file=pki.key_file,
        tls_reload_interval=RELOAD,
        **overrides,
    )


async def test_grpc_tls_serves_tls_clients_only(make_settings: MakeSettings, pki: Pki) -> None:
    """A client trusting the CA calls HealthCheck over TLS; a plaintext client gets nowhere."""
    async with App(tls_settings(make_settings, pki)) as app:
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.pem)
        async with secure(app.grpc_port, credentials) as channel:
            response = await health_check(channel)
        assert response.service == app.settings.app_name
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pb_grpc.ImageServiceStub(plain).HealthCheck(
                    pb.HealthCheckRequest(), timeout=2
                )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        other = grpc.ssl_channel_credentials(root_certificates=TestCA("another CA").pem)
        async with secure(app.grpc_port, other) as untrusting:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pb_grpc.ImageServiceStub(untrusting).HealthCheck(
                    pb.HealthCheckRequest(), timeout=2
                )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_grpc_mutual_tls_wants_a_client_certificate_the_ca_signed(
    make_settings: MakeSettings, pki: Pki
) -> None:
    """With GRPC_TLS_CLIENT_CA_FILE: no client certificate, or one another CA signed, is
    refused; one the CA signed works."""
    settings = tls_settings(make_settings, pki, grpc_tls_client_ca_file=pki.ca_file)
    async with App(settings) as app:
        assert app.grpc.tls == "mtls"
        stranger = TestCA("stranger CA").issue("client-two", server=False)
        refused = [
            grpc.ssl_channel_credentials(root_certificates=pki.ca.pem),
            grpc.ssl_channel_credentials(pki.ca.pem, stranger.key, stranger.cert),
        ]
        for credentials in refused:
            async with secure(app.grpc_port, credentials) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await pb_grpc.ImageServiceStub(channel).HealthCheck(
                        pb.HealthCheckRequest(), timeout=2
                    )
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        signed = grpc.ssl_channel_credentials(pki.ca.pem, pki.client.key, pki.client.cert)
        async with secure(app.grpc_port, signed) as channel:
            assert (await health_check(channel)).service == app.settings.app_name


async def until_served(port: int, ca: bytes, name: str) -> None:
    """Wait until new connections to `port` are shown the certificate of `name`."""

    async def poll() -> None:
        while await served_name(port, ca) != name:
            await asyncio.sleep(RELOAD / 2)

    await within(poll(), f"the renewed certificate {name!r} was not served", timeout=10)


async def test_grpc_renewed_certificate_is_served_without_restart(
    make_settings: MakeSettings, pki: Pki, tmp_path: Path
) -> None:
    """A Kubernetes Secret volume's renewal (a `..data` symlink swapped to a new directory):
    new connections get the new certificate, and new channels still work."""
    volume = tmp_path / "secret-volume"
    volume.mkdir()

    def publish(version: str, issued: Issued) -> None:
        """What the kubelet does: a new directory, then one atomic symlink swap."""
        (volume / version).mkdir()
        write(volume / version / "tls.crt", issued.cert)
        write(volume / version / "tls.key", issued.key)
        (volume / "..data_tmp").symlink_to(version)
        os.replace(volume / "..data_tmp", volume / "..data")

    publish("..v1", pki.ca.issue("server-one"))
    for name in ("tls.crt", "tls.key"):
        (volume / name).symlink_to(f"..data/{name}")
    settings = make_settings(
        grpc_tls_cert_file=volume / "tls.crt",
        grpc_tls_key_file=volume / "tls.key",
        tls_reload_interval=RELOAD,
    )
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.pem)
    async with App(settings) as app:
        assert await served_name(app.grpc_port, pki.ca.pem) == "server-one"
        async with secure(app.grpc_port, credentials) as channel:
            await health_check(channel)
            publish("..v2", pki.ca.issue("server-renewed"))
            await until_served(app.grpc_port, pki.ca.pem, "server-renewed")
            await health_check(channel)  # the open connection goes on
        async with secure(app.grpc_port, credentials) as channel:
            await health_check(channel)


async def test_grpc_bad_renewal_keeps_the_old_certificate(
    make_settings: MakeSettings, pki: Pki, capsys: pytest.CaptureFixture[str], log_config: LogConfig
) -> None:
    """A renewal whose key does not match is logged at error; the certificate in use stays,
    and a good renewal afterwards is taken."""
    log_config("warning")
    async with App(tls_settings(make_settings, pki)) as app:
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.pem)
        write(pki.cert_file, pki.ca.issue("server-mismatched").cert)  # the key stays the old one
        for _ in range(5):  # several handshakes after the interval: each would see a bad file
            await asyncio.sleep(RELOAD * 2)
            assert await served_name(app.grpc_port, pki.ca.pem) == "server-one"
        async with secure(app.grpc_port, credentials) as channel:
            await health_check(channel)
        good = pki.ca.issue("server-fixed")
        write(pki.key_file, good.key)
        write(pki.cert_file, good.cert)
        await until_served(app.grpc_port, pki.ca.pem, "server-fixed")
    OUTPUT.flush()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    failures = [line for line in lines if line["event"] == "tls_reload_failed"]
    assert len(failures) == 1, failures  # once per bad renewal, not once per handshake
    assert failures[0]["level"] == "error" and failures[0]["port"] == "grpc"
    assert failures[0]["error"].startswith("GRPC_TLS_KEY_FILE: ")
    assert "PRIVATE KEY" not in json.dumps(lines)


async def test_https_serves_and_reloads(make_settings: MakeSettings, pki: Pki) -> None:
    """HTTP_TLS_*: /health over HTTPS, plain HTTP refused, and a certificate rewritten in
    place (cert-manager's way) is served to new connections without restart."""
    settings = make_settings(
        http_tls_cert_file=pki.cert_file,
        http_tls_key_file=pki.key_file,
        tls_reload_interval=RELOAD,
    )
    async with App(settings) as app:
        assert app.http.scheme == "https"
        context = ssl.create_default_context(cadata=pki.ca.pem.decode())
        async with aiohttp.ClientSession() as http:
            async with http.get(f"https://localhost:{app.http_port}/health", ssl=context) as resp:
                assert resp.status == 200
            with pytest.raises(aiohttp.ClientError):
                async with http.get(f"http://127.0.0.1:{app.http_port}/health") as resp:
                    await resp.read()
        assert await served_name(app.http_port, pki.ca.pem) == "server-one"
        renewed = pki.ca.issue("server-renewed")
        write(pki.key_file, renewed.key)
        write(pki.cert_file, renewed.cert)
        await until_served(app.http_port, pki.ca.pem, "server-renewed")
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"https://localhost:{app.http_port}/ready", ssl=context) as resp,
        ):
            assert resp.status == 200


async def test_sia_generate_over_tls_downloads_its_image_with_the_same_ca(
    make_settings: MakeSettings, pki: Pki, tmp_path: Path
) -> None:
    """`sia generate --ca` trusts that CA for the call and for the image link on the
    HTTPS port alike (not only the system's CAs)."""
    settings = tls_settings(
        make_settings, pki, http_tls_cert_file=pki.cert_file, http_tls_key_file=pki.key_file
    )
    out = tmp_path / "fox.jpg"
    async with App(settings) as app:
        argv = ["generate", "a fox", "--size", TEST_SIZE, "--server", f"localhost:{app.grpc_port}"]
        argv += ["--ca", str(pki.ca_file), "-o", str(out)]
        assert await asyncio.to_thread(cli.main, argv) == 0
    assert out.read_bytes().startswith(b"\xff\xd8")  # a JPEG, fetched from https://localhost


async def test_https_bad_renewal_keeps_the_old_certificate(pki: Pki, tmp_path: Path) -> None:
    """A renewal that is no certificate, or whose key is another's, leaves the context as it
    was; the fixed files load."""
    files = CertificateFiles("http", "HTTP_TLS", pki.cert_file, pki.key_file)
    tls = HttpTls(files, interval=RELOAD)
    assert tls.reloader.current.sha256
    first = tls.reloader.current
    write(pki.cert_file, b"-----BEGIN CERTIFICATE-----\nnot base64\n")
    assert not await tls.reload()
    write(pki.cert_file, pki.ca.issue("server-mismatched").cert)
    assert not await tls.reload()
    assert tls.reloader.current == first
    fixed = pki.ca.issue("server-fixed")
    write(pki.key_file, fixed.key)
    write(pki.cert_file, fixed.cert)
    assert await tls.reload()
    assert tls.reloader.current != first
    assert not await tls.reload()  # unchanged since


def test_a_check_reads_files_only_when_stat_changed(pki: Pki) -> None:
    """Between changes a check is stat calls only, and poll checks once per interval."""
    now = [0.0]
    files = CertificateFiles("grpc", "GRPC_TLS", pki.cert_file, pki.key_file)
    reloader = Reloader(files, interval=30, clock=lambda: now[0])
    loads = []
    real_load = files.load
    files.load = lambda: loads.append(1) or real_load()  # type: ignore[method-assign]
    renewed = pki.ca.issue("server-renewed")
    write(pki.key_file, renewed.key)
    write(pki.cert_file, renewed.cert)
    assert reloader.poll() is None and loads == []  # within the interval: not even a stat
    now[0] = 31
    assert reloader.poll() is not None and loads == [1]
    now[0] = 62
    assert reloader.poll() is None and loads == [1]  # unchanged: stat only
    os.utime(pki.cert_file)  # touched, same contents: read, but no new certificate
    now[0] = 93
    assert reloader.poll() is None and loads == [1, 1]


@pytest.mark.parametrize(
    ("broken", "variable"),
    [
        ("cert_missing", "GRPC_TLS_CERT_FILE"),
        ("cert_junk", "GRPC_TLS_CERT_FILE"),
        ("key_missing", "GRPC_TLS_KEY_FILE"),
        ("key_junk", "GRPC_TLS_KEY_FILE"),
        ("key_mismatched", "GRPC_TLS_KEY_FILE"),
        ("ca_junk", "GRPC_TLS_CLIENT_CA_FILE"),
    ],
)
def test_bad_grpc_files_are_config_errors(
    make_settings: MakeSettings, pki: Pki, broken: str, variable: str
) -> None:
    """A certificate, key or CA file missing or bad at start-up: ConfigError naming it."""
    match broken:
        case "cert_missing":
            pki.cert_file.unlink()
        case "cert_junk":
            write(pki.cert_file, b"junk")
        case "key_missing":
            pki.key_file.unlink()
        case "key_junk":
            write(pki.key_file, b"junk")
        case "key_mismatched":
            write(pki.key_file, pki.ca.issue("other").key)
        case "ca_junk":
            write(pki.ca_file, pki.client.key)
    settings = tls_settings(make_settings, pki, grpc_tls_client_ca_file=pki.ca_file)
    with pytest.raises(ConfigError) as caught:
        grpc_server_credentials(settings)
    assert caught.value.message.startswith(f"{variable}: ")
    assert "PRIVATE KEY" not in caught.value.message


async def test_bad_http_certificate_stops_start_up(make_settings: MakeSettings, pki: Pki) -> None:
    """An unreadable HTTP certificate stops the app at start-up with a ConfigError."""
    pki.cert_file.unlink()
    pki.cert_file.mkdir()  # unreadable as a file even for root, unlike a mode-0 file
    settings = make_settings(http_tls_cert_file=pki.cert_file, http_tls_key_file=pki.key_file)
    with pytest.raises(ConfigError) as caught:
        async with App(settings):
            pass
    assert caught.value.message.startswith("HTTP_TLS_CERT_FILE: ")
    assert caught.value.message.endswith(": Is a directory")


async def test_start_up_logs_which_ports_use_tls(
    make_settings: MakeSettings, pki: Pki, capsys: pytest.CaptureFixture[str], log_config: LogConfig
) -> None:
    """The start-up lines say which port is TLS, mutual TLS or plaintext, with no secrets."""
    log_config("info")
    settings = tls_settings(
        make_settings, pki, grpc_tls_client_ca_file=pki.ca_file, metrics_token="tok-3f9a"
    )
    async with App(settings):
        pass
    OUTPUT.flush()
    out = capsys.readouterr().out
    lines = {line["event"]: line for line in map(json.loads, out.splitlines())}
    assert lines["grpc_server_started"]["tls"] == "mtls"
    assert lines["http_server_started"]["tls"] == "plaintext"
    assert lines["http_server_started"]["metrics_auth"] is True
    assert lines["tls_certificate_loaded"]["port"] == "grpc"
    assert "PRIVATE KEY" not in out and "tok-3f9a" not in out


def test_certificates_and_settings_hide_secrets(make_settings: MakeSettings, pki: Pki) -> None:
    """Neither a loaded certificate's repr nor the settings' show a key, token or secret."""
    cert = CertificateFiles("grpc", "GRPC_TLS", pki.cert_file, pki.key_file).load()
    assert "PRIVATE" not in repr(cert) and cert.sha256 in repr(cert)
    settings = make_settings(metrics_token="tok-3f9a", image_url_secret="sec-77c1")
    for text in (repr(settings), str(settings), repr(settings.model_dump())):
        assert "tok-3f9a" not in text and "sec-77c1" not in text
