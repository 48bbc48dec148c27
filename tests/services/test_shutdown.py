"""Shutdown keeps its promises, and recordings are never lost in silence.

`poe up` runs in its own process with a small grace period and drain; its clients stop reading
their ComposeModel streams, a poller asks for health every 10 ms, and SIGTERM arrives. The process
must report NOT_SERVING while its port is still open, exit 0 within drain + grace + 2 s, and every
composition built before the signal must be recorded in the registry afterwards. Also: the drain
serves new calls, a handler that never returns does not hold the exit, the Kubernetes manifests
wait long enough, and a full recording queue counts its drops and warns once.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from testenv import auth_env

from poe.client.registry import RegistryClient
from poe.engine.config import Settings
from poe.engine.errors import InvalidArgument
from poe.engine.pool import save as save_pool
from poe.v1 import composer_pb2 as pb
from poe.v1 import composer_pb2_grpc, registry_pb2, registry_pb2_grpc
from poe_services.composer.recorder import Recorder
from poe_services.host import _wait_for_threads, create_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
GRACE, DRAIN = 2.0, 0.5
PROMISE = DRAIN + GRACE + 2.0  # seconds from SIGTERM to the exit, at most
CLASS_SETS = [["Sandal", "Bag"], ["Coat", "Trouser"], ["Shirt", "Dress", "Bag"], ["Sneaker", "Ankle boot"],
              ["T-shirt/top", "Pullover"], ["Sandal", "Sneaker", "Coat"], ["Trouser", "Bag", "Shirt"],
              ["Dress", "Pullover", "Ankle boot"]]
# A client that stops reading: without BDP probing its receive window stays at HTTP/2's initial 64 KiB,
# less than one composed file, so the server's stream blocks on flow control.
NOT_READING = [("grpc.http2.bdp_probe", 0)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(stub: health_pb2_grpc.HealthStub, name: str = "") -> int | str:
    try:
        return stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=1).status
    except grpc.RpcError as e:
        return e.code().name


class HealthPoller(threading.Thread):
    """Asks for the overall health every 10 ms on its own channel: (monotonic time, status or error)."""

    def __init__(self, target: str):
        super().__init__(daemon=True)
        self.target, self.seen, self.halt = target, [], threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(self.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while not self.halt.is_set():
                self.seen.append((time.monotonic(), _status(stub)))
                time.sleep(0.01)


def _spawn(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    """A process with its output in `log` (a file: a pipe nobody reads could fill up and block it)."""
    with log.open("w") as out:
        return subprocess.Popen(args, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture
def poe_up(tmp_path):
    """start(*flags) -> (process, target, log): `poe up` on a free port over POE_HOME=tmp_path/home;
    killed afterwards if still running."""
    procs = []

    def start(*flags: str) -> tuple[subprocess.Popen, str, Path]:
        port, log = _free_port(), tmp_path / "poe-up.log"
        env = {"POE_HOME": str(tmp_path / "home"), "POE_DEFAULT_POOL": "test-pool", "OMP_NUM_THREADS": "1",
               "POE_SHUTDOWN_DRAIN": "", "POE_SHUTDOWN_GRACE": "10", "POE_DATABASE_URL": "", "POE_BLOB_URL": ""}
        proc = _spawn([sys.executable, "-m", "poe.cli.main", "up", "--port", str(port), "--metrics-port", "0",
                       "--host", "127.0.0.1", *flags], log, **env)
        procs.append(proc)
        return proc, f"127.0.0.1:{port}", log

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def _wait_serving(proc: subprocess.Popen, target: str, name: str, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while _status(stub, name) != SERVING:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"{name or 'the server'} did not become SERVING"
            time.sleep(0.1)


def _registry(home):
    """A registry on `home` (SQLite and blobs, as `poe up` keeps them), started in this process."""
    settings = Settings.from_env({**auth_env(), "POE_HOME": str(home)})
    host = create_server("127.0.0.1:0", settings, ("registry",), migrate=True)
    host.start()
    return host


def test_sigterm_drains_then_stops_within_its_limit_and_keeps_the_recordings(poe_up, random_pool, tmp_path):
    home = tmp_path / "home"
    registry = _registry(home)  # the pool is there before `poe up` starts: SERVING means warm
    try:
        with RegistryClient(f"127.0.0.1:{registry.port}") as reg:
            reg.import_pool(save_pool(random_pool, tmp_path / "pool"))
    finally:
        registry.stop(None).wait(30)
    proc, target, log = poe_up("--grace", str(GRACE), "--drain", str(DRAIN))
    _wait_serving(proc, target, "", log)

    # Streams whose clients read the header (the model was built, its recording queued), then stop.
    channels, calls, headers = [], [], []
    for classes in CLASS_SETS:
        ch = grpc.insecure_channel(target, options=NOT_READING)
        call = composer_pb2_grpc.ComposerStub(ch).ComposeModel(pb.ComposeModelRequest(classes=classes), timeout=60)
        channels.append(ch)
        calls.append(call)
    for call in calls:
        headers.append(next(call).header)
    assert all(h.size > 96 * 1024 for h in headers), [h.size for h in headers]  # well over a stalled window
    poller = HealthPoller(target)
    poller.start()
    time.sleep(0.1)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(PROMISE + 10)
    finally:
        exited = time.monotonic()
        poller.halt.set()
        poller.join(5)
        for ch in channels:
            ch.close()
    output = log.read_text()
    assert rc == 0, output
    took = exited - sent
    # The stalled streams held the server until the grace period ended, no longer.
    assert DRAIN + GRACE - 0.3 <= took <= PROMISE, (took, output)

    after = [status for t, status in poller.seen if t >= sent]
    assert NOT_SERVING in after, after[:5]
    first_refused = next(i for i, s in enumerate(after) if s not in (SERVING, NOT_SERVING))
    assert NOT_SERVING in after[:first_refused]  # NOT_SERVING was seen while the port still answered
    assert set(after[after.index(NOT_SERVING):first_refused]) == {NOT_SERVING}
    assert first_refused >= 10  # ~0.5 s of drain at 10 ms per poll, with room for a busy machine

    registry = _registry(home)
    try:
        with RegistryClient(f"127.0.0.1:{registry.port}") as reg:
            found = {h.model_id: reg.get_composed_model(h.pool, list(h.class_ids), "torchscript.fused")
                     for h in headers}
    finally:
        registry.stop(None).wait(30)
    recorded = {model_id: m.blob.sha256 if m is not None else None for model_id, m in found.items()}
    assert recorded == {h.model_id: h.sha256 for h in headers}, output

    # Every process is gone, so no upload is in flight: any blob without its row is an orphan.
    fsck = subprocess.run([sys.executable, "-m", "poe.cli.main", "registry", "fsck", "--older-than", "0"],
                          env={**os.environ, "POE_HOME": str(home), "POE_DATABASE_URL": "", "POE_BLOB_URL": ""},
                          capture_output=True, text=True, timeout=60)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert f"fsck: {7 + len(headers)} blobs" in fsck.stdout, fsck.stdout  # the pool's and the recordings


def test_drain_keeps_serving_calls_while_not_serving(tmp_path):
    host = _registry(tmp_path / "home")
    target = f"127.0.0.1:{host.port}"
    with grpc.insecure_channel(target) as ch, RegistryClient(target, timeout=5) as reg:
        stub = health_pb2_grpc.HealthStub(ch)
        deadline = time.monotonic() + 15
        while _status(stub) != SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        closed = host.stop(grace=1, drain=1.0)
        assert {_status(stub, n) for n in ("", "poe.v1.Registry", "liveness")} == {NOT_SERVING}
        assert list(reg.list_pools()) == []  # new calls are still served during the drain
        assert not closed.is_set()
        assert closed.wait(10)
        assert _status(stub) == "UNAVAILABLE"


def _recordings(outcome: str) -> float:
    return REGISTRY.get_sample_value("poe_compose_recordings_total", {"outcome": outcome}) or 0.0


def test_a_full_recording_queue_counts_drops_and_warns_once(caplog):
    started, release = threading.Event(), threading.Event()
    sent = []

    def send(name: str):
        def put() -> None:
            started.set()
            release.wait(10)
            sent.append(name)
        return put

    recorder = Recorder(2, lambda puts: [put() for put in puts])
    before = {o: _recordings(o) for o in ("recorded", "dropped", "failed")}
    queued_before = REGISTRY.get_sample_value("poe_compose_recordings_queued")
    caplog.set_level(logging.WARNING, logger="poe_services.composer.recorder")
    try:
        assert recorder.submit("m0", send("m0"))
        assert started.wait(5)  # m0 is being sent (and blocks): the queue holds 2 more
        assert recorder.submit("m1", send("m1")) and recorder.submit("m2", send("m2"))
        assert [recorder.submit(f"x{i}", send(f"x{i}")) for i in range(5)] == [False] * 5
        assert _recordings("dropped") == before["dropped"] + 5
        assert REGISTRY.get_sample_value("poe_compose_recordings_queued") == queued_before + 3
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1  # at most one a minute, however many drops
        assert "dropped" in warnings[0].getMessage() and "POE_RECORD_QUEUE" in warnings[0].getMessage()
    finally:
        release.set()
    assert recorder.flush(5)
    assert sent == ["m0", "m1", "m2"]
    assert _recordings("recorded") == before["recorded"] + 3
    assert REGISTRY.get_sample_value("poe_compose_recordings_queued") == queued_before

    def refused() -> None:
        raise ConnectionError("registry refused")

    assert recorder.submit("m3", refused) and recorder.flush(5)
    assert _recordings("failed") == before["failed"] + 1
    recorder.close(1)
    assert not recorder.submit("m4", send("m4"))  # closed: dropped, and counted
    assert _recordings("dropped") == before["dropped"] + 6
    # The first failure is reported at once; the 4 drops after the first warning, at close.
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 3, messages
    assert "1 recording(s) of composed files failed" in messages[1] and "registry refused" in messages[1]
    assert "4 recording(s) of composed files dropped in the last" in messages[2]


def test_a_recording_queue_needs_room():
    with pytest.raises(InvalidArgument, match="POE_RECORD_QUEUE: must be at least 1, got 0"):
        Recorder(0, print)


def test_threads_still_running_at_the_deadline_are_named_not_waited_for():
    hold = threading.Event()
    plain = threading.Thread(target=hold.wait, name="stuck-thread")  # not a daemon: the exit would join it
    plain.start()
    pool = ThreadPoolExecutor(1, thread_name_prefix="stuck-pool")
    # Submitted from a daemon thread, as gRPC's polling thread submits RPCs: the worker is a daemon
    # too, and the interpreter's exit joins it all the same.
    starter = threading.Thread(target=lambda: pool.submit(hold.wait), daemon=True)
    starter.start()
    starter.join()
    closed = threading.Event()
    closed.set()
    try:
        t0 = time.monotonic()
        assert {"thread stuck-thread", "thread stuck-pool_0"} <= set(_wait_for_threads(closed, t0 + 0.3))
        assert time.monotonic() - t0 < 2
        assert _wait_for_threads(threading.Event(), time.monotonic())[0] == "closing the services"
    finally:
        hold.set()
        plain.join()
        pool.shutdown()


STUCK_SERVER = """
import os, sys, threading
from poe.engine.config import Settings
from poe_services.host import run
from poe_services.registry.servicer import RegistryServicer

