"""`poe registry ...`: import a small pool (embedded and through a running server), list, serve."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from poe.cli.main import build_parser, main
from poe.cli.output import EXIT_DATA_LOSS, EXIT_INVALID_ARGUMENT, EXIT_NOT_FOUND, EXIT_UNAVAILABLE
from poe.client.registry import RegistryClient
from poe_services.host import create_server


@pytest.fixture
def poe_home(tmp_path, monkeypatch):
    home = tmp_path / "poe-home"
    monkeypatch.setenv("POE_HOME", str(home))
    for var in ("POE_DATABASE_URL", "POE_BLOB_URL", "POE_REGISTRY_ADDR"):
        monkeypatch.delenv(var, raising=False)
    return home


def test_import_embedded_then_list(pool_dir, poe_home, capsys):
    assert main(["registry", "import", str(pool_dir), "--target", "embedded", "--alias", "stable", "--json"]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["pool"] == "test-pool@1" and summary["created"] is True
    assert summary["aliases"] == ["latest", "stable"] and len(summary["experts"]) == 5
    assert "[1/9] hierarchy fashion-mnist v1" in err and "[9/9] published test-pool@1" in err
    assert (poe_home / "registry.sqlite3").is_file()
    manifest = json.loads((pool_dir / "pool.json").read_text())
    blobs = {p.name for p in (poe_home / "blobs" / "sha256").glob("*/*")}
    assert blobs == {manifest["library"]["sha256"], manifest["oracle"]["sha256"],
                     *(e["sha256"] for e in manifest["experts"])}

    assert main(["registry", "import", str(pool_dir)]) == 0  # default target: embedded; idempotent
    assert "test-pool@1 already published" in capsys.readouterr().out
    assert main(["registry", "list", "--json", "--class", "Sandal"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["pool"] for r in rows] == ["test-pool@1"] and rows[0]["dataset"] == "fashion-mnist"
    assert main(["registry", "list", "--class", "Unicorn"]) == 0
    assert capsys.readouterr().out.strip() == "no pools"


def test_import_through_a_running_registry(pool_dir, tmp_path, sqlite_url, make_settings, capsys):
    host = create_server("127.0.0.1:0", make_settings(tmp_path, sqlite_url, f"file://{tmp_path / 'b'}"), ("registry",))
    host.start()
    port = host.port
    try:
        assert main(["registry", "import", str(pool_dir), "--target", f"127.0.0.1:{port}"]) == 0
        assert "test-pool@1 published: 5 experts" in capsys.readouterr().out
        assert main(["registry", "list", "--target", f"127.0.0.1:{port}"]) == 0
        out = capsys.readouterr().out
        assert "test-pool@1" in out and "latest" in out
        with RegistryClient(f"127.0.0.1:{port}") as client:
            res = client.resolve_classes("test-pool", ["Trouser"])
            assert [x.task for x in res.experts] == ["lower-body-and-dresses"]
    finally:
        host.stop(None).wait(30)


def test_import_errors_are_one_line(pool_dir, tmp_path, poe_home, capsys):
    assert main(["registry", "import", str(tmp_path / "missing"), "--target", "embedded"]) == EXIT_NOT_FOUND
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("poe: error:") and "no pool.json" in err[-1]
    broken = tmp_path / "broken"
    shutil.copytree(pool_dir, broken)
    expert = next((broken / "experts").iterdir())
    expert.write_bytes(expert.read_bytes()[:-10] + b"0123456789")
    assert main(["registry", "import", str(broken), "--target", "embedded"]) == EXIT_DATA_LOSS
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("poe: error:") and "sha256 does not match" in err[-1]
    manifest = json.loads((pool_dir / "pool.json").read_text())
    del manifest["experts"]
    shutil.copytree(pool_dir, tmp_path / "no-experts")
    (tmp_path / "no-experts" / "pool.json").write_text(json.dumps(manifest))
    assert main(["registry", "import", str(tmp_path / "no-experts"), "--target", "embedded"]) == EXIT_INVALID_ARGUMENT
    assert "malformed manifest" in capsys.readouterr().err
    assert main(["registry", "list", "--target", "127.0.0.1:1"]) == EXIT_UNAVAILABLE
    assert "registry at 127.0.0.1:1" in capsys.readouterr().err


def test_help_and_serve_flags(capsys):
    with pytest.raises(SystemExit) as info:
        main(["registry", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("migrate", "import", "list", "serve"))
    flags = ["--port", "6000", "--metrics-port", "0", "--grace", "2", "--migrate", "--database-url", "sqlite://"]
    standalone = vars(build_parser().parse_args(["registry", "serve", *flags]))
    grouped = vars(build_parser().parse_args(["serve", "registry", *flags]))
    # `poe registry serve` is `poe serve registry`: the same flags, both served by poe_services.host.
    for key in ("port", "metrics_port", "grace", "migrate", "host", "database_url", "blob_url"):
        assert standalone[key] == grouped[key], key
    assert (standalone["port"], standalone["metrics_port"], standalone["migrate"]) == (6000, 0, True)
    assert callable(standalone["func"])


def test_registry_serve_process_stops_cleanly_on_sigterm(tmp_path):
    env = {**os.environ, "POE_HOME": str(tmp_path), "POE_LOG_LEVEL": "WARNING"}
    for var in ("POE_DATABASE_URL", "POE_BLOB_URL"):
        env.pop(var, None)
    proc = subprocess.Popen([sys.executable, "-m", "poe.cli.main", "registry", "serve", "--port", "0", "--migrate",
                             "--metrics-port", "0", "--host", "127.0.0.1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        banner = re.search(r"poe\.v1\.Registry listening on 127\.0\.0\.1:(\d+); metrics on :(\d+)/metrics", line)
        assert banner, line + proc.stderr.read()
        port, metrics_port = int(banner[1]), int(banner[2])
        with RegistryClient(f"127.0.0.1:{port}") as client:
            stub = health_pb2_grpc.HealthStub(client.channel)
            for name in ("", "poe.v1.Registry", "liveness"):
                status = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
                assert status.status == health_pb2.HealthCheckResponse.SERVING, name
            assert list(client.list_pools()) == []
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert ('grpc_server_handled_total{grpc_code="OK",grpc_method="ListPools",grpc_service="poe.v1.Registry",'
                'grpc_type="unary"} 1.0') in body
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert "stopping" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
