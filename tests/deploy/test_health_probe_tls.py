"""The health-probe script (deploy/docker/grpc_health_probe.py) against a real gRPC health server
that serves TLS, with and without client certificates: the exec probe of the chart and the
kustomize TLS component, and the `helm test` Pod, depend on it."""

from __future__ import annotations

import datetime
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from deploy_paths import REPO
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

PROBE = REPO / "deploy" / "docker" / "grpc_health_probe.py"


def _pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _issue(subject: str, issuer_key, issuer_name, *, ca: bool = False, dns: tuple[str, ...] = ()):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if dns:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False)
    if not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for the Service name poe-registry, and a client certificate,
    as the files of a kubernetes.io/tls Secret (ca.crt, tls.crt, tls.key) plus the client's."""
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca = _issue("poe test CA", None, None, ca=True)
    server_key, server = _issue("poe-registry", ca_key, ca.subject, dns=("poe-registry", "poe-registry.poe.svc"))
    client_key, client = _issue("poe-composer", ca_key, ca.subject)
    other_ca_key, other_ca = _issue("another CA", None, None, ca=True)
    files = {"ca.crt": ca.public_bytes(serialization.Encoding.PEM),
             "other-ca.crt": other_ca.public_bytes(serialization.Encoding.PEM),
             "tls.crt": server.public_bytes(serialization.Encoding.PEM), "tls.key": _pem(server_key),
             "client.crt": client.public_bytes(serialization.Encoding.PEM), "client.key": _pem(client_key)}
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


def _serve(pki: Path, *, client_auth: bool):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [((pki / "tls.key").read_bytes(), (pki / "tls.crt").read_bytes())],
        root_certificates=(pki / "ca.crt").read_bytes() if client_auth else None,
        require_client_auth=client_auth)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    servicer.set("poe.v1.Registry", health_pb2.HealthCheckResponse.SERVING)
    return server, f"127.0.0.1:{port}"


@pytest.fixture()
def tls_server(pki):
    server, addr = _serve(pki, client_auth=False)
    yield addr
    server.stop(None)


@pytest.fixture()
def mtls_server(pki):
    server, addr = _serve(pki, client_auth=True)
    yield addr
    server.stop(None)


def probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROBE), "--timeout", "3", *args], capture_output=True, text=True,
                          timeout=30, env={"PATH": "/usr/bin:/bin", **(env or {})})


def test_tls_probe_verifies_the_server_for_the_service_name(pki, tls_server):
    ok = probe("--addr", tls_server, "--service", "poe.v1.Registry",
               "--tls-ca", str(pki / "ca.crt"), "--tls-server-name", "poe-registry")
    assert ok.returncode == 0, ok.stderr
    # 127.0.0.1 is not in the certificate; a CA that did not sign it; plaintext to a TLS port.
    for args in (["--tls-ca", str(pki / "ca.crt")],
                 ["--tls-ca", str(pki / "other-ca.crt"), "--tls-server-name", "poe-registry"],
                 []):
        out = probe("--addr", tls_server, "--service", "poe.v1.Registry", *args)
        assert out.returncode == 1 and "unhealthy" in out.stderr, args


def test_tls_settings_come_from_the_services_own_variables(pki, mtls_server):
    env = {"POE_TLS_CA": str(pki / "ca.crt"), "POE_TLS_CERT": str(pki / "client.crt"),
           "POE_TLS_KEY": str(pki / "client.key")}
    ok = probe("--addr", mtls_server, "--service", "poe.v1.Registry", "--tls-server-name", "poe-registry", env=env)
    assert ok.returncode == 0, ok.stderr
    # Without a client certificate a server that requires one refuses the handshake.
    anonymous = probe("--addr", mtls_server, "--service", "poe.v1.Registry", "--tls-server-name", "poe-registry",
                      env={"POE_TLS_CA": env["POE_TLS_CA"]})
    assert anonymous.returncode == 1 and "UNAVAILABLE" in anonymous.stderr


def test_bad_tls_files_are_a_one_line_reason(pki, tls_server):
    out = probe("--addr", tls_server, "--tls-ca", str(pki / "missing.crt"))
    assert out.returncode == 1 and "missing.crt" in out.stderr and out.stderr.count("\n") == 1
    out = probe("--addr", tls_server, "--tls-ca", str(pki / "ca.crt"), "--tls-cert", str(pki / "client.crt"))
    assert out.returncode == 1 and "go together" in out.stderr
