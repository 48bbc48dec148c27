"""grpc.health.v1 follows the real dependencies: the database and the blob store go down and come back
(a TCP proxy in front of the real PostgreSQL / S3 server cuts every connection)."""

from __future__ import annotations

from urllib.parse import urlparse

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from poe.client.registry import RegistryClient
from poe.engine import hierarchy as hierarchy_mod
from poe.engine.architectures import placeholder_weights
from poe.engine.errors import NotFound, Unavailable
from poe_services.host import create_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Running:
    def __init__(self, settings):
        self.host = create_server("127.0.0.1:0", settings, ("registry",))
        self.host.start()
        self.client = RegistryClient(f"127.0.0.1:{self.host.port}", timeout=10)
        self.health = health_pb2_grpc.HealthStub(self.client.channel)

    def status(self, service: str = "poe.v1.Registry"):
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def close(self):
        self.client.close()
        self.host.stop(None).wait(30)


@pytest.fixture
def running():
    started = []

    def start(settings) -> Running:
        started.append(Running(settings))
        return started[-1]

    yield start
    for r in started:
        r.close()


@pytest.mark.postgres
def test_not_serving_while_the_database_is_down(pg_url, tmp_path, tcp_proxy, running, poll, make_settings):
    url = make_url(pg_url)
    proxy = tcp_proxy(url.host, url.port)
    via_proxy = url.set(port=proxy.port).render_as_string(hide_password=False)
    reg = running(make_settings(tmp_path, via_proxy, f"file://{tmp_path / 'blobs'}"))
    assert reg.status() == SERVING and reg.status("") == SERVING
    reg.client.register_hierarchy(hierarchy_mod.builtin("fashion-mnist"))

    proxy.cut()
    assert poll(lambda: reg.status() == NOT_SERVING)
    assert reg.status("") == NOT_SERVING
    with pytest.raises(Unavailable, match="database"):
        reg.client.get_pool("fm")
    with pytest.raises(Unavailable):
        reg.client.register_oracle("o", "fashion-mnist", {}, placeholder_weights({}))
    assert list(reg.host.runtimes["registry"].registry.blobs.list()) == []  # the failed upload left no blob

    proxy.restore()
    assert poll(lambda: reg.status() == SERVING)
    with pytest.raises(NotFound):
        reg.client.get_pool("fm")
    assert reg.client.get_hierarchy("fashion-mnist").version == 1


@pytest.mark.postgres
def test_starts_not_serving_when_the_database_is_down(pg_url, tmp_path, tcp_proxy, running, poll, make_settings):
    url = make_url(pg_url)
    proxy = tcp_proxy(url.host, url.port)
    proxy.cut()
    via_proxy = url.set(port=proxy.port).render_as_string(hide_password=False)
    reg = running(make_settings(tmp_path, via_proxy, f"file://{tmp_path / 'blobs'}"))
    assert reg.status() == NOT_SERVING
    proxy.restore()
    assert poll(lambda: reg.status() == SERVING)  # schema checked once the database answers


def test_not_serving_while_the_blob_directory_is_gone(sqlite_url, tmp_path, running, poll, make_settings):
    reg = running(make_settings(tmp_path, sqlite_url, f"file://{tmp_path / 'blobs'}"))
    assert reg.status() == SERVING
    (tmp_path / "blobs").rename(tmp_path / "unmounted")
    assert poll(lambda: reg.status() == NOT_SERVING)
    (tmp_path / "unmounted").rename(tmp_path / "blobs")
    assert poll(lambda: reg.status() == SERVING)


def test_not_serving_while_s3_is_down(sqlite_url, tmp_path, moto_endpoint, bucket, tcp_proxy, running, poll,
                                      make_settings):
    target = urlparse(moto_endpoint)
    proxy = tcp_proxy(target.hostname, target.port)
    cfg = make_settings(tmp_path, sqlite_url, f"s3://{bucket}", POE_S3_ENDPOINT=f"http://127.0.0.1:{proxy.port}")
    reg = running(cfg)
    assert reg.status() == SERVING
    reg.client.register_hierarchy(hierarchy_mod.builtin("fashion-mnist"))
    proxy.cut()
    assert poll(lambda: reg.status() == NOT_SERVING)
    with pytest.raises(Unavailable, match="blob store"):
        reg.client.register_oracle("o", "fashion-mnist", {}, placeholder_weights({}))
    proxy.restore()
    assert poll(lambda: reg.status() == SERVING)
    oracle, created = reg.client.register_oracle("o", "fashion-mnist", {}, placeholder_weights({}))
    assert created and reg.client.download(oracle.blob.sha256) == placeholder_weights({})
