"""A real registry + composer on one gRPC server (port 0), holding a small pool with random weights."""

from __future__ import annotations

import dataclasses

import pytest
from testenv import auth_env

from poe.client.registry import RegistryClient
from poe.engine.config import Settings
from poe.engine.pool import save as save_pool


def make_settings(tmp_path, **overrides) -> Settings:
    base = Settings.from_env({**auth_env(), "POE_HOME": str(tmp_path / "home")})
    return dataclasses.replace(base, **overrides)


@pytest.fixture(scope="module")
def pool_dir(random_pool, tmp_path_factory):
    return save_pool(random_pool, tmp_path_factory.mktemp("pool") / "test-pool")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, pool_dir):
    """(host, target): registry + composer serving the test pool; the composer is warm."""
    from poe_services.host import create_server

    tmp = tmp_path_factory.mktemp("stack")
    settings = make_settings(tmp, default_pool="test-pool")
    host = create_server("127.0.0.1:0", settings, ("registry", "composer"), migrate=True, warm=False)
    host.start()
    target = f"127.0.0.1:{host.port}"
    with RegistryClient(target) as reg:
        reg.import_pool(pool_dir, aliases=["stable"])
    composer = host.runtimes["composer"]
    composer.engine.warm()
    assert composer.ready.wait(10)
    yield host, target
    host.stop(1).wait()
