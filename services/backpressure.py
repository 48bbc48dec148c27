"""Backpressure for the gRPC servers: a budget of concurrent calls per service and kind, and a
deadline on every stream write.

gRPC's synchronous server runs each call on a thread of one pool, and the thread stays with the
call until it ends: a watch that waits for progress holds it, and so does a response whose client
has stopped reading (the write waits for HTTP/2 flow control, with no timeout of its own). With
one shared pool, a few dozen such calls used to leave nothing for everyone else. Here:

- Every hosted service has two budgets: *calls* (unary calls, and ComposeModel, which computes and
  then sends a header and one chunk per MiB) and *streams* (calls that stay open: watches, blob
  downloads and uploads, health watches, reflection), `POE_MAX_CONCURRENT_CALLS` and
  `POE_MAX_CONCURRENT_STREAMS` each. A call that finds its budget spent is refused at once with
  RESOURCE_EXHAUSTED, instead of waiting in the pool's queue behind calls that may never end. The
  thread pool has a thread for every place in the budgets (`Limits.threads`), and the server's own
  `maximum_concurrent_rpcs` caps the total at the same number, so no call ever waits for a thread.
- A write that has not gone out within `SLOW_WRITE` seconds makes its call a stream: a call blocked
  behind a client that reads slowly, or not at all, moves to its service's streams budget, so that
  stuck readers cannot take the places of short calls. When every stream is taken, the write that
  has waited longest (at least `EVICT_AFTER` seconds) is cancelled to make room, or else the slow
  call itself once it has waited that long: a client that has not read for seconds goes before one
  that a busy machine merely slowed down.
- A write that has not gone out within `POE_STREAM_WRITE_TIMEOUT` seconds is cancelled: the thread
  is free again, and the client gets CANCELLED (once it reads what it was sent before).
  `context.cancel()` is the only way to end a call from another thread (a status cannot be sent:
  it would queue behind the unsent message).

Both are counted in `poe_grpc_stream_write_cancels_total`; refusals are in
`grpc_server_handled_total{grpc_code="RESOURCE_EXHAUSTED"}`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc

from poe.engine.errors import InvalidArgument, ResourceExhausted
from poe_services import metrics

log = logging.getLogger(__name__)

# Seconds a write may wait before its call counts as a stream (a client that keeps up receives a
# whole composed model over loopback in milliseconds, over a slow link in a fraction of a second).
SLOW_WRITE = 0.5
# Seconds a write must have waited before it is cancelled to make room for others (at most half of
# POE_STREAM_WRITE_TIMEOUT): longer than a client that reads waits to be scheduled on a busy
# machine, short enough that a wave of stuck readers holds the places of short calls only briefly.
EVICT_AFTER = 2.0
# How often the watchdog looks at the writes in flight (the precision of the limits above).
WATCHDOG_INTERVAL = 0.1
# Methods that stream their response but are short: they compute, then send a few messages.
SHORT_STREAMS = frozenset({"/poe.v1.Composer/ComposeModel"})
# Health and reflection share one small budget of their own, so that probes are answered whatever
# the services' load.
GRPC_BUDGET = "grpc"
GRPC_CALLS, GRPC_STREAMS = 16, 16
# Threads beyond the budgets: a call that is refused still runs on a thread, briefly.
SPARE_THREADS = 16


class Budget:
    """At most `limit` calls of one service and kind at once; `try_enter` never waits."""

    def __init__(self, service: str, kind: str, limit: int, setting: str):
        self.service, self.kind, self.limit, self.setting = service, kind, limit, setting
        self._lock = threading.Lock()
        self.in_use = 0

    def try_enter(self) -> bool:
        with self._lock:
            if self.in_use >= self.limit:
                return False
            self.in_use += 1
            return True

    def leave(self) -> None:
        with self._lock:
            if self.in_use <= 0:
                raise RuntimeError(f"{self.service}: {self.kind} budget left more often than entered")
            self.in_use -= 1

    def refusal(self) -> ResourceExhausted:
        what = "calls" if self.kind == "calls" else "streams (watches, transfers, slow readers)"
        return ResourceExhausted(f"{self.service} is serving its limit of {self.limit} concurrent {what} "
                                 f"({self.setting}); retry later")


class Permit:
    """The budget one call holds; `escalate` moves it from calls to streams (the watchdog does,
    while the call's own thread may be ending it: hence the lock)."""

    def __init__(self, budget: Budget, streams: Budget):
        self._lock = threading.Lock()
        self._held: Budget | None = budget
        self._streams = streams

    @property
    def is_call(self) -> bool:
        return self._held is not None and self._held.kind == "calls"

    def holds(self, budget: Budget) -> bool:
        return self._held is budget

    @property
    def streams(self) -> Budget:
        return self._streams

    def escalate(self) -> bool:
        """Hold a streams permit instead of a calls permit; False when none is free."""
        with self._lock:
            if self._held is None or self._held.kind != "calls":
                return True
            if not self._streams.try_enter():
                return False
            self._held.leave()
            self._held = self._streams
            return True

    def release(self) -> None:
        with self._lock:
            if self._held is not None:
                self._held.leave()
                self._held = None


class Limits:
    """The budgets of the services one server hosts (full names, e.g. "poe.v1.Composer")."""

    def __init__(self, services: Iterable[str], calls: int, streams: int):
        for name, value in (("POE_MAX_CONCURRENT_CALLS", calls), ("POE_MAX_CONCURRENT_STREAMS", streams)):
            if value < 1:
                raise InvalidArgument(f"{name}: must be at least 1, got {value}")
        self.calls, self.streams = calls, streams
        self._budgets: dict[str, tuple[Budget, Budget]] = {
            s: (Budget(s, "calls", calls, "POE_MAX_CONCURRENT_CALLS"),
                Budget(s, "streams", streams, "POE_MAX_CONCURRENT_STREAMS")) for s in services}
        self._budgets[GRPC_BUDGET] = (Budget("health and reflection", "calls", GRPC_CALLS, "fixed"),
                                      Budget("health and reflection", "streams", GRPC_STREAMS, "fixed"))

    @property
    def threads(self) -> int:
        """Threads (and concurrent RPCs) the server needs so that no admitted call waits for one."""
        return sum(c.limit + s.limit for c, s in self._budgets.values()) + SPARE_THREADS

    def budgets(self, service: str) -> tuple[Budget, Budget] | None:
        """(calls, streams) of a hosted service, or of health and reflection for grpc.*; None for
        anything else (it has no handler on this server)."""
        if service.startswith("grpc."):
            return self._budgets[GRPC_BUDGET]
        return self._budgets.get(service)


class _Write:
    __slots__ = ("context", "permit", "started", "rpc")

    def __init__(self, context: grpc.ServicerContext, permit: Permit, rpc: tuple[str, str]):
        self.context, self.permit, self.rpc = context, permit, rpc
        self.started = time.monotonic()


class WriteWatchdog:
    """Watches every response message on its way to the client (from the handler's `yield` until
    gRPC asks the handler for the next one, which it does once the message is written) and acts on
    those that take too long: see the module's docstring. One daemon thread per server."""

    def __init__(self, timeout: float, slow: float = SLOW_WRITE, evict_after: float = EVICT_AFTER,
                 interval: float = WATCHDOG_INTERVAL):
        if timeout <= 0:
            raise InvalidArgument(f"POE_STREAM_WRITE_TIMEOUT: must be > 0 seconds, got {timeout:g}")
        self.timeout, self.interval = timeout, interval
        self.slow = min(slow, timeout / 2)
        self.evict_after = max(self.slow, min(evict_after, timeout / 2))
        self._lock = threading.Lock()
        self._writes: dict[int, _Write] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="poe-write-watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def arm(self, context: grpc.ServicerContext, permit: Permit, rpc: tuple[str, str]) -> _Write:
        write = _Write(context, permit, rpc)
        with self._lock:
            self._writes[id(write)] = write
        return write

    def disarm(self, write: _Write) -> None:
        with self._lock:
            self._writes.pop(id(write), None)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._writes)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check(time.monotonic())
            except Exception:  # the watchdog must outlive anything one call does
                log.exception("write watchdog: a check failed")

    def check(self, now: float) -> None:
        """One look at the writes in flight (the thread calls it every `interval` seconds)."""
        with self._lock:
            late = sorted((w for w in self._writes.values() if now - w.started >= self.slow), key=lambda w: w.started)
        full = "every stream of the service is taken (POE_MAX_CONCURRENT_STREAMS)"
        for write in late:
            waited = now - write.started
            if waited >= self.timeout:
                self._cancel(write, "timeout", f"no progress for {self.timeout:g} s (POE_STREAM_WRITE_TIMEOUT)")
            elif write.permit.is_call and not write.permit.escalate():
                # Make room: the longest-stuck stream of the service goes first (its place is free
                # once its thread has noticed); this call waits for it, or goes itself in the end.
                streams = write.permit.streams
                stuck = (w for w in late if w is not write and w.permit.holds(streams)
                         and now - w.started >= self.evict_after)
                if not any(self._cancel(w, "overload", f"no progress for {now - w.started:.0f} s and {full}")
                           for w in stuck) and waited >= self.evict_after:
                    self._cancel(write, "overload", f"no progress for {waited:.0f} s and {full}")

    def _cancel(self, write: _Write, reason: str, why: str) -> bool:
        """Cancel the call of `write`; False when it was written (or cancelled) meanwhile."""
        with self._lock:
            if self._writes.pop(id(write), None) is None:
                return False
        peer = write.context.peer()  # before the cancel, which forgets it
        write.context.cancel()
        metrics.STREAM_WRITE_CANCELS.labels(*write.rpc, reason).inc()
        log.info("cancelled %s/%s for %s: %s", write.rpc[0], write.rpc[1], peer, why)
        return True


