"""The gRPC surface of `poe.v1.Registry`: convert messages, call `core.Registry`, convert back.

No status codes here: domain errors propagate to `poe_services.errors.ErrorInterceptor`. Every
request field is checked against `poe.engine.limits` on its way in (here or in the store), and
List pages are cut by their records' size as served, so every answer fits a message.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from poe.contract import STATES, hierarchy_from_message, hierarchy_message, request_refs, state_name, state_value
from poe.engine import limits
from poe.engine.errors import field_error, within
from poe.engine.hierarchy import Hierarchy
from poe.v1 import common_pb2 as c
from poe.v1 import registry_pb2 as r
from poe.v1 import registry_pb2_grpc
from poe_services.auth import UploadQuota
from poe_services.registry import entities as e
from poe_services.registry import validation as v
from poe_services.registry.blobstore import CHUNK_SIZE
from poe_services.registry.core import Registry

MAX_COMPOSED_BATCH = 64  # entries of one PutComposedModels (each small: the message size bounds them too)
SERVICE_NAME = r.DESCRIPTOR.services_by_name["Registry"].full_name  # "poe.v1.Registry"

# -- entity -> message ---------------------------------------------------------------------------

def _ts(dt: datetime | None) -> Timestamp | None:
    if dt is None:
        return None
    t = Timestamp()
    t.FromDatetime(dt)
    return t


_json = limits.served_json  # the form the JSON limits measure


def blob_pb(b: e.Blob | None) -> c.BlobRef | None:
    return c.BlobRef(sha256=b.sha256, size=b.size, media_type=b.media_type) if b else None


def oracle_pb(o: e.Oracle) -> r.Oracle:
    return r.Oracle(id=o.id, name=o.name, dataset=o.dataset, config_json=_json(o.config), params=o.params,
                    metrics_json=_json(o.metrics), blob=blob_pb(o.blob), create_time=_ts(o.created_at))


def library_pb(lib: e.Library) -> r.Library:
    return r.Library(id=lib.id, name=lib.name, dataset=lib.dataset, oracle_id=lib.oracle_id or 0,
                     config_json=_json(lib.config), params=lib.params, metrics_json=_json(lib.metrics),
                     loss_json=_json(lib.loss), blob=blob_pb(lib.blob), create_time=_ts(lib.created_at))


def expert_pb(x: e.Expert) -> r.Expert:
    return r.Expert(id=x.id, library_id=x.library_id, dataset=x.dataset, hierarchy_version=x.hierarchy_version,
                    task=x.task, class_ids=list(x.class_ids), class_names=list(x.class_names),
                    config_json=_json(x.config), params=x.params, val_accuracy=x.val_accuracy,
                    metrics_json=_json(x.metrics), loss_json=_json(x.loss), blob=blob_pb(x.blob),
                    create_time=_ts(x.created_at))


def pool_pb(p: e.PoolVersion) -> r.PoolVersion:
    return r.PoolVersion(name=p.name, version=p.version, aliases=list(p.aliases), dataset=p.dataset,
                         hierarchy=hierarchy_message(p.hierarchy), library=library_pb(p.library),
                         experts=[expert_pb(x) for x in p.experts], info_json=_json(p.info),
                         description=p.description, publish_time=_ts(p.published_at), params=p.params)


class PoolMessages:
    """`pool_pb` of pool versions, each built once (a thousand experts take tens of ms): a
    published version never changes but for its aliases, which are set on a copy per call."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._items: OrderedDict[tuple, r.PoolVersion] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, p: e.PoolVersion) -> r.PoolVersion:
        key = (p.name, p.version, p.published_at)  # a version published again has another time
        with self._lock:
            base = self._items.get(key)
        if base is None:
            base = pool_pb(dataclasses.replace(p, aliases=()))
            with self._lock:
                self._items[key] = base
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
        msg = r.PoolVersion()
        msg.CopyFrom(base)
        msg.aliases.extend(p.aliases)
        return msg


def composed_pb(m: e.ComposedModel) -> r.ComposedModel:
    return r.ComposedModel(pool=m.pool, class_ids=list(m.class_ids), format=m.format, blob=blob_pb(m.blob),
                           hits=m.hits, metadata_json=_json(m.metadata), create_time=_ts(m.created_at),
                           last_hit_time=_ts(m.last_hit_at))


