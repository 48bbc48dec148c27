"""The composer as a hosted service (poe_services.host): engine, warm-up of every pool, readiness, shutdown.

Warm-up runs in one background thread for as long as the process does. It looks at the registry's
pools (ListPools) at start, every `composer_pool_poll` seconds and whenever `look_now` asks (a
registry in the same process, as in `poe up`, asks on every publication and alias move, so that
a pool imported there is warm before its first request), and warms every published
version it has not warmed yet: the default pool's version first, then the largest, as long as the
template and tensor caches have room. A version a request meets before warm-up did is warmed next,
whatever the room. Pool versions with a corrupt or missing blob (degraded) are tried again on every
look, so that re-importing the pool repairs them without a request. While the registry cannot be
reached, the thread retries with a backoff of up to one poll interval and never gives up.

Formats: warm-up makes the templates of the first format of `composer_warm_formats`
(POE_COMPOSER_WARM_FORMATS, default torchscript) as above; the other formats listed (pt2, onnx: an
export of about a second per tensor layout, where TorchScript takes a twentieth) are made next, in
the same thread, pool version by pool version in the order they were warmed, each as long as the
template cache has room. A look at the registry or a request that met a cold version goes first,
and the pass resumes after it. A request that still finds no template for its format and layout
waits for the export and is counted in poe_compose_template_misses_total.

Readiness ("poe.v1.Composer"): NOT_SERVING until the default pool's version is warm, or the
registry has answered and there is no default pool (yet), or `composer_ready_timeout` seconds have
passed since start and the registry has answered; then SERVING until shutdown. A bad pool or blob
never takes the composer out of readiness (requests that need the bad blob fail with DATA_LOSS).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import grpc
import torch
from grpc_health.v1 import health_pb2

from poe.client.registry import RegistryClient
from poe.engine.config import Settings
from poe.engine.errors import InvalidArgument, NotFound, PoeError, Unavailable
from poe.engine.export import TEMPLATED_FORMATS
from poe_services.composer.engine import ComposerEngine, PoolView
from poe_services.composer.servicer import SERVICE_NAME, add_to_server

if TYPE_CHECKING:
    from poe.v1 import registry_pb2
    from poe_services.host import HealthReporter

log = logging.getLogger(__name__)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FIRST_RETRY_DELAY = 0.2  # seconds; doubles up to the poll interval while the registry is unreachable


def _transient(err: PoeError) -> bool:
    """Whether a registry error may go away by itself (down, overloaded, an unexpected server error),
    as opposed to one about a particular pool version, which stays as long as the version does."""
    return isinstance(err, Unavailable) or type(err) is PoeError


class ComposerRuntime:
    """Owns the engine, its registry client and the warm-up thread; reports readiness."""

    def __init__(self, settings: Settings, registry_target: str | None = None, warm: bool = True):
        if settings.composer_pool_poll <= 0:
            raise InvalidArgument(f"POE_COMPOSER_POOL_POLL: must be > 0 seconds, got {settings.composer_pool_poll:g}")
        if settings.composer_ready_timeout < 0:
            raise InvalidArgument(
                f"POE_COMPOSER_READY_TIMEOUT: must be >= 0 seconds, got {settings.composer_ready_timeout:g}")
        formats = settings.composer_warm_formats
        unknown = [f for f in formats if f not in TEMPLATED_FORMATS]
        if unknown or not formats:
            raise InvalidArgument(f"POE_COMPOSER_WARM_FORMATS: expected some of {', '.join(TEMPLATED_FORMATS)} "
                                  f"(comma-separated), got {', '.join(unknown or formats) or 'none'}")
        self.settings = settings
        self.formats = formats
        if settings.composer_threads > 0:
            # Composing concatenates small tensors, which intra-op threads do not speed up; with
            # several threads, their spin-waits compete with the gRPC threads (measured with
            # `poe bench compose`: about 10% more compositions/s, and steadier, with one).
            torch.set_num_threads(settings.composer_threads)
        self.registry = RegistryClient(registry_target or settings.registry_addr, timeout=30.0,
                                       token=settings.service_token, config=settings)
        self.engine = ComposerEngine(self.registry, settings)
        # warm=False (tests, benchmarks): no warm-up at all; SERVING once the registry is reachable.
        self._warm = warm
        self._stop = threading.Event()
        self._wake = threading.Event()  # a request met a cold pool version, a look was asked for, or shutdown
        self._look_asked = threading.Event()  # look_now(): look before the next poll is due
        self._looks = threading.Condition()  # look_now() waiting for a look that began after it asked
        self._looks_asked = 0
        self._looks_done = 0  # the count of asks that the last completed look covered
        self._lock = threading.Lock()
        self._requested: dict[str, PoolView] = {}  # name@version -> view, met by requests before warm-up
        self._seen: dict[str, tuple[str, ...]] | None = None  # name@version -> aliases, at the last look
        self._skipped: set[str] = set()  # versions that cannot be warmed (reported once)
        self._warm_views: dict[str, PoolView] = {}  # name@version -> view, in the order first warmed
        self._formats_done: dict[str, set[str]] = {}  # name@version -> formats whose templates are made
        self._next_look = 0.0
        self._default_error = ""
        self._registry_answered = False
        self._started = 0.0
        self._ready_timer: threading.Timer | None = None
        self.ready = threading.Event()
        self.health: HealthReporter | None = None
        self.closed = False
        if warm:
            self.engine.on_cold_view = self._request_warm

    def attach(self, server: grpc.Server, health: HealthReporter, /) -> None:
        """Add the Composer servicer to `server`; report "poe.v1.Composer" through `health`."""
        add_to_server(self.engine, server)
        self.health = health
        self._set(NOT_SERVING)

    def start(self) -> None:
        """Warm up in the background (call after the server has started: in `poe up` the registry
        this composer reads from is served by the same server)."""
        self._started = time.monotonic()
        if self._warm:
            self._ready_timer = threading.Timer(self.settings.composer_ready_timeout, self._on_ready_timeout)
            self._ready_timer.daemon = True
            self._ready_timer.start()
        target = self._warm_up if self._warm else self._wait_for_registry
        threading.Thread(target=target, name="composer-warm", daemon=True).start()

    def _set(self, status) -> None:
        if self.health is not None:
            self.health.set(SERVICE_NAME, status)

    def _become_ready(self, why: str) -> None:
        with self._lock:  # with begin_shutdown's: SERVING never follows the shutdown's NOT_SERVING
            if self.ready.is_set() or self._stop.is_set():
                return
            self.ready.set()
            self._set(SERVING)
        log.info("composer: ready (%s)", why)

    def _on_ready_timeout(self) -> None:
        if self._registry_answered:
            self._become_ready(f"still warming after {self.settings.composer_ready_timeout:g} s")

    def _registry_answers(self) -> None:
        self._registry_answered = True
        if time.monotonic() - self._started >= self.settings.composer_ready_timeout:
            self._on_ready_timeout()

    def look_now(self, wait: float = 0.0) -> bool:
        """Look at the registry's pools now instead of at the next poll (any thread). A registry hosted
        in this process calls it when a pool version is published or an alias moves. With `wait`,
        returns once a look that began after this call is done (what it warms is then warm, in the
        first warm format), at most `wait` seconds later; whether it is done."""
        with self._looks:
            self._looks_asked += 1
            asked = self._looks_asked
        self._look_asked.set()
        self._wake.set()
        if not self._warm or wait <= 0:
            return False
        with self._looks:
            return self._looks.wait_for(lambda: self._looks_done >= asked or self._stop.is_set(), wait) \
                and self._looks_done >= asked

    def _request_warm(self, view: PoolView) -> None:
        """On the request path: queue a pool version for warm-up (cheap, once per version)."""
        with self._lock:
            if view.ref in self._requested:
                return
            self._requested[view.ref] = view
        self._wake.set()

    # -- the warm-up thread ----------------------------------------------------------------------

    def _wait_for_registry(self) -> None:
        delay = FIRST_RETRY_DELAY
        while not self._stop.is_set():
            try:
                self.registry.wait_ready(timeout=5.0)
                self._become_ready("registry reachable; warm-up off")
                return
            except PoeError as e:
                log.info("composer: waiting for the registry (%s)", e)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)

    def _warm_up(self) -> None:
        delay = FIRST_RETRY_DELAY
        self._next_look = 0.0
        while not self._stop.is_set():
            self._wake.clear()  # before the work: a request arriving during it wakes the wait below
            try:
                self._warm_requested()
                if self._look_asked.is_set() or time.monotonic() >= self._next_look:
                    self._look_asked.clear()  # before the look: a publication during it asks for another
                    with self._looks:
                        covered = self._looks_asked
                    self._look()
                    with self._looks:
                        self._looks_done = covered
                        self._looks.notify_all()
                    self._next_look = time.monotonic() + self.settings.composer_pool_poll
                self._warm_other_formats()
                delay = FIRST_RETRY_DELAY
            except Exception as e:
                if self._stop.is_set():
                    return  # the registry client was closed under us
                if isinstance(e, PoeError) and _transient(e):
                    log.info("composer: waiting for the registry (%s)", e)
                else:  # never let warm-up die: it is what makes the composer fast
                    log.exception("composer: warm-up failed; trying again")
                self._stop.wait(delay)
                delay = min(delay * 2, self.settings.composer_pool_poll)
                self._next_look = 0.0
                continue
            self._wake.wait(max(0.0, self._next_look - time.monotonic()))

    def _warm_requested(self) -> None:
        """Warm the versions requests met cold (before the next look: a client is waiting for them)."""
        while not self._stop.is_set():
            with self._lock:
                if not self._requested:
                    return
                ref, view = next(iter(self._requested.items()))
            if not self.engine.is_warm(ref):
                self._warm_one(view, "requested")
            with self._lock:
                self._requested.pop(ref, None)

    def _look(self) -> None:
        """One look at the registry: warm what is published and not warm yet, retry degraded
        versions, and decide readiness."""
        pools = list(self.registry.list_pools())
        self._registry_answers()
        seen = {f"{p.name}@{p.version}": tuple(sorted(p.aliases)) for p in pools}
        previous = self._seen
        # Versions that were just published, or that an alias moved to, since the last look.
        changed = set() if previous is None else {ref for ref, a in seen.items() if previous.get(ref) != a}
        if changed:
            log.info("composer: pools changed: %s",
                     ", ".join(f"{ref} ({', '.join(seen[ref]) or 'no alias'})" for ref in sorted(changed)))
        default = self._default_view()
        if default is None:
            self._become_ready("no default pool in the registry yet")
        else:
            if not self.engine.is_warm(default.ref) or self.engine.degraded_tasks(default.ref) is not None:
                self._warm_one(default, "default pool")
            self._become_ready(f"default pool {default.ref}")
        for pv in self._by_size(pools):
            if self._stop.is_set():
                return
            ref = f"{pv.name}@{pv.version}"
            if ref in self._skipped or (default is not None and ref == default.ref):
                continue
            degraded = self.engine.degraded_tasks(ref) is not None
            if self.engine.is_warm(ref) and not degraded:
                continue
            try:
                view = self.engine.view_of(pv)
            except PoeError as e:
                if _transient(e):
                    raise
                self._skip(ref, e)
                continue
            # A version an alias just moved to is what requests resolve to from now on: warm it anyway.
            if degraded or self.engine.has_room_for(view) or (ref in changed and seen[ref]):
                self._warm_one(view, "published")
            # else: stays lazy (POE_TEMPLATE_CACHE_BYTES, POE_CACHE_BYTES); a request warms it
        self._seen = seen  # only after a whole look: one cut short by an outage compares again

    def _default_view(self) -> PoolView | None:
        """The default pool's current version; None when there is none (yet), or it cannot be used."""
        ref = self.settings.default_pool.strip()
        if not ref:
            return None
        try:
            return self.engine.view(ref)
        except NotFound:
            return None
        except PoeError as e:
            if _transient(e):
                raise
            if str(e) != self._default_error:  # once, not on every look
                log.warning("composer: default pool %s cannot be used: %s", ref, e)
            self._default_error = str(e)
            return None

    @staticmethod
    def _by_size(pools: list[registry_pb2.PoolVersion]) -> list[registry_pb2.PoolVersion]:
        """Largest first; among equals, versions with an alias first, then the newest."""
        return sorted(pools, key=lambda p: (-p.params, not p.aliases, -p.publish_time.ToNanoseconds()))

    def _warm_one(self, view: PoolView, why: str) -> None:
        """Warm one version; an error about this version (not the registry's) is reported once."""
        if view.ref in self._skipped:
            return
        t0 = time.perf_counter()
        try:
            self.engine.warm_view(view, formats=self.formats[:1], stopping=self._stop.is_set)
        except PoeError as e:
            if _transient(e):
                raise
            self._skip(view.ref, e)
            return
        except Exception as e:  # a bug: keep warming the other versions; the traceback is in the log
            log.exception("composer: warming %s failed", view.ref)
            self._skip(view.ref, e)
            return
        if self._stop.is_set():
            return
        with self._lock:
            self._warm_views.setdefault(view.ref, view)
            self._formats_done.setdefault(view.ref, set()).add(self.formats[0])
        tasks = self.engine.degraded_tasks(view.ref)
        state = "" if tasks is None else f"; degraded: {', '.join(tasks) or 'library'}"
        log.info("composer: warm (%s, %s, %d experts, %.1f s%s)", view.ref, why, len(view.pool.experts),
                 time.perf_counter() - t0, state)

    def _other_work_waits(self) -> bool:
        """Whether the format pass should yield: shutdown, a request met a cold version, or a look is due."""
        return (self._stop.is_set() or bool(self._requested) or self._look_asked.is_set()
                or time.monotonic() >= self._next_look)

    def _warm_other_formats(self) -> None:
        """Make the templates of the other formats of POE_COMPOSER_WARM_FORMATS for every warm
        version, until other work waits (the next call resumes where this one stopped)."""
        for fmt in self.formats[1:]:
            with self._lock:
                todo = [v for ref, v in self._warm_views.items() if fmt not in self._formats_done[ref]]
            for view in todo:
                if self._other_work_waits():
                    return
                if self.engine.scripts.full:  # would push out templates of the first format
                    return
                t0 = time.perf_counter()
                try:
                    self.engine.warm_view(view, formats=(fmt,), stopping=self._other_work_waits)
                except PoeError as e:
                    if _transient(e):
                        raise
                    log.warning("composer: %s templates of %s cannot be made: %s", fmt, view.ref, e)
                except Exception:  # a bug: the traceback is in the log; the other versions go on
                    log.exception("composer: making %s templates of %s failed", fmt, view.ref)
                else:
                    if self._other_work_waits():
                        return  # cut short: resumed on the next call
                    log.info("composer: %s templates of %s made (%.1f s)", fmt, view.ref, time.perf_counter() - t0)
                with self._lock:
                    self._formats_done[view.ref].add(fmt)

    def warm_formats(self, ref: str) -> tuple[str, ...]:
        """The formats whose templates warm-up has made for the pool version `ref` (name@version)."""
        with self._lock:
            done = self._formats_done.get(ref, set())
        return tuple(f for f in self.formats if f in done)

    def _skip(self, ref: str, err: Exception) -> None:
        self._skipped.add(ref)
        log.warning("composer: pool %s cannot be warmed (not tried again): %s", ref, err)

    # -- shutdown --------------------------------------------------------------------------------

    def begin_shutdown(self) -> None:
        with self._lock:
            self._stop.set()
            self._set(NOT_SERVING)
        self._wake.set()
        with self._looks:
            self._looks.notify_all()
        if self._ready_timer is not None:
            self._ready_timer.cancel()

    def flush(self, timeout: float, /) -> bool:
        """Send the queued recordings (at most `timeout` s). The host calls it after begin_shutdown and
        before it stops accepting calls, so that a registry on the same server still takes them."""
        return self.engine.flush_recordings(timeout)

    def close(self) -> None:
        self.begin_shutdown()
        if not self.closed:
            self.closed = True
            self.engine.close()  # recordings queued since flush() get a last second
            self.registry.close()
