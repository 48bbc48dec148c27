"""A pool published on a server that hosts the composer too (`poe up`) is warm when the publication
answers, without waiting for the composer's pool poll (set to an hour here): the README's order
(`poe up`, `poe registry import`, compose) never makes a request wait for TorchScript. A composer
on another server learns of it at its poll, as before; a failing listener never fails a publication."""

from __future__ import annotations

import logging
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from testenv import eventually, make_settings

from poe.client.composer import Composer
from poe.client.registry import RegistryClient

HOUR = 3600.0  # POE_COMPOSER_POOL_POLL: no poll happens during these tests


def composer_serving(target: str) -> bool:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="poe.v1.Composer"),
                                                    timeout=5).status == health_pb2.HealthCheckResponse.SERVING


def template_misses() -> float:
    return REGISTRY.get_sample_value("poe_compose_template_misses_total", {"format": "torchscript"}) or 0.0


def test_import_into_poe_up_returns_with_the_pool_warm(tmp_path, host_factory, pool_dir, second_pool_dir):
    settings = make_settings(tmp_path, default_pool="test-pool", composer_pool_poll=HOUR)
    host, target = host_factory(settings, ("registry", "composer"), migrate=True)
    engine = host.runtimes["composer"].engine
    assert eventually(lambda: composer_serving(target), 20)  # its first look is done: no pool yet

    with RegistryClient(target) as reg, Composer(target) as composer:
        t0 = time.monotonic()
        reg.import_pool(pool_dir)
        assert eventually(lambda: engine.is_warm("test-pool@1"), 1.0)
        assert time.monotonic() - t0 < 30
        before = (engine.scripts.scripted, engine.scripts.templated, template_misses())
        for classes in (["Sandal", "Bag"], ["Coat", "Trouser", "Sneaker"], ["T-shirt/top"]):
            assert not composer.compose(classes).header.cache_hit
        assert (engine.scripts.scripted, engine.scripts.templated, template_misses()) == before

        reg.import_pool(second_pool_dir)  # not the default pool: warmed because `latest` moved to it
        assert eventually(lambda: engine.is_warm("second-pool@1"), 1.0)
        before = (engine.scripts.scripted, engine.scripts.templated, template_misses())
        assert composer.compose(["Coat", "Trouser"], pool="second-pool").header.pool == "second-pool@1"
        assert (engine.scripts.scripted, engine.scripts.templated, template_misses()) == before


def test_a_composer_on_another_server_waits_for_its_poll(tmp_path, host_factory, pool_dir, caplog):
    registry_host, registry_target = host_factory(make_settings(tmp_path / "r"), ("registry",), migrate=True)

    def broken_listener() -> None:
        raise RuntimeError("listener bug")

    registry_host.runtimes["registry"].on_pools_changed(broken_listener)
    settings = make_settings(tmp_path / "c", default_pool="test-pool", composer_pool_poll=HOUR)
    host, target = host_factory(settings, ("composer",), registry_target=registry_target)
    runtime = host.runtimes["composer"]
    assert eventually(lambda: composer_serving(target), 20)

    with caplog.at_level(logging.ERROR, logger="poe_services.registry.runtime"), RegistryClient(registry_target) as reg:
        pv, created = reg.import_pool(pool_dir)  # the listener's failure does not fail the publication
    assert created and pv.name == "test-pool"
    assert "a pools-changed listener failed" in caplog.text
    time.sleep(1.0)
    assert not runtime.engine.is_warm("test-pool@1")  # nothing told it: it would look in an hour
    assert runtime.look_now(wait=30)  # what the registry calls when it runs in the composer's process
    assert runtime.engine.is_warm("test-pool@1")
