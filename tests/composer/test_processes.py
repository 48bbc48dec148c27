"""`poe serve composer --processes 2`: two composer processes on one port (SO_REUSEPORT), each warm
and SERVING on its own, /metrics of both added up by the parent, and every process gone after
SIGTERM (or after one of them dies)."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from testenv import auth_env

from poe.client.composer import Composer
from poe.client.registry import RegistryClient
from poe.engine.config import Settings
from poe_services.host import create_server

SERVING = health_pb2.HealthCheckResponse.SERVING
# A channel option that makes a channel open a TCP connection of its own (gRPC shares one between
# a process's channels to the same target otherwise); the kernel spreads connections, not calls.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def _value(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


@pytest.fixture
def composer_processes(tmp_path, pool_dir):
    """start() -> (process, target, metrics port, child pids): `poe serve composer --processes 2`
    reading from a registry in this process that holds the test pool; killed afterwards."""
    registry = create_server("127.0.0.1:0", Settings.from_env({**auth_env(), "POE_HOME": str(tmp_path / "reg")}),
                             ("registry",), migrate=True)
    registry.start()
    with RegistryClient(f"127.0.0.1:{registry.port}") as reg:
        reg.import_pool(pool_dir)
    procs, log = [], tmp_path / "serve.log"

    def start():
        port, metrics_port = _free_port(), _free_port()
        env = {**os.environ, "POE_HOME": str(tmp_path / "home"), "POE_REGISTRY_ADDR": f"127.0.0.1:{registry.port}",
               "POE_DEFAULT_POOL": "test-pool", "OMP_NUM_THREADS": "1"}
        with log.open("w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "poe.cli.main", "serve", "composer", "--processes", "2",
                                     "--port", str(port), "--metrics-port", str(metrics_port), "--host", "127.0.0.1",
                                     "--drain", "0", "--grace", "5"], env=env, stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        deadline = time.monotonic() + 60
        while not (m := re.search(r"\(pids (\d+), (\d+)\)", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        target = f"127.0.0.1:{port}"
        # Each new connection reaches one of the two: wait until 8 in a row find it SERVING (warm).
        serving = 0
        while serving < 8:
            assert proc.poll() is None and time.monotonic() < deadline + 60, log.read_text()
            with grpc.insecure_channel(target, options=OWN_CONNECTION) as ch:
                try:
                    status = health_pb2_grpc.HealthStub(ch).Check(
                        health_pb2.HealthCheckRequest(service="poe.v1.Composer"), timeout=2).status
                except grpc.RpcError:
                    status = None
            serving = serving + 1 if status == SERVING else 0
            if status != SERVING:
                time.sleep(0.2)
        return proc, target, metrics_port, (int(m.group(1)), int(m.group(2)))

    yield start, log
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
    registry.stop(0).wait()


def test_two_processes_share_the_port_and_their_metrics(composer_processes):
    start, log = composer_processes
    proc, target, metrics_port, pids = start()
    assert all(_alive(pid) for pid in pids)
    class_sets = [["T-shirt/top", "Trouser"], ["Bag", "Sandal"], ["Coat", "Dress"], ["Sneaker", "Pullover"],
                  ["Shirt", "Bag"], ["Ankle boot", "Coat"], ["Trouser", "Sneaker"], ["Dress", "Bag"]] * 2

    def compose(classes):  # 16 clients, a connection each
        channel = grpc.insecure_channel(target, options=Composer.channel_options(0) + OWN_CONNECTION)
        with Composer(channel=channel) as c:
            result = c.compose(classes)
        channel.close()
        return result

    with ThreadPoolExecutor(16) as ex:
        results = list(ex.map(compose, class_sets))
    assert all(r.header.size == len(r.data) > 0 for r in results)
    text = _scrape(metrics_port)
    assert _value(text, 'poe_compose_requests_total{grpc_code="OK"}') == len(class_sets)
    rpc = 'grpc_server_handled_total{grpc_code="OK",grpc_method="ComposeModel",grpc_service="poe.v1.Composer"'
    assert _value(text, rpc) == len(class_sets)
    assert "poe_build_info{" in text
    # Both processes built models (16 connections all on one process: 2 in 65,536).
    model_bytes = {int(pid): float(v) for pid, v in
                   re.findall(r'poe_compose_cache_bytes\{cache="model",pid="(\d+)"\} (\S+)', text)}
    assert set(model_bytes) == set(pids) and all(v > 0 for v in model_bytes.values()), model_bytes

    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, log.read_text()
    assert time.monotonic() - t0 < 5 + 1.5 + 1 + 5  # grace + allowance + the parent's second + slack
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids)


def test_one_process_dying_stops_the_other_and_fails(composer_processes):
    start, log = composer_processes
    proc, _, _, pids = start()
    os.kill(pids[0], signal.SIGKILL)
    assert proc.wait(30) == 1, log.read_text()
    assert "ended (exit code -9)" in log.read_text()
    deadline = time.monotonic() + 10
    while _alive(pids[1]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pids[1])


def test_only_the_composer_runs_in_several_processes():
    out = subprocess.run([sys.executable, "-m", "poe.cli.main", "serve", "registry", "--processes", "2"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "--processes" in out.stderr
