"""Backpressure on a real server hosting registry, composer and extractor on one port (as `poe up`),
with small budgets: streams that stay open (watches) and clients that stop reading take only what
their budgets allow, calls beyond a budget are refused at once with RESOURCE_EXHAUSTED, and a
write that waits for a client that does not read is cancelled. Everyone else is served meanwhile.

The stuck clients are real gRPC channels that announce a 1 KiB HTTP/2 window and never read, so
the server's writes of a composed model (160 KB here) wait for flow control.
"""

from __future__ import annotations

import dataclasses
import os
import time

import grpc
import pytest
from prometheus_client import REGISTRY
from testenv import auth_env

from poe.client.composer import Composer
from poe.client.registry import RegistryClient
from poe.engine import hierarchy
from poe.engine.config import Settings
from poe.engine.errors import InvalidArgument
from poe.engine.pool import save as save_pool
from poe.v1 import composer_pb2, extractor_pb2, extractor_pb2_grpc
from poe.v1 import composer_pb2_grpc as composer_grpc
from poe_services.host import create_server

CALLS, STREAMS, WRITE_TIMEOUT = 3, 3, 2.0
STUCK_OPTIONS = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]


def eventually(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def cancels(reason: str) -> float:
    labels = {"grpc_service": "poe.v1.Composer", "grpc_method": "ComposeModel", "reason": reason}
    return REGISTRY.get_sample_value("poe_grpc_stream_write_cancels_total", labels) or 0.0


@pytest.fixture(scope="module")
def server(tmp_path_factory, random_pool):
    root = tmp_path_factory.mktemp("backpressure")
    settings = Settings.from_env({**auth_env(), "POE_HOME": str(root / "home"), "POE_DEFAULT_POOL": "test-pool",
                                  "POE_MAX_CONCURRENT_CALLS": str(CALLS), "POE_MAX_CONCURRENT_STREAMS": str(STREAMS),
                                  "POE_STREAM_WRITE_TIMEOUT": str(WRITE_TIMEOUT),
                                  "POE_EXTRACTOR_HEALTH_INTERVAL": "0.1"})
    host = create_server("127.0.0.1:0", settings, migrate=True, warm=False)
    host.start()
    target = f"127.0.0.1:{host.port}"
    with RegistryClient(target) as registry:
        registry.import_pool(save_pool(random_pool, root / "pool" / "test-pool"))
    host.runtimes["composer"].engine.warm("test-pool")
    # Every admitted call has a thread, and gRPC itself refuses what lies beyond them.
    assert host.executor._max_workers == host.limits.threads
    yield host, target
    host.stop(None).wait(30)


def in_use(host, service: str) -> tuple[int, int]:
    calls, streams = host.limits.budgets(service)
    return calls.in_use, streams.in_use


def test_open_watches_take_only_the_extractors_streams(server):
    host, target = server
    with RegistryClient(target, token=os.environ["POE_SERVICE_TOKEN"]) as registry:
        job = registry.create_job({"purpose": "a job nobody runs: its watchers wait"}).id
    channel = grpc.insecure_channel(target)  # anonymous: a reader, on loopback
    stub = extractor_pb2_grpc.ExtractorStub(channel)
    request = extractor_pb2.WatchExtractionRequest(job_id=job)
    watches = [stub.WatchExtraction(request, timeout=60) for _ in range(STREAMS)]
    try:
        for watch in watches:
            assert next(watch).job.id == job  # open, and waiting for the next change
        assert in_use(host, "poe.v1.Extractor") == (0, STREAMS)

        # The watchers of a job that runs elsewhere share one registry read a poll (1 s), not one each.
        def job_reads() -> float:
            return REGISTRY.get_sample_value("grpc_server_handled_total", {
                "grpc_type": "unary", "grpc_service": "poe.v1.Registry", "grpc_method": "GetExtractionJob",
                "grpc_code": "OK"}) or 0.0

        before = job_reads()
        time.sleep(4.0)
        assert 1 <= job_reads() - before <= 6  # about 4; one read a second for each of 3 would be 12

        t0 = time.perf_counter()
        with pytest.raises(grpc.RpcError) as refused:
            next(stub.WatchExtraction(request, timeout=60))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "POE_MAX_CONCURRENT_STREAMS" in refused.value.details()
        assert time.perf_counter() - t0 < 2  # at once, not after a wait for a thread

        # Everything else is served as before.
        with Composer(target, retries=0, timeout=10) as composer, RegistryClient(target, retries=0) as registry:
            for _ in range(CALLS + 2):
                t0 = time.perf_counter()
                assert composer.compose(["Sandal", "Bag"]).header.classes == ("Sandal", "Bag")
                assert composer.describe(["Coat"]).classes == ("Coat",)
                assert registry.get_pool("test-pool").name == "test-pool"
                assert [p.name for p in registry.list_pools()] == ["test-pool"]
                assert time.perf_counter() - t0 < 2

        watches.pop().cancel()  # a place frees up
        assert eventually(lambda: in_use(host, "poe.v1.Extractor") == (0, STREAMS - 1))
        watches.append(stub.WatchExtraction(request, timeout=60))
        assert next(watches[-1]).job.id == job
    finally:
        for watch in watches:
            watch.cancel()
        channel.close()
    assert eventually(lambda: in_use(host, "poe.v1.Extractor") == (0, 0))


def test_clients_that_stop_reading_are_moved_aside_then_cancelled(server):
    host, target = server
    overload, timeout = cancels("overload"), cancels("timeout")
    stuck_channel = grpc.insecure_channel(target, options=STUCK_OPTIONS)
    stuck = composer_grpc.ComposerStub(stuck_channel)
    # Every class: the largest model (160 KB), far beyond the 1 KiB the stuck channel accepts.
    everything = composer_pb2.ComposeModelRequest(classes=list(hierarchy.builtin("fashion-mnist").classes))
    try:
        calls = [stuck.ComposeModel(everything, timeout=60) for _ in range(STREAMS)]  # never read
        # Each write waits for the client; after SLOW_WRITE the call counts as a stream.
        assert eventually(lambda: in_use(host, "poe.v1.Composer") == (0, STREAMS))
        started = time.monotonic()

        with Composer(target, retries=0, timeout=10) as composer:  # a client that reads is served
            t0 = time.perf_counter()
            assert composer.compose(["Trouser"]).header.classes == ("Trouser",)
            assert time.perf_counter() - t0 < 2

        # One more stuck reader finds every stream taken: the one stuck longest (past half the
        # timeout, here) is cancelled to make room for it.
        extra = stuck.ComposeModel(everything, timeout=60)
        assert eventually(lambda: cancels("overload") == overload + 1, 3)
        assert eventually(lambda: in_use(host, "poe.v1.Composer") == (0, STREAMS))

        # The others are cancelled once their write has waited POE_STREAM_WRITE_TIMEOUT.
        assert eventually(lambda: cancels("timeout") == timeout + STREAMS, WRITE_TIMEOUT + 3)
        assert time.monotonic() - started < WRITE_TIMEOUT + 2
        assert eventually(lambda: in_use(host, "poe.v1.Composer") == (0, 0))
        assert host.watchdog.in_flight == 0
        # A client that reads after all finds its call cancelled (it gets no status before it reads).
        for call in [*calls, extra]:
            with pytest.raises(grpc.RpcError) as ended:
                list(call)
            assert ended.value.code() == grpc.StatusCode.CANCELLED
    finally:
        stuck_channel.close()


@pytest.mark.parametrize("env, message", [
    ({"POE_MAX_CONCURRENT_CALLS": "0"}, "POE_MAX_CONCURRENT_CALLS: must be at least 1, got 0"),
    ({"POE_MAX_CONCURRENT_STREAMS": "-2"}, "POE_MAX_CONCURRENT_STREAMS: must be at least 1, got -2"),
    ({"POE_STREAM_WRITE_TIMEOUT": "0"}, "POE_STREAM_WRITE_TIMEOUT: must be > 0 seconds, got 0"),
    ({"POE_MAX_CONNECTION_AGE": "-1"}, "POE_MAX_CONNECTION_AGE: must be >= 0 seconds"),
    ({"POE_MAX_CONNECTION_AGE_GRACE": "-5"}, "POE_MAX_CONNECTION_AGE_GRACE: must be >= 0 seconds"),
    ({"POE_COMPOSER_WARM_FORMATS": "torchscript,gif"}, "POE_COMPOSER_WARM_FORMATS: expected some of"),
])
def test_bad_load_settings_are_refused_naming_the_variable(tmp_path, env, message):
    settings = Settings.from_env({**auth_env(), "POE_HOME": str(tmp_path / "home"), **env})
    with pytest.raises(InvalidArgument, match=message):
        create_server("127.0.0.1:0", settings, ("composer",), registry_target="127.0.0.1:1")


@pytest.mark.parametrize("env, message", [
    ({"POE_LB_POLICY": "random"}, "POE_LB_POLICY: expected pick_first or round_robin, got 'random'"),
    ({"POE_MAX_CONCURRENT_CALLS": "many"}, "POE_MAX_CONCURRENT_CALLS: expected a whole number"),
    ({"POE_STREAM_WRITE_TIMEOUT": "soon"}, "POE_STREAM_WRITE_TIMEOUT: expected a number of seconds"),
])
def test_malformed_load_settings_are_refused(env, message):
    with pytest.raises(InvalidArgument, match=message):
        Settings.from_env(env)


def test_settings_reach_the_server(tmp_path):
    settings = dataclasses.replace(Settings.from_env({**auth_env(), "POE_HOME": str(tmp_path / "home")}),
                                   max_concurrent_calls=5, max_concurrent_streams=7)
    host = create_server("127.0.0.1:0", settings, ("composer",), registry_target="127.0.0.1:1")
    try:
        assert [b.limit for b in host.limits.budgets("poe.v1.Composer")] == [5, 7]
        assert host.limits.budgets("poe.v1.Registry") is None  # not hosted here
        assert host.limits.threads == host.executor._max_workers
    finally:
        host.stop(None).wait(30)


class RecordedCall:
    """What the watchdog needs of a call's context: who it is, and a way to cancel it."""

    def __init__(self, name: str):
        self.name, self.cancelled = name, False

    def peer(self) -> str:
        return self.name

    def cancel(self) -> None:
        self.cancelled = True


def test_the_longest_stuck_stream_makes_room_for_a_slow_call():
    """The policy alone, on a clock of its own: with every stream taken, a call that turns slow
    cancels the stream that has waited longest (past evict_after), not itself; a fresh stream is
    never cancelled for it, and the slow call goes itself only once it has waited that long."""
    from poe_services.backpressure import Budget, Permit, WriteWatchdog

    watchdog = WriteWatchdog(timeout=30, slow=0.5, evict_after=5)
    calls, streams = Budget("s", "calls", 3, "C"), Budget("s", "streams", 2, "S")
    contexts = {n: RecordedCall(n) for n in ("old", "young", "slow")}
    writes = {}
    for name, started in (("old", 0.0), ("young", 4.0), ("slow", 6.0)):
        assert calls.try_enter()
        writes[name] = watchdog.arm(contexts[name], Permit(calls, streams), ("s", "m"))
        writes[name].started = started
    watchdog.check(4.6)  # old and young have been slow for 0.5 s: both become streams
    assert (calls.in_use, streams.in_use) == (1, 2) and not any(c.cancelled for c in contexts.values())
    watchdog.check(6.6)  # slow finds no stream free: old (6.6 s) goes, young (2.6 s) stays
    assert [n for n, c in contexts.items() if c.cancelled] == ["old"]
    writes["old"].permit.release()  # what the old call's thread does once cancelled
    watchdog.check(6.7)
    assert (calls.in_use, streams.in_use) == (0, 2) and not contexts["slow"].cancelled

    # With no stream stuck long enough, a slow call waits, then goes itself.
    watchdog = WriteWatchdog(timeout=30, slow=0.5, evict_after=5)
    calls, streams = Budget("s", "calls", 1, "C"), Budget("s", "streams", 1, "S")
    assert streams.try_enter()  # a stream of someone else, not stuck in a write
    assert calls.try_enter()
    alone = RecordedCall("alone")
    watchdog.arm(alone, Permit(calls, streams), ("s", "m")).started = 0.0
    watchdog.check(4.9)
    assert not alone.cancelled and calls.in_use == 1
    watchdog.check(5.0)
    assert alone.cancelled and watchdog.in_flight == 0
