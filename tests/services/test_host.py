"""poe_services.host on real servers (port 0): overall health, liveness, shutdown, interceptors,
reflection, whatever combination of services is hosted."""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from poe.client.registry import RegistryClient
from poe.engine.errors import InvalidArgument, NotFound, Unavailable
from poe_services.host import LIVENESS, ServerHealth, create_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def statuses(channel: grpc.Channel, *names: str) -> dict[str, int]:
    stub = health_pb2_grpc.HealthStub(channel)
    return {n: stub.Check(health_pb2.HealthCheckRequest(service=n), timeout=5).status for n in names}


@pytest.fixture
def started():
    """started(settings, services, **create_server kwargs) -> (host, channel); stopped afterwards."""
    running = []

    def start(settings, services, **kwargs):
        host = create_server("127.0.0.1:0", settings, services, **kwargs)
        host.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{host.port}")
        running.append((host, channel))
        return host, channel

    yield start
    for host, channel in running:
        channel.close()
        host.stop(None).wait(30)


def test_overall_health_follows_every_hosted_service(settings, started, poll):
    host, ch = started(settings, ("registry", "composer"), migrate=True, warm=False)
    names = ("", "poe.v1.Registry", "poe.v1.Composer", LIVENESS)
    assert poll(lambda: statuses(ch, *names) == dict.fromkeys(names, SERVING))

    blobs = settings.home / "blobs"
    blobs.rename(settings.home / "unmounted")  # the registry's blob store goes away
    assert poll(lambda: statuses(ch, "poe.v1.Registry")["poe.v1.Registry"] == NOT_SERVING)
    # One service down is enough for the whole server; the process is still alive.
    assert statuses(ch, *names) == {"": NOT_SERVING, "poe.v1.Registry": NOT_SERVING, "poe.v1.Composer": SERVING,
                                    LIVENESS: SERVING}
    (settings.home / "unmounted").rename(blobs)
    assert poll(lambda: statuses(ch, *names) == dict.fromkeys(names, SERVING))


@pytest.mark.postgres
def test_registry_with_its_database_unreachable(closable_database, tmp_path, make_settings, started, poll):
    settings = make_settings(tmp_path, POE_DATABASE_URL=closable_database.url)
    host, ch = started(settings, ("registry",))
    names = ("", "poe.v1.Registry", LIVENESS)
    assert poll(lambda: statuses(ch, *names) == dict.fromkeys(names, SERVING))

    closable_database.refuse()
    assert poll(lambda: statuses(ch, "")[""] == NOT_SERVING)
    assert statuses(ch, *names) == {"": NOT_SERVING, "poe.v1.Registry": NOT_SERVING, LIVENESS: SERVING}
    with RegistryClient(f"127.0.0.1:{host.port}", timeout=10) as client, pytest.raises(Unavailable, match="database"):
        client.get_pool("fm")

    closable_database.accept()
    assert poll(lambda: statuses(ch, *names) == dict.fromkeys(names, SERVING))
    with RegistryClient(f"127.0.0.1:{host.port}", timeout=10) as client, pytest.raises(NotFound):
        client.get_pool("fm")


def test_stop_turns_every_name_not_serving_before_the_port_closes(settings, poll):
    host = create_server("127.0.0.1:0", settings, ("registry", "composer"), migrate=True, warm=False)
    host.start()
    names = ("", "poe.v1.Registry", "poe.v1.Composer", LIVENESS)
    with grpc.insecure_channel(f"127.0.0.1:{host.port}") as ch:
        assert poll(lambda: statuses(ch, *names) == dict.fromkeys(names, SERVING))
        stub = health_pb2_grpc.HealthStub(ch)
        watches = {n: stub.Watch(health_pb2.HealthCheckRequest(service=n), timeout=30) for n in names}
        assert {n: next(w).status for n, w in watches.items()} == dict.fromkeys(names, SERVING)

        closed = host.stop(grace=30)
        # The streams opened before stop() are still served: each hears NOT_SERVING.
        assert {n: next(w).status for n, w in watches.items()} == dict.fromkeys(names, NOT_SERVING)
        assert not closed.is_set()  # the in-flight Watch calls hold the server open
        for w in watches.values():
            w.cancel()
        assert closed.wait(30)
        assert host.stop() is closed
        assert host.runtimes["registry"].closed and host.runtimes["composer"].closed
        with pytest.raises(grpc.RpcError) as info:
            statuses(ch, "")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # the port is closed


