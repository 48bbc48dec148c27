"""The composer's core: resolve a request against a pool in the registry, fetch tensors, compose.

Per request, on the hot path (a class set not composed before, experts already in memory): resolve (pool
reference -> an immutable `PoolView`, cached as below; plan the experts locally), fetch (tensors from a
byte-bounded LRU; misses download from the registry, sha256-verified), consolidate
(`poe.engine.compose.composed_state`: concatenating tensors, no module construction), serialize
(`poe.engine.export.serialize`: the archive template of the same tensor layout is written again with the
new tensors, `poe.engine.archive`; neither `torch.jit.script` nor `torch.jit.save` runs on the hot path
once a layout has been seen, and `warm` sees them all). Composed files are kept in a byte-bounded LRU
and recorded in the registry in the background (provenance, hit counts, download by sha256); concurrent
identical requests build once. A memory miss rebuilds instead of fetching the registry's copy: measured
on this machine, the registry round trip for a lookup alone (about 13 ms) costs more than the whole
composition (2-4 ms), so the registry record is never on the request path.

A pool reference ("name", "name@alias" or "name@version") is resolved with GetPool on its first
request only (concurrent first requests share one call). After that, requests get the cached view
at once, and one at least `alias_ttl` seconds after the last check triggers a check in the
background (one at a time per reference): GetPool of a large pool takes hundreds of ms, which no
request waits for. A check that finds an alias moved switches the reference to the new version;
one that finds the reference gone (a deleted version or alias), or the version unusable, forgets
it, so that the next request resolves it again and gets the registry's answer (NOT_FOUND). While
the registry cannot be reached, the cached view keeps being served and the check is retried every
`alias_ttl` seconds. The requests that arrive while a check runs still get the old view, also
after a long quiet spell.

A blob the registry reports corrupt or missing marks its pool version degraded (`degraded_tasks`,
the header's `degraded` fields, poe_compose_degraded_pools): compositions that need it fail with
DataLoss naming the task, the others are served, and the next successful fetch clears the mark.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from poe.client.registry import ComposedUpload, RegistryClient
from poe.contract import ComposeHeader, hierarchy_from_message
from poe.engine import limits
from poe.engine.compose import Plan, build, check_request, composed_state, fold_ahead, plan, plan_params
from poe.engine.config import Settings
from poe.engine.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound, PoeError
from poe.engine.export import FORMATS, TEMPLATED_FORMATS, ScriptCache, architecture_key, serialize
from poe.engine.nets import Library, count_flops, make_expert
from poe.engine.pool import Expert, Pool, expert_config_from_dict, sha256_hex, wrn_config_from_dict
from poe_services import metrics
from poe_services.composer.caches import ByteLRU, SingleFlight
from poe_services.composer.recorder import Recorder

log = logging.getLogger(__name__)

EXECUTIONS = ("fused", "reference")


@dataclass(frozen=True)
class ComposeRequest:
    pool: str = ""
    classes: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    execution: str = "fused"
    format: str = "torchscript"

    def __post_init__(self) -> None:
        if self.pool:  # "" asks for the default pool
            limits.parse_pool_ref("pool", self.pool)
        if self.execution not in EXECUTIONS:
            raise InvalidArgument(f"execution: expected one of {', '.join(EXECUTIONS)}, got {self.execution!r}")
        if self.format not in FORMATS:
            raise InvalidArgument(f"format: expected one of {', '.join(FORMATS)}, got {self.format!r}")


@dataclass
class Composition:
    header: ComposeHeader
    data: bytes | None = None  # None for DescribeComposition of an uncached model


@dataclass
class PoolView:
    """One published pool version, as the composer needs it (immutable, like the version)."""

    ref: str  # name@version
    pool: Pool  # expert states empty: tensors live in the tensor cache
    library_sha256: str
    expert_sha256: dict[str, str]
    expert_ids: dict[str, int]
    library_params: int = 0
    expert_params: dict[str, int] = field(default_factory=dict)
    flops_library: int = 0
    flops_expert_convs: dict[str, int] = field(default_factory=dict)
    blob_bytes: int = 0  # library and experts, as stored


@dataclass
class _Resolution:
    """The pool version a reference resolved to, and when to check that with the registry again."""

    key: str  # name@version
    due: float  # time.monotonic() of the next check
    checking: bool = False


LIBRARY = ""  # the library's key among a pool version's broken blobs (expert blobs are keyed by task)


def _stored_config(pv, what: str, parse: Callable[[dict], object], text: str):
    """A network config of a published version, parsed (and checked against the caps of
    `poe.engine.limits`) before any module is built from it. The registry refuses configs beyond
    the caps; one stored before it did is the pool's fault, not the request's: FailedPrecondition."""
    try:
        return parse(limits.parse_json("config_json", text or "{}"))
    except InvalidArgument as err:
        raise FailedPrecondition(f"pool {pv.name}@{pv.version}: {what} has a config this composer refuses "
                                 f"({err})") from None


class StageTimer:
    """Times the stages of one request into poe_compose_stage_duration_seconds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.seconds[name] = self.seconds.get(name, 0.0) + dt
            metrics.COMPOSE_STAGE_DURATION.labels(name).observe(dt)


