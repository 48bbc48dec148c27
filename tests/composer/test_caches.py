"""The composer's cache building blocks: ByteLRU (byte bound, LRU order) and SingleFlight."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from poe_services.composer.caches import ByteLRU, SingleFlight


def test_byte_lru_evicts_least_recently_used_to_stay_within_its_bound():
    sizes: list[int] = []
    lru: ByteLRU[str] = ByteLRU(100, on_size=sizes.append)
    lru.put("a", "A", 40)
    lru.put("b", "B", 40)
    assert lru.get("a") == "A"  # "a" is now the most recently used
    lru.put("c", "C", 40)  # 120 > 100: the least recently used ("b") goes
    assert (lru.get("b"), lru.get("a"), lru.get("c")) == (None, "A", "C")
    assert (lru.size_bytes, len(lru)) == (80, 2)
    lru.put("d", "D", 100)  # needs everything: both others go, oldest first
    assert (lru.get("a"), lru.get("c"), lru.get("d")) == (None, None, "D")
    assert (lru.size_bytes, len(lru)) == (100, 1)
    assert sizes == [40, 80, 80, 100]


def test_byte_lru_replacing_a_key_counts_only_its_new_size():
    lru: ByteLRU[str] = ByteLRU(100)
    lru.put("a", "small", 10)
    lru.put("b", "B", 50)
    lru.put("a", "large", 50)
    assert (lru.get("a"), lru.get("b"), lru.size_bytes) == ("large", "B", 100)


def test_byte_lru_does_not_store_a_value_larger_than_its_bound():
    lru: ByteLRU[str] = ByteLRU(100)
    lru.put("a", "A", 60)
    lru.put("huge", "H", 101)
    assert (lru.get("huge"), lru.get("a"), lru.size_bytes) == (None, "A", 60)  # nothing evicted for it
    lru.clear()
    assert (lru.get("a"), lru.size_bytes, len(lru)) == (None, 0, 0)


def test_single_flight_runs_once_for_concurrent_callers_of_one_key():
    flight = SingleFlight()
    callers = 8
    inside = threading.Event()
    release = threading.Event()
    runs = []

    def slow() -> str:
        runs.append(1)
        inside.set()
        assert release.wait(10)
        return "result"

    with ThreadPoolExecutor(callers) as pool:
        leader = pool.submit(flight.do, "key", slow)
        assert inside.wait(10)
        followers = [pool.submit(flight.do, "key", slow) for _ in range(callers - 1)]
        # Wait until every follower waits on the leader's future, then let the leader finish.
        assert _wait_for(lambda: _waiters(flight, "key") == callers - 1)
        release.set()
        results = [leader.result(10), *(f.result(10) for f in followers)]
    assert len(runs) == 1
    assert results[0] == ("result", False)
    assert results[1:] == [("result", True)] * (callers - 1)


def test_single_flight_exception_reaches_every_waiter_and_is_not_cached():
    flight = SingleFlight()
    inside = threading.Event()
    release = threading.Event()
    calls = []

    def failing() -> str:
        calls.append(1)
        inside.set()
        assert release.wait(10)
        raise RuntimeError("registry down")

    with ThreadPoolExecutor(4) as pool:
        leader = pool.submit(flight.do, "key", failing)
        assert inside.wait(10)
        followers = [pool.submit(flight.do, "key", failing) for _ in range(3)]
        assert _wait_for(lambda: _waiters(flight, "key") == 3)
        release.set()
        for fut in (leader, *followers):
            with pytest.raises(RuntimeError, match="registry down"):
                fut.result(10)
    assert len(calls) == 1
    # The failure is not remembered: the next call runs the function again.
    assert flight.do("key", lambda: "recovered") == ("recovered", False)


def test_single_flight_different_keys_run_independently():
    flight = SingleFlight()
    assert flight.do("a", lambda: 1) == (1, False)
    assert flight.do("b", lambda: 2) == (2, False)
    assert flight.do("a", lambda: 3) == (3, False)  # a finished run is not a cache


def _waiters(flight: SingleFlight, key) -> int:
    """Threads blocked in Future.result() on the running call of `key`. Reads CPython internals
    (the future's Condition keeps one lock per waiting thread) so that the tests need no sleeps:
    a follower that arrived after the leader finished would run the function a second time."""
    with flight._lock:
        fut = flight._running.get(key)
    if fut is None:
        return 0
    return len(fut._condition._waiters)


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()
