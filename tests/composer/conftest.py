"""A real registry + composer on one gRPC server (port 0), holding a small pool with random weights."""

from __future__ import annotations

import dataclasses

import pytest
from testenv import make_settings

from poe.client.registry import RegistryClient
from poe.engine.pool import save as save_pool


@pytest.fixture(scope="module")
def pool_dir(random_pool, tmp_path_factory):
    return save_pool(random_pool, tmp_path_factory.mktemp("pool") / "test-pool")


@pytest.fixture(scope="module")
def second_pool_dir(random_pool, tmp_path_factory):
    """Another pool, with narrower experts: its structures and tensor layouts are its own."""
    from poe.engine.nets import make_expert

    experts = {}
    for task, e in random_pool.experts.items():
        config = dataclasses.replace(e.config, width=4)
        experts[task] = dataclasses.replace(e, config=config, state=make_expert(config).state_dict())
    pool = dataclasses.replace(random_pool, name="second-pool", experts=experts)
    return save_pool(pool, tmp_path_factory.mktemp("pool") / "second-pool")


@pytest.fixture
def host_factory():
    """make(settings, services, **create_server's kwargs) -> (host, target) of a started server;
    every server is stopped after the test."""
    from poe_services.host import create_server

    hosts = []

    def make(settings, services, **kwargs):
        host = create_server("127.0.0.1:0", settings, services, **kwargs)
        host.start()
        hosts.append(host)
        return host, f"127.0.0.1:{host.port}"

    yield make
    for host in reversed(hosts):
        host.stop(0).wait(30)


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
