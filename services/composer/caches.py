"""Small thread-safe building blocks of the composer: a byte-bounded LRU and single-flight."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

V = TypeVar("V")


class ByteLRU(Generic[V]):
    """LRU map bounded by the sum of its values' sizes in bytes.

    A value larger than the whole bound is not stored (it would evict everything else).
    """

    def __init__(self, max_bytes: int, on_size: Callable[[int], None] | None = None):
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._on_size = on_size

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Hashable, value: V, size: int) -> None:
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self._bytes -= evicted
            current = self._bytes
        if self._on_size:
            self._on_size(current)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
        if self._on_size:
            self._on_size(0)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


class SingleFlight:
    """Concurrent calls with the same key run the function once; the others wait for its result
    (or its exception)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[Hashable, Future] = {}

    def do(self, key: Hashable, fn: Callable[[], Any]) -> tuple[Any, bool]:
        """Returns (result, shared): shared is True when another caller's run produced it."""
        with self._lock:
            fut = self._running.get(key)
            leader = fut is None
            if leader:
                fut = Future()
                self._running[key] = fut
        if not leader:
            return fut.result(), True
        try:
            result = fn()
            fut.set_result(result)
            return result, False
        except BaseException as e:
            fut.set_exception(e)
            raise
        finally:
            with self._lock:
                self._running.pop(key, None)