def job_pb(j: e.ExtractionJob) -> c.ExtractionJob:
    return c.ExtractionJob(id=j.id, state=state_value(j.state), progress=j.progress, stage=j.stage,
                           message=j.message, params_json=_json(j.params), error=j.error, oracle_id=j.oracle_id or 0,
                           pool=j.pool or "", create_time=_ts(j.created_at), update_time=_ts(j.updated_at))


# -- message -> domain ---------------------------------------------------------------------------

def _check_fits(field: str, message, what: str) -> None:
    """InvalidArgument unless `message` (a record about to be stored) can be served back whole."""
    size = message.ByteSize()
    if size > limits.MAX_RECORD_BYTES:
        raise field_error(field, f"{what} would take {size} bytes as served; at most {limits.MAX_RECORD_BYTES}")


def _job_state(value: int, field: str = "state") -> e.JobState:
    """The JobState of an ExtractionState enum value; InvalidArgument for UNSPECIFIED or unknown."""
    name = state_name(value)
    if name not in STATES:
        raise field_error(field, f"unknown or unspecified state {value}")
    return e.JobState(name)


@dataclass(frozen=True)
class _PoolOutline:
    """What `poe.engine.compose.plan` reads of a pool: no weights, no network configs."""

    ref: str
    hierarchy: Hierarchy
    experts: dict[str, e.Expert]  # task -> expert


def _upload(request_iterator, kind: str):
    """(metadata, chunk iterator) of a client-streaming upload: metadata first, then chunks."""
    it = iter(request_iterator)
    first = next(it, None)
    if first is None or first.WhichOneof("payload") != "metadata":
        raise field_error("metadata", f"the first message of a {kind} upload must carry the metadata")

    def chunks() -> Iterator[bytes]:
        for msg in it:
            if msg.WhichOneof("payload") != "chunk":
                raise field_error("metadata", "sent more than once (only the first message carries it)")
            if len(msg.chunk) > CHUNK_SIZE:
                raise field_error("chunk", f"{len(msg.chunk)} bytes; at most {CHUNK_SIZE} (1 MiB) per message")
            yield msg.chunk

    return first.metadata, chunks()


def oracle_spec(m: r.OracleMetadata) -> e.OracleSpec:
    return e.OracleSpec(m.name, m.dataset, v.parse_json_object(m.config_json, "config_json"), m.params,
                        v.parse_json_object(m.metrics_json, "metrics_json"))


def library_spec(m: r.LibraryMetadata) -> e.LibrarySpec:
    return e.LibrarySpec(m.name, m.dataset, v.parse_json_object(m.config_json, "config_json"), m.oracle_id or None,
                         m.params, v.parse_json_object(m.metrics_json, "metrics_json"),
                         v.parse_json_object(m.loss_json, "loss_json"))


def expert_spec(m: r.ExpertMetadata) -> e.ExpertSpec:
    return e.ExpertSpec(m.library_id, m.hierarchy_version, m.task, tuple(m.class_ids),
                        v.parse_json_object(m.config_json, "config_json"), m.params,
                        m.val_accuracy if m.HasField("val_accuracy") else None,
                        v.parse_json_object(m.metrics_json, "metrics_json"),
                        v.parse_json_object(m.loss_json, "loss_json"))


def composed_spec(m: r.ComposedModelMetadata) -> e.ComposedModelSpec:
    return e.ComposedModelSpec(m.pool, tuple(m.class_ids), m.format,
                               v.parse_json_object(m.metadata_json, "metadata_json", limits.MAX_LARGE_JSON_BYTES))


