"""The dashboard and the alert rules against a live service: `poe up` in its own process, one
ComposeModel through it, then its /metrics endpoint scraped over HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from deploy_paths import alert_rules, dashboard_exprs
from promql import exposed_metric_names, unknown_metrics

from poe.engine.pool import save as save_pool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live(tmp_path_factory, random_pool):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    tmp = tmp_path_factory.mktemp("live")
    pool_dir = save_pool(random_pool, tmp / "pool")
    port, metrics_port = _free_port(), _free_port()
    env = {**os.environ, "POE_HOME": str(tmp / "home"), "POE_DEFAULT_POOL": "test-pool", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "poe.cli.main", "up", "--port", str(port), "--metrics-port",
                             str(metrics_port), "--host", "127.0.0.1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    target = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                assert proc.poll() is None, proc.stdout.read()
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(service="poe.v1.Registry"), timeout=1).status == 1:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "poe up did not become ready"
                time.sleep(0.2)
        yield target, metrics_port, pool_dir
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_dashboard_and_rules_name_only_metrics_a_live_composer_exports(live):
    from poe.client.composer import Composer
    from poe.client.registry import RegistryClient
    from poe.engine.errors import InvalidArgument

    target, metrics_port, pool_dir = live
    with RegistryClient(target) as reg:
        reg.import_pool(pool_dir)
    with Composer(target, retries=0) as c:
        result = c.compose(["Sandal", "Bag"], pool="test-pool")
        with pytest.raises(InvalidArgument):
            c.compose(["Unicorn"], pool="test-pool")
    assert result.header.classes == ("Sandal", "Bag")
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    exposed = exposed_metric_names(body)
    # The requests really were counted by the live process, the failed one too, with its code.
    assert 'poe_compose_requests_total{grpc_code="OK"} 1.0' in body
    assert 'poe_compose_requests_total{grpc_code="INVALID_ARGUMENT"} 1.0' in body
    assert ('poe_compose_duration_seconds_count{cache="none",format="torchscript",grpc_code="INVALID_ARGUMENT"} 1.0'
            in body)
    for code in ("OK", "INVALID_ARGUMENT"):
        rpc = f'grpc_code="{code}",grpc_method="ComposeModel",grpc_service="poe.v1.Composer",grpc_type="server_stream"'
        assert f"grpc_server_handled_total{{{rpc}}} 1.0" in body
        assert f"grpc_server_handling_seconds_count{{{rpc}}} 1.0" in body
    exprs = [r["expr"] for r in alert_rules()] + dashboard_exprs()
    unknown = {e: unknown_metrics(e, exposed) for e in exprs}
    assert {e: u for e, u in unknown.items() if u} == {}
