"""TLS and mutual TLS: gRPC servers and clients, the in-process clients of a server, /metrics, the
CLI's TLS options and the SDK's checks before it loads a composed model. Certificates are made here
(a CA, a server certificate for 127.0.0.1 and localhost, client certificates), real servers on
loopback ports."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from poe.cli.main import main
from poe.client.base import ClientTLS
from poe.client.composer import Composer
from poe.client.registry import RegistryClient
from poe.engine.config import Settings
from poe.engine.errors import DataLoss, FailedPrecondition, InvalidArgument, Unavailable
from poe.engine.pool import save as save_pool
from poe_services.host import create_server
from poe_services.metrics import serve_metrics

CLASSES = ["Sandal", "Sneaker", "Bag"]


# -- certificates ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PKI:
    ca: Path  # the CA that signed the server's and the client's certificates
    server_cert: Path  # for 127.0.0.1 and localhost; the certificate alone
    server_chain: Path  # the server's certificate followed by the CA's
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from another CA
    rogue_key: Path


def _write_key(path: Path, key) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _pem(*certs) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _certificate(key, name: str, issuer=None, issuer_key=None, *, ca: bool = False, sans=(), usage=None):
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer.subject if issuer is not None else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return builder.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    ca_key, other_ca_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate(ca_key, "poe test CA", ca=True)
    other_ca = _certificate(other_ca_key, "another CA", ca=True)
    server_key, client_key, rogue_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    server = _certificate(server_key, "poe server", ca, ca_key,
                          sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                          usage=[ExtendedKeyUsageOID.SERVER_AUTH])
    client = _certificate(client_key, "poe client", ca, ca_key, usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
    rogue = _certificate(rogue_key, "rogue client", other_ca, other_ca_key, usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
    (d / "ca.pem").write_bytes(_pem(ca))
    (d / "server.pem").write_bytes(_pem(server))
    (d / "server-chain.pem").write_bytes(_pem(server, ca))
    (d / "client.pem").write_bytes(_pem(client))
    (d / "rogue.pem").write_bytes(_pem(rogue))
    return PKI(d / "ca.pem", d / "server.pem", d / "server-chain.pem", _write_key(d / "server.key", server_key),
               d / "client.pem", _write_key(d / "client.key", client_key), d / "rogue.pem",
               _write_key(d / "rogue.key", rogue_key))


# -- servers ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def own_home(tmp_path_factory):
    """A POE_HOME of this module's own: clients send no token found in this machine's POE_HOME."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POE_HOME", str(tmp_path_factory.mktemp("client-home")))
        patch.delenv("POE_TOKEN", raising=False)
        yield


def tls_settings(home: Path, **fields) -> Settings:
    """SQLite and file blobs under `home`, the test pool as default, and `fields`."""
    return dataclasses.replace(Settings.from_env({"POE_HOME": str(home)}), default_pool="test-pool", **fields)


@pytest.fixture(scope="module")
def pool_dir(random_pool, tmp_path_factory) -> Path:
    return save_pool(random_pool, tmp_path_factory.mktemp("pool") / "test-pool")


@pytest.fixture(scope="module")
def tls_stack(pki, pool_dir, tmp_path_factory):
    """(host, target): registry + composer over TLS, holding the test pool. The certificate file is
    the server's chain up to the CA and no POE_TLS_CA is set: the composer reaches the registry
    on the same server by trusting that chain."""
    cfg = tls_settings(tmp_path_factory.mktemp("tls"), tls_server_cert=pki.server_chain,
                       tls_server_key=pki.server_key)
    host = create_server("127.0.0.1:0", cfg, ("registry", "composer"), migrate=True, warm=False)
    host.start()
    target = f"127.0.0.1:{host.port}"
    with RegistryClient(target, tls=ClientTLS(ca=pki.ca), token=host.issue_token("admin")) as reg:
        reg.import_pool(pool_dir, aliases=["stable"])
    yield host, target
    host.stop(None).wait(10)


def test_tls_client_composes_through_a_tls_server(tls_stack, pki):
    host, target = tls_stack
    assert host.runtimes["composer"].registry.tls  # the composer's own calls to the registry are encrypted too
    with Composer(target, tls=ClientTLS(ca=pki.ca)) as composer:
        assert composer.tls
        result = composer.compose(CLASSES)
    assert result.tls and list(result.header.classes) == CLASSES
    model, meta = result.load()
    assert meta["classes"] == CLASSES
    # The name checked can be another one the certificate holds; one it does not hold is refused.
    with Composer(target, tls=ClientTLS(ca=pki.ca, server_name="localhost")) as composer:
        assert composer.describe(CLASSES).classes == result.header.classes
    with Composer(target, tls=ClientTLS(ca=pki.ca, server_name="poe.example.com"), retries=0, timeout=5) as composer, \
            pytest.raises(Unavailable):
        composer.describe(CLASSES)


