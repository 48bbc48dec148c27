"""Authentication and roles on a real server: anonymous callers, tokens of every role, revocation,
expiry, the in-process service token, the upload quota, `poe token` and the secrets never shown.

Clients here are raw stubs on plain channels, as a client that knows only the protos would be:
the metadata they send is exactly what the test says.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.message_factory import GetMessageClass

from poe.engine.config import Settings, redact_url
from poe.v1 import composer_pb2, extractor_pb2, registry_pb2
from poe.v1 import composer_pb2_grpc as composer_grpc
from poe.v1 import registry_pb2_grpc as registry_grpc
from poe_services import auth, tokens
from poe_services.host import create_server

POOL_DIR = Path(__file__).resolve().parents[2] / "pools" / "fashion-mnist"
SERVICES = {"poe.v1.Registry": registry_pb2, "poe.v1.Composer": composer_pb2, "poe.v1.Extractor": extractor_pb2}


def _settings(home: Path, tokens_file: Path, **env: str) -> Settings:
    return Settings.from_env({"POE_HOME": str(home), "POE_TOKENS_FILE": str(tokens_file),
                              "POE_REGISTRY_HEALTH_INTERVAL": "0.1", "POE_EXTRACTOR_HEALTH_INTERVAL": "0.1",
                              "POE_DEFAULT_POOL": "fashion-mnist", **env})


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """All three services on one loopback server (as `poe up`), the shipped pool imported by an
    admin token, and a token of every role."""
    root = tmp_path_factory.mktemp("auth")
    path = root / "tokens.json"
    issued = {role: tokens.create(path, role, f"test {role}")[1] for role in auth.ROLE_PERMISSIONS}
    host = create_server("127.0.0.1:0", _settings(root / "home", path), migrate=True, warm=False)
    host.start()
    from poe.client.registry import RegistryClient

    with RegistryClient(f"127.0.0.1:{host.port}", token=issued["admin"]) as reg:
        reg.import_pool(POOL_DIR)
    channel = grpc.insecure_channel(f"127.0.0.1:{host.port}")
    yield {"host": host, "channel": channel, "tokens": issued, "path": path}
    channel.close()
    host.stop(None).wait(30)


def _call(channel: grpc.Channel, full_method: str, request=None, token: str | None = None, timeout: float = 10):
    """Call any method with an empty (or given) request; returns the response(s) or raises grpc.RpcError."""
    service, method = full_method.strip("/").split("/")
    desc = SERVICES[service].DESCRIPTOR.services_by_name[service.split(".")[-1]].methods_by_name[method]
    req_cls, resp_cls = GetMessageClass(desc.input_type), GetMessageClass(desc.output_type)
    request = request if request is not None else req_cls()
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    call = kind[(desc.client_streaming, desc.server_streaming)](
        full_method, request_serializer=req_cls.SerializeToString, response_deserializer=resp_cls.FromString)
    arg = iter([request]) if desc.client_streaming else request
    result = call(arg, timeout=timeout, metadata=metadata)
    return list(result) if desc.server_streaming else result


def _code(channel, method, token=None, request=None) -> grpc.StatusCode:
    try:
        _call(channel, method, request, token)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_every_method_of_every_service_has_a_permission():
    methods = {f"/{name}/{m}" for name, mod in SERVICES.items()
               for m in mod.DESCRIPTOR.services_by_name[name.split(".")[-1]].methods_by_name}
    assert methods == set(auth.METHOD_PERMISSIONS)
    assert set(auth.METHOD_PERMISSIONS.values()) <= {auth.READ, auth.PUBLISH, auth.ADMIN, auth.INTERNAL}


def test_anonymous_on_loopback_reads_and_composes_but_writes_nothing(suite):
    ch = suite["channel"]
    stub = composer_grpc.ComposerStub(ch)
    parts = list(stub.ComposeModel(composer_pb2.ComposeModelRequest(classes=["Sandal", "Sneaker", "Bag"]), timeout=60))
    assert parts and parts[0].WhichOneof("payload") == "header"
    pools = registry_grpc.RegistryStub(ch).ListPools(registry_pb2.ListPoolsRequest(), timeout=10)
    assert [p.name for p in pools.pools] == ["fashion-mnist"]
    for method, needed in auth.METHOD_PERMISSIONS.items():
        if needed == auth.READ:
            continue
        assert _code(ch, method) == grpc.StatusCode.PERMISSION_DENIED, method
    # What an anonymous caller could do before is refused, and nothing changed: `latest` not moved,
    # no version deleted, no junk in the composed-model cache.
    stub_r = registry_grpc.RegistryStub(ch)
    for method, request in [
        ("SetPoolAlias", registry_pb2.SetPoolAliasRequest(name="fashion-mnist", alias="stable", version="1")),
        ("DeletePoolVersion", registry_pb2.DeletePoolVersionRequest(name="fashion-mnist", version="1")),
        ("UpdateExtractionJob", registry_pb2.UpdateExtractionJobRequest(job_id="any"))]:
        assert _code(ch, f"/poe.v1.Registry/{method}", request=request) == grpc.StatusCode.PERMISSION_DENIED
    assert [p.name for p in stub_r.ListPools(registry_pb2.ListPoolsRequest(), timeout=10).pools] == ["fashion-mnist"]


def test_roles_allow_exactly_their_permissions(suite):
    ch, issued = suite["channel"], suite["tokens"]
    for role, token in issued.items():
        allowed = auth.ROLE_PERMISSIONS[role]
        for method, needed in auth.METHOD_PERMISSIONS.items():
            code = _code(ch, method, token)
            if needed in allowed:
                # Allowed through; the empty request itself may be refused by the servicer.
                assert code not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED), \
                    (role, method, code)
            else:
                assert code == grpc.StatusCode.PERMISSION_DENIED, (role, method, code)


def test_refusals_do_not_tell_whether_the_resource_exists(suite):
    ch, reader = suite["channel"], suite["tokens"]["reader"]
    messages = []
    for pool in ("fashion-mnist", "no-such-pool"):
        with pytest.raises(grpc.RpcError) as e:
            _call(ch, "/poe.v1.Registry/DeletePoolVersion",
                  registry_pb2.DeletePoolVersionRequest(name=pool, version="1"), reader)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        messages.append(e.value.details())
    assert messages[0] == messages[1]


@pytest.mark.parametrize("token", ["", "poe_nobody_AAAAAAAAAAAAAAAAAAAAAAAAAAAA", "not-a-token", "x" * 5000])
def test_bad_tokens_are_unauthenticated_even_for_reads(suite, token):
    ch = suite["channel"]
    metadata = (("authorization", f"Bearer {token}"),)
    with pytest.raises(grpc.RpcError) as e:
        registry_grpc.RegistryStub(ch).ListPools(registry_pb2.ListPoolsRequest(), timeout=10, metadata=metadata)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert token[:20] not in e.value.details() or not token


def test_a_revoked_or_expired_token_is_refused_within_seconds(suite):
    ch, path = suite["channel"], suite["path"]
    entry, token = tokens.create(path, "reader", "short-lived")
    assert _code(ch, "/poe.v1.Registry/ListPools", token) == grpc.StatusCode.OK
    tokens.revoke(path, entry.id)
    deadline = time.monotonic() + 5
    while _code(ch, "/poe.v1.Registry/ListPools", token) == grpc.StatusCode.OK:
        assert time.monotonic() < deadline, "a revoked token was still accepted after 5 s"
        time.sleep(0.2)
    assert _code(ch, "/poe.v1.Registry/ListPools", token) == grpc.StatusCode.UNAUTHENTICATED
    _, soon = tokens.create(path, "reader", "expires", ttl=timedelta(seconds=1))
    time.sleep(2.2)
    assert _code(ch, "/poe.v1.Registry/ListPools", soon) == grpc.StatusCode.UNAUTHENTICATED


def test_no_anonymous_access_unless_loopback_or_configured(tmp_path):
    cfg = Settings.from_env({"POE_HOME": str(tmp_path)})
    assert auth.anonymous_role(cfg, "127.0.0.1:50051") == "reader"
    assert auth.anonymous_role(cfg, "[::1]:50051") == "reader"
    assert auth.anonymous_role(cfg, "localhost:0") == "reader"
    assert auth.anonymous_role(cfg, "[::]:50051") is None
    assert auth.anonymous_role(cfg, "0.0.0.0:50051") is None
    assert auth.anonymous_role(cfg, "10.1.2.3:50051") is None
    none = Settings.from_env({"POE_HOME": str(tmp_path), "POE_ANONYMOUS_ROLE": "none",
                              "POE_REGISTRY_HEALTH_INTERVAL": "0.1", "POE_EXTRACTOR_HEALTH_INTERVAL": "0.1"})
    host = create_server("127.0.0.1:0", none, migrate=True, warm=False)
    host.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{host.port}") as ch:
            assert _code(ch, "/poe.v1.Registry/ListPools") == grpc.StatusCode.UNAUTHENTICATED
            # Probes need no token, and the composer and extractor reach the registry beside them
            # with their own service token: every service turns SERVING with anonymous callers shut out.
            from grpc_health.v1 import health_pb2, health_pb2_grpc
            check = health_pb2_grpc.HealthStub(ch).Check
            deadline = time.monotonic() + 30
            while check(health_pb2.HealthCheckRequest(service=""), timeout=10).status != \
                    health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "not SERVING within 30 s with POE_ANONYMOUS_ROLE=none"
                time.sleep(0.2)
    finally:
        host.stop(None).wait(30)


def test_upload_quota_per_caller(tmp_path):
    path = tmp_path / "tokens.json"
    _, admin = tokens.create(path, "admin")
    host = create_server("127.0.0.1:0", _settings(tmp_path / "home", path, POE_UPLOAD_QUOTA_BYTES="1Ki"),
                         ("registry",), migrate=True)
    host.start()
    try:
        from poe.client.registry import RegistryClient
        from poe.engine.errors import ResourceExhausted

        with RegistryClient(f"127.0.0.1:{host.port}", token=admin) as reg:
            with pytest.raises(ResourceExhausted, match="POE_UPLOAD_QUOTA_BYTES"):
                reg.import_pool(POOL_DIR)
            assert list(reg.list_pools()) == []
    finally:
        host.stop(None).wait(30)


def test_token_cli_create_list_revoke(tmp_path):
    path = tmp_path / "t" / "tokens.json"
    env = {**os.environ, "POE_TOKENS_FILE": str(path)}

    def poe(*args):
        return subprocess.run([sys.executable, "-m", "poe.cli.main", "token", *args], env=env, capture_output=True,
                              text=True, timeout=60)

    created = poe("create", "--role", "publisher", "--name", "ci", "--expires", "30d", "--json")
    assert created.returncode == 0, created.stderr
    info = json.loads(created.stdout)
    assert info["role"] == "publisher" and info["expires"] and tokens.TOKEN.fullmatch(info["token"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert info["token"] not in path.read_text()  # only its sha256 is kept
    plain = poe("create", "--role", "reader")
    assert plain.returncode == 0 and tokens.TOKEN.fullmatch(plain.stdout.strip())
    listed = json.loads(poe("list", "--json").stdout)
    assert {r["id"]: r["state"] for r in listed}[info["id"]] == "active"
    assert all("sha256" not in r and "token" not in r for r in listed)
    assert poe("revoke", info["id"]).returncode == 0
    assert {r["id"]: r["state"] for r in json.loads(poe("list", "--json").stdout)}[info["id"]] == "revoked"
    missing = poe("revoke", "nope")
    assert missing.returncode == 5 and missing.stderr.count("\n") == 1
    bad = poe("create", "--role", "root")
    assert bad.returncode == 2


def test_broken_token_file_stops_the_server_from_starting(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text('{"tokens": [{"id": "x", "role": "god", "sha256": "00"}]}')
    from poe.engine.errors import DataLoss

    with pytest.raises(DataLoss, match="unknown role"):
        create_server("127.0.0.1:0", _settings(tmp_path / "home", path), ("registry",), migrate=True)


def test_secrets_never_shown(tmp_path):
    cfg = Settings.from_env({"POE_DATABASE_URL": "postgresql+psycopg://poe:hunter2@db:5432/poe",
                             "POE_S3_SECRET_KEY": "s3-secret-value", "POE_TOKEN": "poe_a_bbbbbbbbbbbbbbbbbbbbbbbbb",
                             "POE_SERVICE_TOKEN": "poe_s_ccccccccccccccccccccccccc"})
    shown = repr(cfg) + str(cfg)
    for secret in ("hunter2", "s3-secret-value", "bbbbbbbbbbbbbbbbbbbb", "cccccccccccccccccccc"):
        assert secret not in shown
    assert cfg.s3_secret_key.reveal() == "s3-secret-value"
    assert redact_url("postgresql://u:p%40ss@h/db") == "postgresql://u:***@h/db"
    # A CLI error about the database URL does not print the password either.
    env = {**os.environ, "POE_HOME": str(tmp_path), "POE_DATABASE_URL": "postgresql+psycopg://poe:hunter2@[bad/poe"}
    out = subprocess.run([sys.executable, "-m", "poe.cli.main", "registry", "migrate"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and "hunter2" not in out.stdout + out.stderr


def test_poe_up_writes_an_admin_token_that_the_local_cli_uses(tmp_path):
    """The README's order with a fresh POE_HOME: `poe up`, then `poe registry import` from another
    process, with no token configured anywhere."""
    env = {k: v for k, v in os.environ.items() if k not in ("POE_TOKEN", "POE_TOKENS_FILE", "POE_SERVICE_TOKEN")}
    env.update(POE_HOME=str(tmp_path / "home"), POE_LOG_LEVEL="WARNING")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env["POE_REGISTRY_ADDR"] = f"127.0.0.1:{port}"
    up = subprocess.Popen([sys.executable, "-m", "poe.cli.main", "up", "--port", str(port), "--metrics-port", "0"],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        token_file = tmp_path / "home" / "admin.token"
        deadline = time.monotonic() + 60
        while not token_file.exists():
            assert up.poll() is None, up.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert token_file.read_text().strip() not in (tmp_path / "home" / "tokens.json").read_text()
        imported = subprocess.run([sys.executable, "-m", "poe.cli.main", "registry", "import", str(POOL_DIR),
                                   "--target", f"127.0.0.1:{port}", "--json"], env=env, capture_output=True, text=True,
                                  timeout=120)
        assert imported.returncode == 0, imported.stderr
        # Without the token (another user of this machine, say) the same import is refused.
        env_no_token = {**env, "POE_HOME": str(tmp_path / "other")}
        refused = subprocess.run([sys.executable, "-m", "poe.cli.main", "registry", "import", str(POOL_DIR),
                                  "--target", f"127.0.0.1:{port}"], env=env_no_token, capture_output=True, text=True,
                                 timeout=120)
        assert refused.returncode == 8, refused.stderr
    finally:
        up.terminate()
        up.wait(30)