def _opt(value):
    return value if value else None


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    def __init__(self, registry: Registry, upload_quota: UploadQuota,
                 pools_changed: Callable[[], None] = lambda: None):
        self.registry = registry
        self.store = registry.store
        self.upload_quota = upload_quota
        self.pools_changed = pools_changed  # after a publication or an alias move, once committed
        self.pool_message = PoolMessages()

    # -- hierarchies -------------------------------------------------------------------------------

    def RegisterHierarchy(self, request, context):
        if not request.HasField("hierarchy"):
            raise field_error("hierarchy", "required")
        h, created = self.store.add_hierarchy(hierarchy_from_message(request.hierarchy))
        return r.RegisterHierarchyResponse(hierarchy=hierarchy_message(h), created=created)

    def GetHierarchy(self, request, context):
        v.name(request.dataset, "dataset", "data set name")
        return r.GetHierarchyResponse(hierarchy=hierarchy_message(self.store.get_hierarchy(request.dataset,
                                                                                           request.version or None)))

    # -- artifacts ---------------------------------------------------------------------------------

    def _register(self, request_iterator, kind: str, spec_of: Callable[[Any], e.ArtifactSpec]):
        """Register the artifact of an upload: (record, created)."""
        m, chunks = _upload(request_iterator, kind)
        with self.upload_quota.reserve(m.size):
            return self.registry.register(spec_of(m), m.sha256, m.size, chunks)

    def RegisterOracle(self, request_iterator, context):
        oracle, created = self._register(request_iterator, "oracle", oracle_spec)
        return r.RegisterOracleResponse(oracle=oracle_pb(oracle), created=created)

    def GetOracle(self, request, context):
        return r.GetOracleResponse(oracle=oracle_pb(self.store.get_oracle(v.positive_id(request.id, "id"))))

    def RegisterLibrary(self, request_iterator, context):
        lib, created = self._register(request_iterator, "library", library_spec)
        return r.RegisterLibraryResponse(library=library_pb(lib), created=created)

    def GetLibrary(self, request, context):
        return r.GetLibraryResponse(library=library_pb(self.store.get_library(v.positive_id(request.id, "id"))))

    def RegisterExpert(self, request_iterator, context):
        x, created = self._register(request_iterator, "expert", expert_spec)
        return r.RegisterExpertResponse(expert=expert_pb(x), created=created)

    def GetExpert(self, request, context):
        return r.GetExpertResponse(expert=expert_pb(self.store.get_expert(v.positive_id(request.id, "id"))))

    def ListExperts(self, request, context):
        flt = e.ExpertFilter(_opt(request.dataset), _opt(request.class_name), _opt(request.task),
                             _opt(request.library_id), _opt(request.pool))
        page = self.store.list_experts(flt, request.page_size, request.page_token,
                                       item_bytes=lambda x: expert_pb(x).ByteSize())
        return r.ListExpertsResponse(experts=[expert_pb(x) for x in page.items], next_page_token=page.next_page_token)

    # -- pools -------------------------------------------------------------------------------------

    def PublishPool(self, request, context):
        spec = e.PoolSpec(request.name, request.version, request.library_id, tuple(request.expert_ids),
                          v.parse_json_object(request.info_json, "info_json"), request.description,
                          tuple(request.aliases))
        pool, created = self.store.publish_pool(spec, check=lambda p: _check_fits(
            "expert_ids", pool_pb(p), f"pool {p.ref} with its hierarchy, library and {len(p.experts)} experts"))
        self.pools_changed()
        return r.PublishPoolResponse(pool=pool_pb(pool), created=created)

    def GetPool(self, request, context):
        return r.GetPoolResponse(pool=self.pool_message(self.store.get_pool(request.pool)))

    def ListPools(self, request, context):
        flt = e.PoolFilter(_opt(request.name), _opt(request.dataset), _opt(request.class_name), _opt(request.alias))
        page = self.store.list_pools(flt, request.page_size, request.page_token,
                                     item_bytes=lambda p: self.pool_message(p).ByteSize())
        return r.ListPoolsResponse(pools=[self.pool_message(p) for p in page.items],
                                   next_page_token=page.next_page_token)

    def SetPoolAlias(self, request, context):
        pool = self.store.set_alias(request.name, request.alias, request.version)
        self.pools_changed()
        return r.SetPoolAliasResponse(pool=pool_pb(pool))

    def DeletePoolAlias(self, request, context):
        self.store.delete_alias(request.name, request.alias)
        return r.DeletePoolAliasResponse()

    def DeletePoolVersion(self, request, context):
        dropped = self.store.delete_pool_version(request.name, request.version)
        return r.DeletePoolVersionResponse(deleted_cache_entries=dropped)

    def ResolveClasses(self, request, context):
        # The composer's resolution, so that a request gets the same answer and the same errors
        # here as from ComposeModel. Imported on first use: it loads torch, which nothing else in
        # the registry needs.
        from poe.engine.compose import check_request, plan

        classes, tasks = request_refs(request.classes, request.tasks)
        check_request(classes, tasks)  # before the pool look-up, as in ComposeModel
        pool = self.store.get_pool(request.pool)
        experts = {x.task: x for x in pool.experts}
        p = plan(_PoolOutline(pool.ref, pool.hierarchy, experts), list(classes), list(tasks))  # type: ignore[arg-type]
        return r.ResolveClassesResponse(pool=pool.ref, class_ids=p.class_ids, class_names=p.class_names,
                                        library=library_pb(pool.library), info_json=_json(pool.info),
                                        experts=[expert_pb(experts[t]) for t in p.tasks])

    # -- blobs -------------------------------------------------------------------------------------

    def Download(self, request, context):
        blob, chunks = self.registry.download(request.sha256, request.offset, request.length)
        first = True
        for offset, data in chunks:
            yield r.DownloadResponse(blob=blob_pb(blob) if first else None, offset=offset, data=data)
            first = False
        if first:  # empty blob or empty range: still say what the blob is
            yield r.DownloadResponse(blob=blob_pb(blob), offset=request.offset)

    # -- composed-model cache ----------------------------------------------------------------------

    def PutComposedModel(self, request_iterator, context):
        model, created = self._register(request_iterator, "composed model", composed_spec)
        return r.PutComposedModelResponse(model=composed_pb(model), created=created)

    def PutComposedModels(self, request, context):
        n = len(request.models)
        if not 0 < n <= MAX_COMPOSED_BATCH:
            raise field_error("models", f"{n} entries; 1 to {MAX_COMPOSED_BATCH} per call")
        uploads = []
        for i, u in enumerate(request.models):
            with within(f"models[{i}].metadata"):
                spec = composed_spec(u.metadata)
            uploads.append((spec, u.metadata.sha256, u.metadata.size, u.data))
        with self.upload_quota.reserve(sum(len(u.data) for u in request.models)):
            results = self.registry.register_composed_models(uploads)
        return r.PutComposedModelsResponse(results=[r.PutComposedModelResponse(model=composed_pb(m), created=created)
                                                    for m, created in results])

    def GetComposedModel(self, request, context):
        model = self.store.get_composed_model(request.pool, list(request.class_ids), request.format)
        return r.GetComposedModelResponse(model=composed_pb(model))

    # -- extraction jobs ---------------------------------------------------------------------------

    def CreateExtractionJob(self, request, context):
        job = self.store.create_job(v.parse_json_object(request.params_json, "params_json",
                                                        limits.MAX_LARGE_JSON_BYTES),
                                    request.oracle_id or None, request.job_id or None)
        return r.CreateExtractionJobResponse(job=job_pb(job))

    def UpdateExtractionJob(self, request, context):
        upd = e.JobUpdate(
            state=_job_state(request.state) if request.HasField("state") else None,
            progress=request.progress if request.HasField("progress") else None,
            stage=request.stage if request.HasField("stage") else None,
            message=request.message if request.HasField("message") else None,
            error=request.error if request.HasField("error") else None,
            oracle_id=request.oracle_id if request.HasField("oracle_id") else None,
            pool=request.pool if request.HasField("pool") else None)
        return r.UpdateExtractionJobResponse(job=job_pb(self.store.update_job(request.job_id, upd)))

    def GetExtractionJob(self, request, context):
        return r.GetExtractionJobResponse(job=job_pb(self.store.get_job(request.job_id)))

    def ListExtractionJobs(self, request, context):
        state = _job_state(request.state) if request.state != c.EXTRACTION_STATE_UNSPECIFIED else None
        page = self.store.list_jobs(state, request.page_size, request.page_token,
                                    item_bytes=lambda j: job_pb(j).ByteSize())
        return r.ListExtractionJobsResponse(jobs=[job_pb(j) for j in page.items], next_page_token=page.next_page_token)

    # -- lineage -----------------------------------------------------------------------------------

    def GetLineage(self, request, context):
        nodes = self.store.lineage(request.kind, request.id)
        return r.GetLineageResponse(nodes=[r.LineageNode(kind=n.kind, id=n.id, name=n.name, blob=blob_pb(n.blob))
                                           for n in nodes])