class ComposerEngine:
    def __init__(self, registry: RegistryClient, settings: Settings, script_copies: int = 2):
        self.registry = registry
        self.settings = settings
        self.scripts = ScriptCache(copies=script_copies, max_template_bytes=settings.template_cache_bytes,
                                   on_bytes=lambda n: metrics.CACHE_BYTES.labels("template").set(n))
        self._tensors: ByteLRU[dict[str, torch.Tensor]] = ByteLRU(
            settings.cache_bytes, lambda n: metrics.CACHE_BYTES.labels("tensor").set(n))
        self._models: ByteLRU[Composition] = ByteLRU(
            settings.model_cache_bytes, lambda n: metrics.CACHE_BYTES.labels("model").set(n))
        self._views: dict[str, PoolView] = {}  # name@version -> view (immutable)
        self._resolved: dict[str, _Resolution] = {}  # pool reference -> what it resolved to
        self._closed = False
        # name@version -> {task, or LIBRARY: sha256} of the blobs whose last fetch failed for good.
        self._broken: dict[str, dict[str, str]] = {}
        self._warmed: set[str] = set()  # name@version warmed by `warm_view`
        # Called (cheaply, on the request path) with a view a request met before warm-up did.
        self.on_cold_view: Callable[[PoolView], None] | None = None
        self._lock = threading.Lock()
        self._flight = SingleFlight()
        self.recorder = (Recorder(settings.record_queue, self.registry.put_composed_models)
                         if settings.record_compositions else None)

    def flush_recordings(self, timeout: float) -> bool:
        """Wait (at most `timeout` s) until every recording queued so far is in the registry or failed."""
        return self.recorder is None or self.recorder.flush(timeout)

    def close(self, timeout: float = 1.0) -> None:
        """Stop recording: what is still queued gets `timeout` s more, the rest is counted as dropped."""
        self._closed = True  # no more background checks of pool references
        if self.recorder is not None:
            self.recorder.close(timeout)

    # -- resolve ---------------------------------------------------------------------------------
    def view(self, ref: str) -> PoolView:
        """The view `ref` resolves to; the registry is asked only the first time (see the module doc)."""
        ref = (ref or self.settings.default_pool).strip()
        if not ref:
            raise InvalidArgument("pool: empty, and no default pool is configured")
        with self._lock:
            res = self._resolved.get(ref)
            view = self._views.get(res.key) if res else None
            check = view is not None and not res.checking and not self._closed and time.monotonic() >= res.due
            if check:
                res.checking = True
        if view is None:
            return self._flight.do(("pool", ref), lambda: self._resolve(ref))[0]
        if check:
            try:
                threading.Thread(target=self._check, args=(ref, res), name="composer-pool-check", daemon=True).start()
            except RuntimeError:  # no thread now (the interpreter is exiting): the next request tries again
                with self._lock:
                    res.checking = False
        return view

    def _resolve(self, ref: str) -> PoolView:
        asked = time.monotonic()
        view = self.view_of(self.registry.get_pool(ref))
        with self._lock:
            self._resolved[ref] = _Resolution(view.ref, asked + self.settings.alias_ttl)
        return view

    def _check(self, ref: str, res: _Resolution) -> None:
        """In the background: ask the registry again what `ref` resolves to."""
        asked = time.monotonic()
        try:
            view = self.view_of(self.registry.get_pool(ref))
        except Exception as e:
            # Errors about the reference or its version are for the next request to report.
            gone = isinstance(e, (NotFound, FailedPrecondition, InvalidArgument))
            with self._lock:
                current = self._resolved.get(ref) is res
                if current and gone:
                    del self._resolved[ref]
                    if ref == res.key and isinstance(e, NotFound):  # deleted: its name may be published again
                        self._views.pop(ref, None)
                        self._warmed.discard(ref)
                elif current:
                    res.due, res.checking = time.monotonic() + self.settings.alias_ttl, False
            if self._closed:
                return
            if gone:
                log.info("composer: pool %s no longer resolves to %s: %s", ref, res.key, e)
            elif isinstance(e, PoeError):
                log.info("composer: pool %s cannot be checked (still serving %s): %s", ref, res.key, e)
            else:
                log.exception("composer: checking pool %s failed (still serving %s)", ref, res.key)
            return
        with self._lock:
            if self._resolved.get(ref) is res:
                self._resolved[ref] = _Resolution(view.ref, asked + self.settings.alias_ttl)
        if view.ref != res.key:
            log.info("composer: pool %s now resolves to %s (was %s)", ref, view.ref, res.key)

    def view_of(self, pv) -> PoolView:
        """The view of a published version (a `poe.v1.PoolVersion` from GetPool or ListPools)."""
        key = f"{pv.name}@{pv.version}"
        with self._lock:
            view = self._views.get(key)
        if view is None:
            view = self._make_view(pv)
            with self._lock:
                self._views.setdefault(key, view)
                view = self._views[key]
        return view

    def _make_view(self, pv) -> PoolView:
        hier = hierarchy_from_message(pv.hierarchy)
        info = json.loads(pv.info_json or "{}")
        experts, shas, ids = {}, {}, {}
        for e in pv.experts:
            cfg = _stored_config(pv, f"the expert of task {e.task!r}", expert_config_from_dict, e.config_json)
            metrics_ = {"val_acc": e.val_accuracy} if e.HasField("val_accuracy") else {}
            experts[e.task] = Expert(e.task, tuple(e.class_ids), cfg, {}, metrics_, json.loads(e.loss_json or "{}"))
            shas[e.task] = e.blob.sha256
            ids[e.task] = e.id
        lib_cfg = _stored_config(pv, "the library", wrn_config_from_dict, pv.library.config_json)
        pool = Pool(pv.name, pv.version, hier, lib_cfg, {}, {t: experts[t] for t in hier.tasks if t in experts},
                    info=info)
        view = PoolView(pool.ref, pool, pv.library.blob.sha256, shas, ids, pv.library.params,
                        {e.task: e.params for e in pv.experts},
                        blob_bytes=pv.library.blob.size + sum(e.blob.size for e in pv.experts))
        # FLOPs do not depend on weights: count them once per pool version on fresh modules.
        c, hh, ww = pool.input_shape  # FailedPrecondition for a pool whose info records no input shape
        lib = Library(lib_cfg)
        view.flops_library = count_flops(lib, (c, hh, ww))
        feat = lib(torch.zeros(1, c, hh, ww)).shape[1:]
        for t, e in pool.experts.items():
            view.flops_expert_convs[t] = count_flops(make_expert(e.config), tuple(feat)) - \
                e.config.width * e.config.num_classes
        return view

    # -- fetch -----------------------------------------------------------------------------------
    def tensors(self, sha256: str) -> dict[str, torch.Tensor]:
        cached = self._tensors.get(sha256)
        if cached is not None:
            metrics.CACHE_HITS.labels("tensor").inc()
            return cached
        metrics.CACHE_MISSES.labels("tensor").inc()

        def fetch() -> dict[str, torch.Tensor]:
            try:
                state = self.registry.download_tensors(sha256)  # sha256-verified
            except (DataLoss, NotFound) as e:  # counted once per download, not per waiting request
                metrics.COMPOSE_BLOB_ERRORS.labels("data_loss" if isinstance(e, DataLoss) else "not_found").inc()
                raise
            # Folded for the fused execution here, once per blob, not by the first request that uses
            # it; the folded copies live as long as the cached tensors and count with them.
            folded = fold_ahead(state)
            self._tensors.put(sha256, state, sum(t.numel() * t.element_size()
                                                 for t in (*state.values(), *folded.values())))
            return state

        return self._flight.do(("tensors", sha256), fetch)[0]

    def _blob_tensors(self, view: PoolView, task: str = LIBRARY) -> dict[str, torch.Tensor]:
        """The tensors of the view's library (LIBRARY) or of one task's expert. A blob the registry
        reports corrupt or missing marks the pool version degraded and raises DataLoss naming the
        task; the next successful fetch (after the artifact was registered again) clears the mark."""
        sha = view.library_sha256 if task == LIBRARY else view.expert_sha256[task]
        try:
            state = self.tensors(sha)
        except (DataLoss, NotFound) as e:
            self._mark_broken(view, task, sha, e)
            what = "the library" if task == LIBRARY else f"the expert of task {task!r}"
            raise DataLoss(f"pool {view.ref}: {what} cannot be fetched (blob {sha}): {e}") from None
        if view.ref in self._broken:
            self._mark_repaired(view, task, sha)
        return state

    def _mark_broken(self, view: PoolView, task: str, sha: str, err: Exception) -> None:
        with self._lock:
            broken = self._broken.setdefault(view.ref, {})
            first_in_pool, new = not broken, broken.get(task) != sha
            broken[task] = sha
        if first_in_pool:
            metrics.COMPOSE_DEGRADED_POOLS.inc()
        if new:  # once per blob, not per request or warm-up retry (poe_compose_blob_errors_total counts those)
            what = "library" if task == LIBRARY else f"expert of task {task!r}"
            log.error("composer: pool %s is degraded: %s blob %s cannot be fetched: %s", view.ref, what, sha, err)

    def _mark_repaired(self, view: PoolView, task: str, sha: str) -> None:
        with self._lock:
            broken = self._broken.get(view.ref, {})
            if broken.get(task) != sha:
                return
            del broken[task]
            healed = not broken
            if healed:
                del self._broken[view.ref]
        if healed:
            metrics.COMPOSE_DEGRADED_POOLS.dec()
        log.info("composer: pool %s: blob %s fetched again%s", view.ref, sha, " (no longer degraded)" if healed else "")

    def degraded_tasks(self, ref: str) -> tuple[str, ...] | None:
        """None when every blob of the pool version `ref` (name@version) fetched fine last time, else
        the tasks whose expert blob failed (empty when only the library's did), in hierarchy order."""
        with self._lock:
            broken = dict(self._broken.get(ref, {}))
            view = self._views.get(ref)
        if not broken:
            return None
        order = list(view.pool.hierarchy.tasks) if view else sorted(broken)
        return tuple(t for t in order if t in broken)

    def _pool_with_tensors(self, view: PoolView, p: Plan) -> Pool:
        experts = dict(view.pool.experts)
        for t in p.tasks:
            experts[t] = dataclasses.replace(experts[t], state=self._blob_tensors(view, t))
        return dataclasses.replace(view.pool, library_state=self._blob_tensors(view), experts=experts)

    def clear_tensor_cache(self) -> None:
        """Forget every fetched tensor (the next composition fetches from the blob store again)."""
        self._tensors.clear()

    def clear_model_cache(self) -> None:
        """Forget every composed file (the next request for each composes it again)."""
        self._models.clear()

    # -- compose ---------------------------------------------------------------------------------
    def _plan(self, req: ComposeRequest, timer: StageTimer) -> tuple[PoolView, Plan]:
        with timer.stage("resolve"):
            check_request(req.classes, req.tasks)  # before the pool look-up
            view = self.view(req.pool)
            if self.on_cold_view is not None and view.ref not in self._warmed:
                self.on_cold_view(view)
            return view, plan(view.pool, list(req.classes), list(req.tasks))

    def _degradation(self, view: PoolView) -> dict:
        """The header's degraded fields for the view, as of now."""
        tasks = self.degraded_tasks(view.ref)
        return {"degraded": tasks is not None, "degraded_tasks": tasks or ()}

    def _header(self, view: PoolView, p: Plan, req: ComposeRequest) -> ComposeHeader:
        kept = {t: len(k) for t, k in zip(p.tasks, p.keep, strict=True)}
        accs = [(view.pool.experts[t].metrics.get("val_acc"), n) for t, n in kept.items()]
        expected = (sum(a * n for a, n in accs) / sum(n for _, n in accs)) if all(a is not None for a, _ in accs) \
            else 0.0
        flops = view.flops_library + sum(view.flops_expert_convs[t] + view.pool.experts[t].config.width * n
                                         for t, n in kept.items())
        # The weights' sha256s too: a version deleted and published again with other weights is
        # another model, never the cached one.
        weights = ",".join([view.library_sha256, *(view.expert_sha256[t] for t in p.tasks)])
        key = f"{view.ref}|{','.join(map(str, p.class_ids))}|{req.format}|{req.execution}|{weights}"
        return ComposeHeader(model_id=hashlib.sha256(key.encode()).hexdigest()[:16], pool=view.ref,
                             classes=p.class_names, class_ids=p.class_ids, tasks=p.tasks,
                             expert_ids=tuple(view.expert_ids[t] for t in p.tasks),
                             params=plan_params(view.pool, p, view.library_params, view.expert_params),
                             flops=flops, format=req.format, execution=req.execution,
                             input_shape=tuple(view.pool.input_shape), expected_accuracy=expected,
                             **self._degradation(view))

    def describe(self, req: ComposeRequest) -> Composition:
        view, p = self._plan(req, StageTimer())
        header = self._header(view, p, req)
        cached = self._models.get(header.model_id)
        if cached is not None:
            header = dataclasses.replace(cached.header, cache_hit=True, **self._degradation(view))
        return Composition(header)

    def compose(self, req: ComposeRequest, timer: StageTimer | None = None,
                check: Callable[[], None] = lambda: None) -> Composition:
        """Header and bytes for a request; `check` raises when the client has gone away."""
        if self.recorder is None:
            return self._compose(req, timer or StageTimer(), check)
        with self.recorder.composing():  # recordings wait for a pause in compositions
            return self._compose(req, timer or StageTimer(), check)

    def _compose(self, req: ComposeRequest, timer: StageTimer, check: Callable[[], None]) -> Composition:
        view, p = self._plan(req, timer)
        header = self._header(view, p, req)
        model_id = header.model_id
        cached = self._models.get(model_id)
        if cached is not None:
            metrics.CACHE_HITS.labels("model").inc()
            return Composition(dataclasses.replace(cached.header, cache_hit=True, **self._degradation(view)),
                               cached.data)
        metrics.CACHE_MISSES.labels("model").inc()
        check()
        comp, shared = self._flight.do(("model", model_id), lambda: self._build(view, p, req, header, timer, check))
        return Composition(dataclasses.replace(comp.header, cache_hit=True), comp.data) if shared else comp

    def _build(self, view: PoolView, p: Plan, req: ComposeRequest, header: ComposeHeader, timer: StageTimer,
               check: Callable[[], None]) -> Composition:
        fused = req.execution == "fused"
        with timer.stage("fetch"):
            pool = self._pool_with_tensors(view, p)
        check()
        with timer.stage("consolidate"):
            state = composed_state(pool, p, fused)
        with timer.stage("serialize"):
            if req.format in TEMPLATED_FORMATS and not self.scripts.has_template(
                    state, req.format, pool.input_shape, architecture_key(pool)):
                metrics.COMPOSE_TEMPLATE_MISSES.labels(req.format).inc()  # this request waits for an export
            data, meta = serialize(pool, p, state, req.execution, req.format, self.scripts)
        header = dataclasses.replace(header, size=len(data), sha256=sha256_hex(data), metadata=meta)
        comp = Composition(header, data)
        self._models.put(header.model_id, comp, len(data))
        self._record(view, p, req, comp)
        return comp

    # -- the registry's composed-model cache -----------------------------------------------------
    @staticmethod
    def _cache_format(req: ComposeRequest) -> str:
        return f"{req.format}.{req.execution}"

    def _record(self, view: PoolView, p: Plan, req: ComposeRequest, comp: Composition) -> None:
        """Queue the file for recording in the registry; never blocks or fails a request (a full
        queue drops it, counted in poe_compose_recordings_total: see poe_services.composer.recorder)."""
        if self.recorder is None:
            return
        upload = ComposedUpload(view.ref, tuple(p.class_ids), self._cache_format(req), comp.data,
                                comp.header.metadata, comp.header.sha256)  # hashed once, when it was built
        self.recorder.submit(comp.header.model_id, upload, len(comp.data))

    # -- warm-up ---------------------------------------------------------------------------------
    def warm(self, ref: str = "", formats: tuple[str, ...] = ("torchscript",)) -> PoolView:
        """Warm the pool version `ref` resolves to (the default pool for ""); see `warm_view`."""
        return self.warm_view(self.view(ref), formats)

    def warm_view(self, view: PoolView, formats: tuple[str, ...] = ("torchscript",),
                  stopping: Callable[[], bool] = lambda: False) -> PoolView:
        """Fetch a pool's tensors, script each structure and save an archive template for every
        tensor layout of the fused execution (n experts keeping k classes), so that no request
        waits for TorchScript. Layouts beyond the template cache's bytes stay lazy.

        A corrupt or missing blob does not stop it: the pool version is marked degraded (see
        `degraded_tasks`) and the layouts of its healthy experts are warmed. Unavailable (the
        registry is down) propagates, and the pool is not counted as warm. When `stopping()` turns
        true (shutdown) it returns between two layouts, without counting the pool as warm."""
        pool = view.pool
        if not pool.experts:
            raise NotFound(f"pool {view.ref} has no experts")
        try:
            self._blob_tensors(view)
        except DataLoss:  # marked and logged: no composition of this version can succeed
            self._warmed.add(view.ref)
            return view
        healthy = []
        for t in pool.experts:
            try:
                self._blob_tensors(view, t)
                healthy.append(t)
            except DataLoss:
                pass  # marked and logged; the other tasks still compose
        largest_first = sorted(healthy, key=lambda t: -len(pool.hierarchy.tasks[t]))
        for n in range(1, len(largest_first) + 1):
            kept = {t: list(pool.hierarchy.tasks[t]) for t in largest_first[:n]}
            while True:  # every total from all the n tasks' classes down to one each
                if stopping():
                    return view
                p = plan(pool, classes=[c for ids in kept.values() for c in ids])
                full = self._pool_with_tensors(view, p)
                for fmt in formats:  # pt2 and onnx templates take 1-3 s each: warmed only when asked
                    self.scripts.template(composed_state(full, p, True), lambda full=full, p=p: build(full, p, True),
                                          fmt, pool.input_shape, architecture_key(pool))
                shrink = next((t for t in kept if len(kept[t]) > 1), None)
                if shrink is None or self.scripts.full:  # at least each structure is scripted
                    break
                kept[shrink].pop()
        self._warmed.add(view.ref)
        return view

    def is_warm(self, ref: str) -> bool:
        """Whether `warm_view` completed for the pool version `ref` (name@version)."""
        return ref in self._warmed

    def has_room_for(self, view: PoolView) -> bool:
        """Whether warming `view` would keep within the template and tensor caches (it would
        otherwise push out what earlier, more important pools warmed)."""
        return not self.scripts.full and self._tensors.size_bytes + view.blob_bytes <= self._tensors.max_bytes
