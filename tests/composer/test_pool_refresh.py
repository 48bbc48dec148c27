"""How the composer keeps its pool views current, on real servers (registry and composer on
separate gRPC servers, port 0): a request for a view it already has never waits for the
registry (the registry may even be down), while alias moves and deleted versions are still seen
about `alias_ttl` seconds later, by a check in the background."""

from __future__ import annotations

import json
import logging
import time

import pytest
from testenv import eventually, make_settings

from poe.client.composer import Composer
from poe.client.registry import RegistryClient
from poe.engine.errors import NotFound

TTL = 1.0  # POE_ALIAS_TTL for these tests


@pytest.fixture
def servers(tmp_path, host_factory):
    """start(services, **kwargs) -> (host, target); every server is stopped after the test."""
    settings = make_settings(tmp_path, default_pool="test-pool", alias_ttl=TTL)
    return lambda services, **kwargs: host_factory(settings, services, **kwargs)


def test_a_cached_view_is_served_while_the_registry_is_down(servers, pool_dir, caplog):
    caplog.set_level(logging.INFO, logger="poe_services.composer.engine")
    registry_host, registry_target = servers(("registry",), migrate=True)
    with RegistryClient(registry_target) as reg:
        reg.import_pool(pool_dir)
    composer_host, target = servers(("composer",), registry_target=registry_target, warm=False)
    engine = composer_host.runtimes["composer"].engine
    engine.warm("test-pool@1")  # every tensor in memory: nothing below needs a download

    registry_host.stop(0).wait(30)
    time.sleep(TTL * 1.5)  # past the TTL: the next request starts a check, which fails
    with Composer(target, retries=0) as composer:
        for classes in (["Sandal", "Bag"], ["Sneaker", "Coat"], ["Trouser"]):
            t0 = time.monotonic()
            result = composer.compose(classes, pool="test-pool@1")
            assert result.header.pool == "test-pool@1" and not result.header.cache_hit
            assert time.monotonic() - t0 < 5  # a registry call would be retried for longer, then fail
    # The check did run, in the background, and it failed without touching the requests.
    assert eventually(lambda: any("cannot be checked" in r.getMessage() and "test-pool@1" in r.getMessage()
                                  for r in caplog.records), 30)
    with Composer(target, retries=0) as composer:
        assert composer.compose(["Pullover"], pool="test-pool@1").header.pool == "test-pool@1"


def test_alias_moves_and_deleted_versions_are_seen_after_the_ttl(servers, pool_dir):
    _, registry_target = servers(("registry",), migrate=True)
    with RegistryClient(registry_target) as reg:
        pv1, _ = reg.import_pool(pool_dir, aliases=["stable"])
        composer_host, target = servers(("composer",), registry_target=registry_target, warm=False)
        with Composer(target, retries=0) as composer:
            def resolves(ref: str) -> str:
                return composer.describe(["Bag"], pool=ref).pool

            assert resolves("test-pool@stable") == "test-pool@1"
            reg.publish_pool("test-pool", "2", pv1.library.id, [e.id for e in pv1.experts],
                             info=json.loads(pv1.info_json))
            reg.set_alias("test-pool", "stable", "2")
            moved = time.monotonic()
            assert eventually(lambda: resolves("test-pool@stable") == "test-pool@2")
            # One TTL until a request starts the check, then the check itself (a GetPool).
            assert time.monotonic() - moved < TTL + 10

            assert resolves("test-pool@2") == "test-pool@2"  # now cached as an exact version too
            reg.set_alias("test-pool", "stable", "1")
            reg.delete_pool_version("test-pool", "2")

            def deleted() -> bool:
                try:
                    resolves("test-pool@2")
                except NotFound:
                    return True
                return False

            assert eventually(deleted)
            with pytest.raises(NotFound, match="test-pool@2|version"):
                composer.compose(["Bag"], pool="test-pool@2")
            assert eventually(lambda: resolves("test-pool@stable") == "test-pool@1")
            assert composer.compose(["Bag"], pool="test-pool@stable").header.pool == "test-pool@1"