class BackpressureInterceptor(grpc.ServerInterceptor):
    """Admits each call into its service's budget (or refuses it with RESOURCE_EXHAUSTED) and hands
    every response message of a streaming call to the watchdog. Install it inside the error
    interceptor (a refusal is a ResourceExhausted like any other) and outside the servicers."""

    def __init__(self, limits: Limits, watchdog: WriteWatchdog):
        self.limits, self.watchdog = limits, watchdog

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        service, _, name = method.lstrip("/").partition("/")
        budgets = self.limits.budgets(service)
        if budgets is None:
            return handler
        calls, streams = budgets
        long_lived = (handler.request_streaming or handler.response_streaming) and method not in SHORT_STREAMS
        budget = streams if long_lived else calls
        rpc = (service, name)
        for attr in ("unary_unary", "stream_unary", "unary_stream", "stream_stream"):
            behavior = getattr(handler, attr)
            if behavior is not None:
                wrap = self._streaming if handler.response_streaming else self._unary
                return handler._replace(**{attr: wrap(behavior, budget, streams, rpc)})
        return handler

    @staticmethod
    def _admit(budget: Budget, streams: Budget) -> Permit:
        if not budget.try_enter():
            raise budget.refusal()
        return Permit(budget, streams)

    def _unary(self, behavior: Callable, budget: Budget, streams: Budget, rpc: tuple[str, str]) -> Callable:
        def handler(request: Any, context: grpc.ServicerContext) -> Any:
            permit = self._admit(budget, streams)
            try:
                return behavior(request, context)
            finally:
                permit.release()

        return handler

    def _streaming(self, behavior: Callable, budget: Budget, streams: Budget, rpc: tuple[str, str]) -> Callable:
        watchdog = self.watchdog

        def handler(request: Any, context: grpc.ServicerContext) -> Iterator:
            permit = self._admit(budget, streams)
            messages = behavior(request, context)
            try:
                for message in messages:
                    write = watchdog.arm(context, permit, rpc)
                    try:
                        yield message  # returns once gRPC has written it and wants the next one
                    finally:
                        watchdog.disarm(write)
            finally:
                close = getattr(messages, "close", None)
                if close is not None:  # a cancelled call: the servicer's own cleanup runs now
                    close()
                permit.release()

        return handler