def test_plaintext_or_untrusting_clients_are_refused(tls_stack, pki):
    _, target = tls_stack
    with Composer(target, tls=False, retries=0, timeout=5) as plaintext, pytest.raises(Unavailable):
        plaintext.describe(CLASSES)
    # TLS, but checked against a CA that did not sign the server's certificate.
    with Composer(target, tls=ClientTLS(ca=pki.rogue_cert), retries=0, timeout=5) as untrusting, \
            pytest.raises(Unavailable):
        untrusting.describe(CLASSES)


def test_mutual_tls_requires_a_certificate_from_the_client_ca(pki, tmp_path):
    cfg = tls_settings(tmp_path / "home", tls_server_cert=pki.server_cert,
                       tls_server_key=pki.server_key, tls_client_ca=pki.ca,
                       # what the composer hosted here uses to reach the registry beside it
                       tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key)
    host = create_server("127.0.0.1:0", cfg, ("registry", "composer"), migrate=True, warm=False)
    with host:
        target = f"127.0.0.1:{host.port}"
        assert list(host.runtimes["composer"].registry.list_pools()) == []  # in-process, with its client certificate
        for refused in (ClientTLS(ca=pki.ca), ClientTLS(ca=pki.ca, cert=pki.rogue_cert, key=pki.rogue_key)):
            with RegistryClient(target, tls=refused, retries=0, timeout=5) as client, pytest.raises(Unavailable):
                list(client.list_pools())
        with RegistryClient(target, tls=ClientTLS(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)) as client:
            assert list(client.list_pools()) == []


def _garbage(tmp_path: Path) -> Path:
    path = tmp_path / "garbage.pem"
    path.write_text("not a certificate\n")
    return path


@pytest.mark.parametrize("fields, message", [
    ({"tls_server_cert": "server_cert"}, "POE_TLS_SERVER_CERT is set but POE_TLS_SERVER_KEY is not"),
    ({"tls_server_key": "server_key"}, "POE_TLS_SERVER_KEY is set but POE_TLS_SERVER_CERT is not"),
    ({"tls_client_ca": "ca"}, "POE_TLS_CLIENT_CA is set but POE_TLS_SERVER_CERT"),
    ({"tls_server_cert": "garbage", "tls_server_key": "server_key"}, "POE_TLS_SERVER_CERT: .* holds no PEM"),
    ({"tls_server_cert": "server_cert", "tls_server_key": "client_key"}, "POE_TLS_SERVER_KEY: .* not a PEM private"),
    ({"tls_server_cert": "server_cert", "tls_server_key": "missing"}, "POE_TLS_SERVER_KEY: cannot read"),
    ({"tls_server_cert": "server_cert", "tls_server_key": "server_key", "tls_client_ca": "garbage"},
     "POE_TLS_CLIENT_CA: .* holds no PEM"),
    # A CA-signed certificate alone, no POE_TLS_CA: the composer could not verify the registry beside it.
    ({"tls_server_cert": "server_cert", "tls_server_key": "server_key", "services": 2}, "set POE_TLS_CA"),
    # Under mutual TLS the composer presents the server's certificate, which is not for client authentication.
    ({"tls_server_cert": "server_cert", "tls_server_key": "server_key", "tls_client_ca": "ca", "tls_ca": "ca",
      "services": 2}, "POE_TLS_CLIENT_CA: .*set POE_TLS_CERT and POE_TLS_KEY"),
])
def test_bad_server_tls_settings_are_refused_at_start(pki, tmp_path, fields, message):
    files = {**dataclasses.asdict(pki), "garbage": _garbage(tmp_path), "missing": tmp_path / "missing.pem"}
    services = ("registry", "composer") if fields.pop("services", 1) == 2 else ("registry",)
    cfg = tls_settings(tmp_path / "home", **{k: files[v] for k, v in fields.items()})
    with pytest.raises(InvalidArgument, match=message):
        create_server("127.0.0.1:0", cfg, services, migrate=True, warm=False)


def test_bad_client_tls_settings_are_refused(pki, tmp_path):
    with pytest.raises(InvalidArgument, match="POE_TLS_CA: .* holds no PEM"):
        Composer("127.0.0.1:1", tls=ClientTLS(ca=_garbage(tmp_path)))
    with pytest.raises(InvalidArgument, match="POE_TLS_CERT is set but POE_TLS_KEY is not"):
        Composer("127.0.0.1:1", tls=ClientTLS(ca=pki.ca, cert=pki.client_cert))
    with pytest.raises(InvalidArgument, match="need POE_TLS_CA"):
        Composer("127.0.0.1:1", config=tls_settings(tmp_path, tls_cert=pki.client_cert, tls_key=pki.client_key))


# -- /metrics --------------------------------------------------------------------------------------

def _scrape(port: int, context: ssl.SSLContext | None = None, scheme: str = "https") -> str:
    url = f"{scheme}://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, context=context, timeout=5) as response:
        return response.read().decode()