def test_unknown_service_names_are_rejected(settings):
    with pytest.raises(InvalidArgument, match="services: expected some of registry, composer, extractor, got billing"):
        create_server("127.0.0.1:0", settings, ("registry", "billing"))
    with pytest.raises(InvalidArgument, match="got none") as info:
        create_server("127.0.0.1:0", settings, ())
    assert info.value.field == "services"


def _handled(method: str, code: str) -> float:
    labels = {"grpc_type": "unary", "grpc_service": "poe.v1.Registry", "grpc_method": method, "grpc_code": code}
    return REGISTRY.get_sample_value("grpc_server_handled_total", labels) or 0.0


def test_standalone_registry_counts_its_rpcs(settings, started, poll):
    host, ch = started(settings, ("registry",), migrate=True)
    assert poll(lambda: statuses(ch, "")[""] == SERVING)
    ok, missing = _handled("ListPools", "OK"), _handled("GetPool", "NOT_FOUND")
    list_ok = {"grpc_type": "unary", "grpc_service": "poe.v1.Registry", "grpc_method": "ListPools", "grpc_code": "OK"}
    latency = REGISTRY.get_sample_value("grpc_server_handling_seconds_count", list_ok) or 0.0
    with RegistryClient(f"127.0.0.1:{host.port}", timeout=10) as client:
        assert list(client.list_pools()) == []
        with pytest.raises(NotFound):
            client.get_pool("nope")
    # The metrics interceptor sits outside the error mapping: it records the code the client got.
    assert _handled("ListPools", "OK") == ok + 1
    assert _handled("GetPool", "NOT_FOUND") == missing + 1
    assert REGISTRY.get_sample_value("grpc_server_handling_seconds_count", list_ok) == latency + 1


def test_reflection_lists_the_hosted_services(settings, started, poll):
    host, ch = started(settings, ("extractor", "registry"), migrate=True)  # any order: the registry comes first
    assert list(host.runtimes) == ["registry", "extractor"]
    assert poll(lambda: statuses(ch, "", "poe.v1.Extractor") == {"": SERVING, "poe.v1.Extractor": SERVING})
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    resp = next(stub.ServerReflectionInfo(iter([request]), timeout=10))
    assert {s.name for s in resp.list_services_response.service} == {
        "poe.v1.Registry", "poe.v1.Extractor", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


def test_server_health_recomputes_overall_on_each_set():
    servicer = health.HealthServicer()
    reporter = ServerHealth(servicer, ("a.A", "b.B"))

    def check(name: str) -> int:
        return servicer.Check(health_pb2.HealthCheckRequest(service=name), None).status

    assert (check(""), check("a.A"), check("b.B"), check(LIVENESS)) == (NOT_SERVING, NOT_SERVING, NOT_SERVING, SERVING)
    reporter.set("a.A", SERVING)
    assert check("") == NOT_SERVING  # b.B has not reported yet
    reporter.set("b.B", SERVING)
    assert check("") == SERVING
    reporter.set("a.A", NOT_SERVING)
    assert check("") == NOT_SERVING
    reporter.set("a.A", SERVING)
    assert check("") == SERVING
    for owned_by_the_host in ("", LIVENESS):
        with pytest.raises(ValueError, match="belongs to the host"):
            reporter.set(owned_by_the_host, NOT_SERVING)
    reporter.enter_graceful_shutdown()
    assert {check(n) for n in ("", "a.A", "b.B", LIVENESS)} == {NOT_SERVING}
    reporter.set("a.A", SERVING)  # ignored from now on
    assert (check(""), check("a.A")) == (NOT_SERVING, NOT_SERVING)


def test_concurrent_sets_leave_a_consistent_overall():
    servicer = health.HealthServicer()
    names = [f"s{i}.S" for i in range(8)]
    reporter = ServerHealth(servicer, names)

    def flap(name: str) -> None:
        for status in (SERVING, NOT_SERVING) * 50 + (SERVING,):  # ends SERVING
            reporter.set(name, status)

    threads = [threading.Thread(target=flap, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert servicer.Check(health_pb2.HealthCheckRequest(service=""), None).status == SERVING
