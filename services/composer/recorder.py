"""The composer's recordings: every newly built composed file is copied into the registry
(provenance, hit counts, download by sha256) in the background, never on the request path.

One thread sends them, oldest first and several to a call (`RegistryClient.put_composed_models`:
one PutComposedModels call and transaction for up to 6 MiB of files), from a queue of at most
`POE_RECORD_QUEUE` recordings (each holds its file's bytes). Sending costs the composer and a
co-hosted registry CPU, so it waits until compositions have paused for `quiet` seconds (50 ms): a
burst of requests is answered first and recorded right after. Under sustained load it does not
wait once the queue is half full, so recordings keep pace with what is composed; `flush` and
`close` never wait. A composer that builds faster than the registry records must neither grow
without bound nor slow its requests, so a recording that finds the queue full is dropped; but
never in silence: `poe_compose_recordings_total{outcome}` counts every recording (`recorded`,
`failed`: the registry refused it or could not be reached, `dropped`: the queue was full or the
composer was stopping), `poe_compose_recordings_queued` the ones waiting, and a WARNING, at most
one a minute per cause, says how many were dropped or failed since the last one.

At shutdown the host calls `flush` while the server still accepts calls (the registry may be hosted
on the same server), then `close` sends what was queued since, for a bounded time, and counts the
rest as dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from poe.client.registry import BATCH_BYTES, BATCH_MODELS
from poe.engine.errors import InvalidArgument
from poe_services import metrics

log = logging.getLogger(__name__)

WARN_INTERVAL = 60.0  # seconds between two warnings of one cause
QUIET = 0.05  # seconds without a composition before a recording is sent (unless the queue is half full)


class ThrottledWarning:
    """Logs a WARNING for an event at most once per `interval` seconds, with the number of events
    since the previous warning; `emit_due` (called now and then) reports the ones that came after."""

    def __init__(self, logger: logging.Logger, what: str, interval: float = WARN_INTERVAL,
                 clock: Callable[[], float] = time.monotonic):
        self.logger, self.what, self.interval, self.clock = logger, what, interval, clock
        self._lock = threading.Lock()
        self._count = 0
        self._reason = ""
        self._last: float | None = None  # when the last warning was logged

    def note(self, reason: str, count: int = 1) -> None:
        """`count` more events; logs now unless a warning was logged less than `interval` s ago."""
        with self._lock:
            self._count += count
            self._reason = reason
            if self._last is not None and self.clock() - self._last < self.interval:
                return
        self._emit()

    def emit_due(self, force: bool = False) -> None:
        """Log the events counted since the last warning, if the interval is over (or `force`)."""
        with self._lock:
            if not self._count or (not force and self._last is not None and self.clock() - self._last < self.interval):
                return
        self._emit()

    def _emit(self) -> None:
        with self._lock:
            count, reason, last, now = self._count, self._reason, self._last, self.clock()
            self._count, self._last = 0, now
        if not count:
            return
        since = "" if last is None else f" in the last {now - last:.0f} s"
        self.logger.warning("composer: %d %s%s: %s (this warning repeats at most every %g s)", count, self.what,
                            since, reason, self.interval)


@dataclass
class _Recording:
    model_id: str
    item: object  # what `send` takes
    size: int  # bytes it holds


class Recorder:
    """A bounded queue of recordings and the one thread that sends them (see the module's doc)."""

    def __init__(self, capacity: int, send: Callable[[list], object], *, warn_interval: float = WARN_INTERVAL,
                 quiet: float = QUIET):
        """`send(items)` records the items of one batch (all or none: it raises when they failed)."""
        if capacity < 1:
            raise InvalidArgument(f"POE_RECORD_QUEUE: must be at least 1, got {capacity}")
        self.capacity, self.quiet, self._send = capacity, quiet, send
        self._queue: deque[_Recording] = deque()
        self._cond = threading.Condition()
        self._sending: list[_Recording] = []
        self._closed = False
        self._active = 0  # compositions in progress
        self._last_active = -float("inf")  # when the last one ended (monotonic)
        self._flushing = 0  # flush() calls waiting: send without pause
        self.dropped = ThrottledWarning(log, "recording(s) of composed files dropped", warn_interval)
        self.failed = ThrottledWarning(log, "recording(s) of composed files failed", warn_interval)
        # A daemon: a send stuck on an unreachable registry must never hold the process at exit.
        self._thread = threading.Thread(target=self._run, name="compose-record", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Recordings queued or being sent."""
        with self._cond:
            return len(self._queue) + len(self._sending)

    @contextmanager
    def composing(self) -> Iterator[None]:
        """Wraps a composition: recordings wait while any runs and for `quiet` s after the last."""
        with self._cond:
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._last_active = time.monotonic()
                if not self._active and self._queue:
                    self._cond.notify_all()

    def _pause(self) -> float | None:
        """How long the next recording waits (None: until a composition ends); 0 to send now.
        Called with the lock held."""
        if self._closed or self._flushing or len(self._queue) * 2 >= self.capacity:
            return 0.0
        if self._active:
            return None
        return max(0.0, self._last_active + self.quiet - time.monotonic())

    def submit(self, model_id: str, item: object, size: int = 0) -> bool:
        """Queue `item` (the recording of `model_id`, holding `size` bytes); False when it was
        dropped (and counted)."""
        with self._cond:
            if self._closed:
                reason = "the composer is shutting down"
            elif len(self._queue) >= self.capacity:
                reason = (f"{self.capacity} recordings already wait for the registry (POE_RECORD_QUEUE): it records "
                          "slower than this composer builds")
            else:
                self._queue.append(_Recording(model_id, item, size))
                metrics.COMPOSE_RECORDINGS_QUEUED.inc()
                self._cond.notify_all()
                return True
        metrics.COMPOSE_RECORDINGS.labels("dropped").inc()
        self.dropped.note(reason)
        return False

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._queue and not self._closed:
                    self._cond.wait(timeout=min(self.dropped.interval, 5.0))
                while self._queue and (pause := self._pause()) != 0.0:
                    self._cond.wait(pause)
                if not self._queue:
                    if self._closed:
                        return
                    batch = []
                else:
                    batch = self._sending = self._next_batch()
            if not batch:  # idle: report drops and failures that came after the last warning
                self.dropped.emit_due()
                self.failed.emit_due()
                continue
            try:
                self._send([rec.item for rec in batch])
                outcome = "recorded"
            except Exception as e:  # the composer keeps serving from memory; counted and reported
                outcome = "failed"
                self.failed.note(f"last {batch[-1].model_id}: {e}", len(batch))
            with self._cond:
                abandoned = self._sending is not batch  # close() gave up on it and counted it
                self._sending = []
                self._cond.notify_all()
            if not abandoned:
                metrics.COMPOSE_RECORDINGS_QUEUED.dec(len(batch))
                metrics.COMPOSE_RECORDINGS.labels(outcome).inc(len(batch))

    def _next_batch(self) -> list[_Recording]:
        """The oldest recordings, up to BATCH_MODELS and BATCH_BYTES (at least one); lock held."""
        batch = [self._queue.popleft()]
        size = batch[0].size
        while self._queue and len(batch) < BATCH_MODELS and size + self._queue[0].size <= BATCH_BYTES:
            size += self._queue[0].size
            batch.append(self._queue.popleft())
        return batch

    def flush(self, timeout: float) -> bool:
        """Wait until nothing is queued or being sent, at most `timeout` s; whether that happened.
        Recordings submitted meanwhile are waited for too."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()
            try:
                while self._queue or self._sending:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(left)
            finally:
                self._flushing -= 1
        return True

    def close(self, timeout: float) -> None:
        """Refuse new recordings, send the queued ones for at most `timeout` s, count the rest as
        dropped (idempotent)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.flush(timeout)
        with self._cond:
            left = list(self._queue) + self._sending
            self._queue.clear()
            self._sending = []
        if left:
            metrics.COMPOSE_RECORDINGS_QUEUED.dec(len(left))
            metrics.COMPOSE_RECORDINGS.labels("dropped").inc(len(left))
            self.dropped.note(f"still unsent at shutdown after {timeout:g} s more (the registry did not take them)",
                              len(left))
        self.dropped.emit_due(force=True)
        self.failed.emit_due(force=True)
