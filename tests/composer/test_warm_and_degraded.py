"""Warm-up and readiness of a composer on real servers (port 0, file blobs under tmp_path): pools
imported after it started (the README's order) and published later are warmed; a corrupt expert
blob degrades its pool version only, and importing the pool again repairs it."""

from __future__ import annotations

import logging
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from testenv import eventually, make_settings

from poe.client.composer import Composer
from poe.client.registry import RegistryClient
from poe.engine.errors import DataLoss, InvalidArgument
from poe_services.host import create_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
POLL = 0.2  # POE_COMPOSER_POOL_POLL for these tests


def composer_health(target: str) -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="poe.v1.Composer"), timeout=5).status


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_pools_imported_after_start_are_warmed(tmp_path, host_factory, pool_dir, second_pool_dir):
    """`poe up`, then `poe registry import`: the composer warms the pool without a request, and
    every pool published later too; a request then finds its archive template."""
    settings = make_settings(tmp_path, default_pool="test-pool", composer_pool_poll=POLL)
    host, target = host_factory(settings, ("registry", "composer"), migrate=True)
    engine = host.runtimes["composer"].engine
    assert eventually(lambda: composer_health(target) == SERVING)  # the registry answered: no pool yet
    assert engine.scripts.templated == 0

    with RegistryClient(target) as reg, Composer(target) as composer:
        reg.import_pool(pool_dir)
        assert eventually(lambda: engine.scripts.templated > 0)  # without a request
        assert eventually(lambda: engine.is_warm("test-pool@1"), 30)
        before = (engine.scripts.scripted, engine.scripts.templated)
        result = composer.compose(["Sandal", "Bag"])
        assert result.header.pool == "test-pool@1" and not result.header.degraded
        assert (engine.scripts.scripted, engine.scripts.templated) == before  # no torch.jit on the request

        reg.import_pool(second_pool_dir)
        assert eventually(lambda: engine.scripts.templated > before[1])
        assert eventually(lambda: engine.is_warm("second-pool@1"), 30)
        before = (engine.scripts.scripted, engine.scripts.templated)
        result = composer.compose(["Coat", "Trouser"], pool="second-pool")
        assert result.header.pool == "second-pool@1"
        assert (engine.scripts.scripted, engine.scripts.templated) == before


def test_corrupt_expert_blob_degrades_its_pool_version_only(tmp_path, host_factory, pool_dir, caplog,
                                                            assert_fsck_clean):
    """A new composer meets a flipped byte in one expert's blob: it still becomes SERVING, says
    the pool is degraded, composes what does not need that expert, refuses what does with
    DATA_LOSS, counts and logs it; importing the pool again repairs it."""
    caplog.set_level(logging.ERROR, logger="poe_services.composer.engine")
    settings = make_settings(tmp_path, default_pool="test-pool", composer_pool_poll=POLL)
    _, registry_target = host_factory(settings, ("registry",), migrate=True)
    with RegistryClient(registry_target) as reg:
        pv, _ = reg.import_pool(pool_dir)
    sha = next(e.blob.sha256 for e in pv.experts if e.task == "footwear")
    blob = settings.home / "blobs" / "sha256" / sha[:2] / sha
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    errors_before = sample("poe_compose_blob_errors_total", kind="data_loss")
    degraded_before = sample("poe_compose_degraded_pools")

    composer_host, target = host_factory(settings, ("composer",), registry_target=registry_target)
    assert eventually(lambda: composer_health(target) == SERVING)
    with Composer(target, retries=0) as composer:
        described = composer.describe(["Sandal"])
        assert described.degraded and described.degraded_tasks == ("footwear",)
        healthy = composer.compose(["Bag", "Coat"])
        assert healthy.header.tasks == ("warm-layers", "bags") and healthy.header.degraded
        with pytest.raises(DataLoss, match="footwear") as err:
            composer.compose(["Sandal", "Bag"])
        assert sha in str(err.value)
        assert composer_health(target) == SERVING
        assert sample("poe_compose_blob_errors_total", kind="data_loss") >= errors_before + 2  # warm-up, request
        assert sample("poe_compose_degraded_pools") == degraded_before + 1
        logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any(sha in m and "test-pool@1" in m for m in logged), logged

        with RegistryClient(registry_target) as reg:
            reg.import_pool(pool_dir)  # registers the same content again: the stored copy is rewritten
        # The warm-up tries degraded versions again on its own: no request needed.
        assert eventually(lambda: not composer.describe(["Sandal"]).degraded)
        repaired = composer.compose(["Sandal", "Bag"])
        assert repaired.header.tasks == ("footwear", "bags") and repaired.header.degraded_tasks == ()
    assert sample("poe_compose_degraded_pools") == degraded_before
    # Once the two compositions' recordings are sent nothing is in flight: the pool's 7 blobs and
    # the 2 recorded files are whole again.
    assert composer_host.runtimes["composer"].flush(10)
    assert assert_fsck_clean(settings).blobs_checked == 9


def test_ready_after_the_timeout_while_the_default_pool_still_warms(tmp_path, host_factory, pool_dir):
    settings = make_settings(tmp_path, default_pool="test-pool", composer_pool_poll=POLL, composer_ready_timeout=3)
    _, registry_target = host_factory(settings, ("registry",), migrate=True)
    with RegistryClient(registry_target) as reg:
        reg.import_pool(pool_dir)
    host = create_server("127.0.0.1:0", settings, ("composer",), registry_target=registry_target)
    engine = host.runtimes["composer"].engine
    release, warming = threading.Event(), threading.Event()
    real_warm = engine.warm_view

    def slow_warm(view, **kwargs):  # a default pool that takes long to warm
        warming.set()
        release.wait(30)
        return real_warm(view, **kwargs)

    engine.warm_view = slow_warm
    host.start()
    target = f"127.0.0.1:{host.port}"
    try:
        assert warming.wait(20)
        assert composer_health(target) == NOT_SERVING
        assert eventually(lambda: composer_health(target) == SERVING, 10)
        assert not engine.is_warm("test-pool@1")
        release.set()
        assert eventually(lambda: engine.is_warm("test-pool@1"))
    finally:
        release.set()
        host.stop(0).wait(30)


@pytest.mark.parametrize("overrides, message", [
    ({"composer_pool_poll": 0}, "POE_COMPOSER_POOL_POLL: must be > 0"),
    ({"composer_ready_timeout": -1}, "POE_COMPOSER_READY_TIMEOUT: must be >= 0"),
])
def test_bad_warm_up_settings_are_refused(tmp_path, overrides, message):
    with pytest.raises(InvalidArgument, match=message):
        create_server("127.0.0.1:0", make_settings(tmp_path, **overrides), ("composer",))