def never_returns(self, request, context):  # a handler stuck in application code (a lost wake-up, a deadlock)
    threading.Event().wait()

RegistryServicer.ListPools = never_returns
settings = Settings.from_env({**os.environ, "POE_HOME": sys.argv[2]})
sys.exit(run(settings, ("registry",), int(sys.argv[1]), None, host="127.0.0.1", grace=float(sys.argv[3]),
             drain=float(sys.argv[4]), migrate=True))
"""


def test_a_handler_stuck_in_application_code_does_not_hold_the_exit(tmp_path):
    port, log = _free_port(), tmp_path / "server.log"
    proc = _spawn([sys.executable, "-c", STUCK_SERVER, str(port), str(tmp_path / "home"), "1", "0.2"], log)
    try:
        target = f"127.0.0.1:{port}"
        _wait_serving(proc, target, "", log)
        with grpc.insecure_channel(target) as ch:
            pending = registry_pb2_grpc.RegistryStub(ch).ListPools.future(registry_pb2.ListPoolsRequest(), timeout=30)
            time.sleep(0.3)  # the handler is running (and will never return)
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(1.2 + 10)
            took = time.monotonic() - sent
            assert pending.exception() is not None  # cancelled at the end of the grace period
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    assert rc == 0, output
    assert took <= 0.2 + 1 + 2, output
    assert "without waiting for: thread poe-rpc" in output, output


DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _shutdown_of(deployment: dict) -> tuple[float, float, float]:
    """(drain, grace, terminationGracePeriodSeconds) of a PoE Deployment."""
    spec = deployment["spec"]["template"]["spec"]
    (c,) = [c for c in spec["containers"] if c["args"][:1] == ["serve"]]
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    return float(env["POE_SHUTDOWN_DRAIN"]), float(env["POE_SHUTDOWN_GRACE"]), spec["terminationGracePeriodSeconds"]


def test_kubernetes_gives_the_shutdown_the_time_it_promises_to_take():
    """Chart (any drain and grace) and kustomize base: SIGKILL never comes before drain + grace + 2 s."""
    import helm_python

    values = {c: {"shutdown": {"drainSeconds": 3, "graceSeconds": 41}} for c in ("registry", "composer", "extractor")}
    for case in ({}, values):
        with helm_python.Chart.load(DEPLOY / "helm" / "poe") as chart:
            rendered = chart.render(case, name="poe", namespace="poe")
        docs = [d for path, text in rendered.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d]
        deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
        assert set(deployments) == {"poe-registry", "poe-composer", "poe-extractor"}
        for name, d in deployments.items():
            drain, grace, period = _shutdown_of(d)
            assert period >= drain + grace + 2, name
            if case:
                assert (drain, grace) == (3, 41), name
    base = [d for f in sorted((DEPLOY / "k8s" / "base").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())
            if d and d["kind"] == "Deployment"]
    assert len(base) == 3
    for d in base:
        drain, grace, period = _shutdown_of(d)
        assert period >= drain + grace + 2, d["metadata"]["name"]
