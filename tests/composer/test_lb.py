"""Load balancing over real composers (port 0, one registry behind them): a client with the
round_robin policy sends its calls to every address of its target, and a server that closes
connections after POE_MAX_CONNECTION_AGE makes even a pick_first client connect again (which is
how clients of a Deployment that an autoscaler grows find the new pods).

A name that resolves to several loopback addresses is not at hand, so the target lists both
addresses (`ipv4:127.0.0.1:P1,127.0.0.1:P2`): the channel balances over them as over the
addresses of a headless Service's DNS name."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from testenv import auth_env

from poe.client.composer import Composer
from poe.client.registry import RegistryClient
from poe.engine.config import Settings
from poe.engine.errors import InvalidArgument
from poe_services.host import create_server


@pytest.fixture(scope="module")
def composers(tmp_path_factory, pool_dir):
    """(first, second) composer hosts on their own ports, both reading from one registry; the
    second closes every connection after half a second."""
    root = tmp_path_factory.mktemp("lb")
    registry = create_server("127.0.0.1:0", Settings.from_env({**auth_env(), "POE_HOME": str(root / "registry")}),
                             ("registry",), migrate=True)
    registry.start()
    registry_target = f"127.0.0.1:{registry.port}"
    with RegistryClient(registry_target) as client:
        client.import_pool(pool_dir)
    hosts = []
    short_age = {"POE_MAX_CONNECTION_AGE": "0.5", "POE_MAX_CONNECTION_AGE_GRACE": "1"}
    for name, env in (("first", {}), ("second", short_age)):
        settings = Settings.from_env({**auth_env(), "POE_HOME": str(root / name), "POE_DEFAULT_POOL": "test-pool",
                                      **env})
        host = create_server("127.0.0.1:0", settings, ("composer",), registry_target=registry_target, warm=False)
        host.start()
        hosts.append(host)
    yield hosts
    for host in [*hosts, registry]:
        host.stop(None).wait(30)


def misses(target: str, lb_policy: str, classes: list[str], calls: int = 20) -> int:
    """How many of `calls` identical compositions were built rather than found in a composer's
    memory: one per composer that received any of them."""
    with Composer(target, lb_policy=lb_policy, retries=0, timeout=10) as composer:
        composer.wait_ready(10)
        return sum(not composer.compose(classes).header.cache_hit for _ in range(calls))


def test_round_robin_spreads_calls_over_every_address(composers):
    first, second = composers
    both = f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}"
    assert misses(both, "round_robin", ["Sandal", "Sneaker"]) == 2  # each composer built it once
    assert misses(both, "pick_first", ["Coat", "Shirt"]) == 1  # one connection, one composer


def test_the_policy_comes_from_the_settings(composers, monkeypatch):
    first, second = composers
    monkeypatch.setenv("POE_LB_POLICY", "round_robin")
    with Composer(f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}", retries=0) as composer:
        assert sum(not composer.compose(["Bag", "Trouser"]).header.cache_hit for _ in range(20)) == 2
    with pytest.raises(InvalidArgument, match="lb_policy: expected one of pick_first, round_robin, got 'random'"):
        Composer(f"127.0.0.1:{first.port}", lb_policy="random")


def ready_transitions(target: str, seconds: float) -> tuple[int, int]:
    """(times the channel became READY, failed calls) while calling for `seconds`."""
    became_ready = []
    failures = 0
    with Composer(target, retries=0, timeout=5) as composer:
        lock = threading.Lock()

        def on_state(state: grpc.ChannelConnectivity) -> None:
            with lock:
                if state == grpc.ChannelConnectivity.READY:
                    became_ready.append(time.monotonic())

        composer.channel.subscribe(on_state, try_to_connect=True)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                composer.describe(["Pullover"])
            except Exception:  # noqa: BLE001 - counted: a closed connection must cost no call
                failures += 1
            time.sleep(0.05)
        composer.channel.unsubscribe(on_state)
    return len(became_ready), failures


def test_connections_are_closed_after_their_age_and_clients_connect_again(composers):
    first, second = composers
    reconnected, failures = ready_transitions(f"127.0.0.1:{second.port}", 2.5)
    assert reconnected >= 3 and failures == 0  # a new connection about every half second, no call lost
    kept, failures = ready_transitions(f"127.0.0.1:{first.port}", 1.0)  # the default age: 5 minutes
    assert kept == 1 and failures == 0