def test_metrics_over_https(pki):
    port = serve_metrics(0, "127.0.0.1", certfile=pki.server_cert, keyfile=pki.server_key)
    trusting = ssl.create_default_context(cafile=pki.ca)
    assert "poe_compose_requests_total" in _scrape(port, trusting)
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        _scrape(port, scheme="http")
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        _scrape(port, ssl.create_default_context())  # the system's roots do not know the test CA
    # A client that connects and says nothing does not hold up the others.
    with socket.create_connection(("127.0.0.1", port)):
        assert "poe_" in _scrape(port, trusting)


def test_metrics_under_mutual_tls_need_a_client_certificate(pki):
    port = serve_metrics(0, "127.0.0.1", certfile=pki.server_cert, keyfile=pki.server_key, client_cafile=pki.ca)
    anonymous = ssl.create_default_context(cafile=pki.ca)
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        _scrape(port, anonymous)
    with_certificate = ssl.create_default_context(cafile=pki.ca)
    with_certificate.load_cert_chain(pki.client_cert, pki.client_key)
    assert "poe_" in _scrape(port, with_certificate)


# -- the CLI ---------------------------------------------------------------------------------------

def test_cli_compose_with_tls_options(tls_stack, pki, tmp_path, capsys):
    _, target = tls_stack
    out = tmp_path / "model.pt"
    assert main(["compose", "--target", target, "--classes", ",".join(CLASSES), "-o", str(out),
                 "--tls-ca", str(pki.ca)]) == 0
    assert out.stat().st_size > 0
    assert "POE_TLS_CA" not in os.environ  # the option holds for the command only
    # Given before the command, with the name to check.
    assert main(["--tls-ca", str(pki.ca), "--tls-server-name", "localhost", "compose", "--target", target,
                 "--classes", "Bag", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["compose", "--target", target, "--classes", "Bag", "--timeout", "5", "-o", str(out)]) == 7
    assert "unavailable" in capsys.readouterr().err.lower()
    assert main(["compose", "--target", target, "--classes", "Bag", "-o", str(out),
                 "--tls-ca", str(tmp_path / "nope.pem")]) == 4
    assert "POE_TLS_CA: cannot read" in capsys.readouterr().err


def test_serve_command_serves_tls_and_https_metrics_on_its_host(pki, tmp_path):
    """A serving command with the server TLS flags (the registry alone: it starts without torch):
    gRPC and /metrics both on 127.0.0.1 only, both over TLS."""
    env = {**os.environ, "POE_HOME": str(tmp_path / "home")}
    serving = subprocess.Popen([sys.executable, "-m", "poe.cli", "registry", "serve", "--migrate", "--drain", "0",
                                "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
                                "--tls-server-cert", str(pki.server_cert), "--tls-server-key", str(pki.server_key)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        banner = serving.stdout.readline()
        found = re.search(r"listening on 127\.0\.0\.1:(\d+) \(TLS\); metrics on :(\d+)/metrics \(HTTPS\)", banner)
        assert found, banner
        grpc_port, metrics_port = int(found.group(1)), int(found.group(2))
        assert _listening_addresses(metrics_port) == {"127.0.0.1"}
        assert _listening_addresses(grpc_port) == {"127.0.0.1"}
        assert "poe_" in _scrape(metrics_port, ssl.create_default_context(cafile=pki.ca))
        with RegistryClient(f"127.0.0.1:{grpc_port}", tls=ClientTLS(ca=pki.ca)) as reg:
            reg.wait_ready(10)
            assert list(reg.list_pools()) == []
    finally:
        serving.send_signal(signal.SIGTERM)
        serving.wait(20)


def _listening_addresses(port: int) -> set[str]:
    """The local addresses on which something listens on TCP `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                # The kernel writes each 32-bit word of the address in host (little-endian) order.
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                ip = ipaddress.ip_address(words)
                found.add(str(getattr(ip, "ipv4_mapped", None) or ip))  # ::ffff:127.0.0.1 is 127.0.0.1
    return found


# -- loading a composed model ----------------------------------------------------------------------

def test_load_checks_the_bytes_and_where_they_came_from(tls_stack, pki):
    _, target = tls_stack
    with Composer(target, tls=ClientTLS(ca=pki.ca)) as composer:
        result = composer.compose(CLASSES)
    tampered = dataclasses.replace(result, data=result.data[:-1] + bytes([result.data[-1] ^ 1]))
    with pytest.raises(DataLoss, match="sha256"):
        tampered.load()
    with pytest.raises(DataLoss):
        tampered.load(allow_insecure=True)  # the flag is about the channel, never about the bytes
    from_afar = dataclasses.replace(result, source="10.1.2.3:50051", tls=False)
    with pytest.raises(FailedPrecondition, match="without TLS"):
        from_afar.load()
    assert from_afar.load(allow_insecure=True)[1]["classes"] == CLASSES
    assert dataclasses.replace(result, source="10.1.2.3:50051").load()[1]["classes"] == CLASSES  # over TLS
    assert dataclasses.replace(result, source="localhost:50051", tls=False).load()[1]["classes"] == CLASSES
