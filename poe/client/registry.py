"""A small typed client of `poe.v1.Registry`, used by the composer, the extractor and the CLI.

    with RegistryClient("127.0.0.1:50051") as reg:
        pv = reg.import_pool("pools/fashion-mnist")          # poe.v1.PoolVersion
        res = reg.resolve_classes("fashion-mnist", ["Sandal", "Bag"])
        weights = reg.download(res.library.blob.sha256)      # bytes, sha256 verified

Every method raises `poe.engine.errors` exceptions (NotFound, InvalidArgument, Unavailable, DataLoss, ...)
instead of grpc.RpcError. Results are the generated protobuf messages (typed through the .pyi
stubs). Uploads send the metadata first, then the bytes in chunks of 1 MiB. Downloads are checked
against their sha256 here as well as on the server.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from poe.client.base import GrpcClient
from poe.contract import hierarchy_from_message, hierarchy_message, state_value
from poe.engine.errors import AlreadyExists, DataLoss, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from poe.engine.manifest import FORMAT, MANIFEST, read_manifest
from poe.v1 import common_pb2 as c
from poe.v1 import registry_pb2 as r
from poe.v1 import registry_pb2_grpc

if TYPE_CHECKING:
    import torch

    from poe.engine.hierarchy import Hierarchy

CHUNK_SIZE = 1 << 20
BATCH_BYTES = 6 << 20  # composed models up to this size (in all) go in one PutComposedModels call (of 8 MiB)
BATCH_MODELS = 64  # and at most this many


def _json(d: dict | None) -> str:
    return json.dumps(d, sort_keys=True) if d else ""


@dataclass(frozen=True)
class ComposedUpload:
    """A composed model to record (`put_composed_models`)."""

    pool: str  # name@version
    class_ids: tuple[int, ...]
    format: str
    data: bytes
    metadata: dict | None = None
    sha256: str = ""  # of `data`, when the caller has it already (hashed here otherwise)


def _composed_metadata(m: ComposedUpload) -> r.ComposedModelMetadata:
    return r.ComposedModelMetadata(pool=m.pool, class_ids=list(m.class_ids), format=m.format,
                                   metadata_json=_json(m.metadata),
                                   sha256=m.sha256 or hashlib.sha256(m.data).hexdigest(), size=len(m.data))


class RegistryClient(GrpcClient):
    SERVICE = r.DESCRIPTOR.services_by_name["Registry"]
    STUB = registry_pb2_grpc.RegistryStub
    ADDRESS_SETTING = "registry_addr"
    DEFAULT_TIMEOUT = 60.0
    # GetComposedModel is a read but counts a hit; the writes are not retried (GrpcClient says why).
    RETRYABLE = ("GetHierarchy", "GetOracle", "GetLibrary", "GetExpert", "ListExperts", "GetPool", "ListPools",
                 "ResolveClasses", "Download", "GetExtractionJob", "ListExtractionJobs", "GetLineage")

    def _upload(self, method: Callable, request_cls, metadata, data: bytes):
        """A client-streaming upload: the metadata, then the bytes in chunks of CHUNK_SIZE."""
        def requests() -> Iterator:
            yield request_cls(metadata=metadata)
            for i in range(0, len(data), CHUNK_SIZE):
                yield request_cls(chunk=data[i:i + CHUNK_SIZE])

        return self._call(method, requests())

    # -- hierarchies -------------------------------------------------------------------------------

    def register_hierarchy(self, hierarchy: Hierarchy) -> tuple[c.Hierarchy, bool]:
        resp = self._call(self.stub.RegisterHierarchy,
                          r.RegisterHierarchyRequest(hierarchy=hierarchy_message(hierarchy)))
        return resp.hierarchy, resp.created

    def get_hierarchy(self, dataset: str, version: int = 0) -> c.Hierarchy:
        return self._call(self.stub.GetHierarchy, r.GetHierarchyRequest(dataset=dataset, version=version)).hierarchy

    # -- artifacts ---------------------------------------------------------------------------------

    def register_oracle(self, name: str, dataset: str, config: dict, data: bytes, *, params: int = 0,
                        metrics: dict | None = None) -> tuple[r.Oracle, bool]:
        meta = r.OracleMetadata(name=name, dataset=dataset, config_json=_json(config), params=params,
                                metrics_json=_json(metrics), sha256=hashlib.sha256(data).hexdigest(), size=len(data))
        resp = self._upload(self.stub.RegisterOracle, r.RegisterOracleRequest, meta, data)
        return resp.oracle, resp.created

    def register_library(self, name: str, dataset: str, config: dict, data: bytes, *, oracle_id: int | None = None,
                         params: int = 0, metrics: dict | None = None,
                         loss: dict | None = None) -> tuple[r.Library, bool]:
        meta = r.LibraryMetadata(name=name, dataset=dataset, oracle_id=oracle_id or 0, config_json=_json(config),
                                 params=params, metrics_json=_json(metrics), loss_json=_json(loss),
                                 sha256=hashlib.sha256(data).hexdigest(), size=len(data))
        resp = self._upload(self.stub.RegisterLibrary, r.RegisterLibraryRequest, meta, data)
        return resp.library, resp.created

    def register_expert(self, library_id: int, hierarchy_version: int, task: str, class_ids: Sequence[int],
                        config: dict, data: bytes, *, params: int = 0, val_accuracy: float | None = None,
                        metrics: dict | None = None, loss: dict | None = None) -> tuple[r.Expert, bool]:
        meta = r.ExpertMetadata(library_id=library_id, hierarchy_version=hierarchy_version, task=task,
                                class_ids=list(class_ids), config_json=_json(config), params=params,
                                val_accuracy=val_accuracy, metrics_json=_json(metrics), loss_json=_json(loss),
                                sha256=hashlib.sha256(data).hexdigest(), size=len(data))
        resp = self._upload(self.stub.RegisterExpert, r.RegisterExpertRequest, meta, data)
        return resp.expert, resp.created

    def get_oracle(self, oracle_id: int) -> r.Oracle:
        return self._call(self.stub.GetOracle, r.GetOracleRequest(id=oracle_id)).oracle

    def get_library(self, library_id: int) -> r.Library:
        return self._call(self.stub.GetLibrary, r.GetLibraryRequest(id=library_id)).library

    def get_expert(self, expert_id: int) -> r.Expert:
        return self._call(self.stub.GetExpert, r.GetExpertRequest(id=expert_id)).expert

    def list_experts(self, *, dataset: str = "", class_name: str = "", task: str = "", library_id: int = 0,
                     pool: str = "", page_size: int = 0) -> Iterator[r.Expert]:
        """All matching experts (follows the pages)."""
        return self._list(self.stub.ListExperts, r.ListExpertsRequest, "experts", dataset=dataset,
                          class_name=class_name, task=task, library_id=library_id, pool=pool, page_size=page_size)

    # -- pools -------------------------------------------------------------------------------------

    def publish_pool(self, name: str, version: str, library_id: int, expert_ids: Iterable[int], *,
                     info: dict | None = None, description: str = "",
                     aliases: Iterable[str] = ()) -> tuple[r.PoolVersion, bool]:
        resp = self._call(self.stub.PublishPool, r.PublishPoolRequest(
            name=name, version=version, library_id=library_id, expert_ids=list(expert_ids), info_json=_json(info),
            description=description, aliases=list(aliases)))
        return resp.pool, resp.created

    def get_pool(self, ref: str) -> r.PoolVersion:
        """"name", "name@version" or "name@alias"."""
        return self._call(self.stub.GetPool, r.GetPoolRequest(pool=ref)).pool

    def list_pools(self, *, name: str = "", dataset: str = "", class_name: str = "", alias: str = "",
                   page_size: int = 0) -> Iterator[r.PoolVersion]:
        return self._list(self.stub.ListPools, r.ListPoolsRequest, "pools", name=name, dataset=dataset,
                          class_name=class_name, alias=alias, page_size=page_size)

    def set_alias(self, name: str, alias: str, version: str) -> r.PoolVersion:
        return self._call(self.stub.SetPoolAlias, r.SetPoolAliasRequest(name=name, alias=alias, version=version)).pool

    def delete_alias(self, name: str, alias: str) -> None:
        self._call(self.stub.DeletePoolAlias, r.DeletePoolAliasRequest(name=name, alias=alias))

    def delete_pool_version(self, name: str, version: str) -> int:
        return self._call(self.stub.DeletePoolVersion,
                          r.DeletePoolVersionRequest(name=name, version=version)).deleted_cache_entries

    def resolve_classes(self, pool: str, classes: Iterable[str | int] = (),
                        tasks: Iterable[str] = ()) -> r.ResolveClassesResponse:
        """Class names (or ids) and task names -> class ids, library and covering experts."""
        return self._call(self.stub.ResolveClasses, r.ResolveClassesRequest(
            pool=pool, classes=[str(x) for x in classes], tasks=list(tasks)))

    # -- blobs -------------------------------------------------------------------------------------

    def download(self, sha256: str, *, offset: int = 0, length: int = 0) -> bytes:
        """A blob's bytes; a whole download is verified against its sha256 (DataLoss otherwise)."""
        data = b"".join(msg.data for msg in self._stream(
            self.stub.Download, r.DownloadRequest(sha256=sha256, offset=offset, length=length)))
        if offset == 0 and length == 0 and hashlib.sha256(data).hexdigest() != sha256:
            raise DataLoss(f"blob {sha256[:12]}...: downloaded bytes do not match their sha256")
        return data

    def download_file(self, sha256: str, path: str | Path, *, size: int | None = None) -> int:
        """Stream a blob into `path` while hashing it; returns its size. The file is removed again and
        DataLoss raised when the bytes do not match `sha256` (or `size`, when given)."""
        path = Path(path)
        digest, written = hashlib.sha256(), 0
        try:
            with path.open("wb") as f:
                for msg in self._stream(self.stub.Download, r.DownloadRequest(sha256=sha256)):
                    digest.update(msg.data)
                    f.write(msg.data)
                    written += len(msg.data)
            if digest.hexdigest() != sha256 or (size is not None and written != size):
                raise DataLoss(f"blob {sha256[:12]}...: downloaded {written} bytes that do not match "
                               f"their sha256" + ("" if size is None else f" and size {size}"))
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return written

    def download_tensors(self, sha256: str) -> dict[str, torch.Tensor]:
        """A safetensors blob as a state dict (never unpickled)."""
        from poe.engine.pool import tensors_from_bytes

        return tensors_from_bytes(self.download(sha256), sha256, f"blob {sha256[:12]}...")

    # -- composed-model cache ----------------------------------------------------------------------

    def put_composed_model(self, pool: str, class_ids: Sequence[int], fmt: str, data: bytes, *,
                           metadata: dict | None = None) -> tuple[r.ComposedModel, bool]:
        meta = _composed_metadata(ComposedUpload(pool, tuple(class_ids), fmt, data, metadata))
        resp = self._upload(self.stub.PutComposedModel, r.PutComposedModelRequest, meta, data)
        return resp.model, resp.created

    def put_composed_models(self, models: Sequence[ComposedUpload]) -> list[tuple[r.ComposedModel, bool]]:
        """Record several composed models, in the given order: the small ones in PutComposedModels
        calls of at most BATCH_BYTES (each call all or none), a larger one with its own upload."""
        results: list[tuple[r.ComposedModel, bool] | None] = [None] * len(models)
        batch: list[int] = []
        size = 0

        def send() -> None:
            req = r.PutComposedModelsRequest(models=[r.ComposedModelUpload(
                metadata=_composed_metadata(models[i]), data=models[i].data) for i in batch])
            for i, res in zip(batch, self._call(self.stub.PutComposedModels, req).results, strict=True):
                results[i] = (res.model, res.created)
            batch.clear()

        for i, m in enumerate(models):
            if len(m.data) > BATCH_BYTES:
                results[i] = self.put_composed_model(m.pool, m.class_ids, m.format, m.data, metadata=m.metadata)
                continue
            if batch and (size + len(m.data) > BATCH_BYTES or len(batch) == BATCH_MODELS):
                send()
                size = 0
            batch.append(i)
            size += len(m.data)
        if batch:
            send()
        return results  # type: ignore[return-value]

    def get_composed_model(self, pool: str, class_ids: Sequence[int], fmt: str) -> r.ComposedModel | None:
        """The cached entry (counting a hit), or None when nothing is cached for the key."""
        try:
            return self._call(self.stub.GetComposedModel,
                              r.GetComposedModelRequest(pool=pool, class_ids=list(class_ids), format=fmt)).model
        except NotFound:
            return None

    # -- extraction jobs ---------------------------------------------------------------------------

    def create_job(self, params: dict, *, oracle_id: int | None = None, job_id: str = "") -> c.ExtractionJob:
        return self._call(self.stub.CreateExtractionJob, r.CreateExtractionJobRequest(
            job_id=job_id, params_json=_json(params), oracle_id=oracle_id or 0)).job

    def update_job(self, job_id: str, *, state: str | None = None, progress: float | None = None,
                   stage: str | None = None, message: str | None = None, error: str | None = None,
                   oracle_id: int | None = None, pool: str | None = None) -> c.ExtractionJob:
        req = r.UpdateExtractionJobRequest(job_id=job_id, state=state_value(state) if state else None,
                                           progress=progress, stage=stage, message=message, error=error,
                                           oracle_id=oracle_id, pool=pool)
        return self._call(self.stub.UpdateExtractionJob, req).job

    def get_job(self, job_id: str) -> c.ExtractionJob:
        return self._call(self.stub.GetExtractionJob, r.GetExtractionJobRequest(job_id=job_id)).job

    def list_jobs(self, state: str | None = None, page_size: int = 0) -> Iterator[c.ExtractionJob]:
        return self._list(self.stub.ListExtractionJobs, r.ListExtractionJobsRequest, "jobs", state=state_value(state),
                          page_size=page_size)

    def lineage(self, kind: str, ident: str | int) -> list[r.LineageNode]:
        return list(self._call(self.stub.GetLineage, r.GetLineageRequest(kind=kind, id=str(ident))).nodes)

    # -- pools from disk ---------------------------------------------------------------------------

    def import_pool(self, directory: str | Path, *, aliases: Iterable[str] = (),
                    progress: Callable[[str], None] | None = None) -> tuple[r.PoolVersion, bool]:
        """Register a pool directory (pool.json + safetensors; see poe.engine.pool) and publish it.

        The files' bytes are uploaded as they are on disk, after checking them against the sha256
        in pool.json (DataLoss on mismatch). Importing the same directory again is idempotent.
        """
        try:
            return self._import_pool(Path(directory), tuple(aliases), progress)
        except (KeyError, TypeError, AttributeError) as e:
            raise InvalidArgument(f"{directory}/pool.json: malformed manifest ({type(e).__name__}: {e})") from None

    def _import_pool(self, root: Path, aliases: tuple[str, ...],
                     progress: Callable[[str], None] | None) -> tuple[r.PoolVersion, bool]:
        from poe.engine import hierarchy as hierarchy_mod

        m = read_manifest(root)
        name, version = str(m["name"]), str(m["version"])
        info = dict(m.get("info") or {})
        hier = hierarchy_mod.load(root / m.get("hierarchy", "hierarchy.yaml"))
        say = progress or (lambda _msg: None)
        steps = 3 + len(m["experts"]) + ("oracle" in m)
        step = 0

        def tick(msg: str) -> None:
            nonlocal step
            step += 1
            say(f"[{step}/{steps}] {msg}")

        def read(entry: dict) -> bytes:
            path = root / entry["file"]
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise NotFound(f"{path}: missing") from None
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise DataLoss(f"{path}: sha256 does not match pool.json (corrupted file)")
            return data

        self.register_hierarchy(hier)
        tick(f"hierarchy {hier.dataset} v{hier.version}")
        oracle_id = None
        if "oracle" in m:
            o = m["oracle"]
            oracle, _ = self.register_oracle(f"{name}@{version}/oracle", hier.dataset, o["config"], read(o),
                                             params=int(o.get("params", 0)),
                                             metrics=o.get("metrics") or _metrics(info.get("oracle")))
            oracle_id = oracle.id
            tick(f"oracle {oracle.id} ({oracle.params:,} params)")
        lib_entry = m["library"]
        library, _ = self.register_library(f"{name}@{version}/library", hier.dataset, lib_entry["student_config"],
                                           read(lib_entry), oracle_id=oracle_id,
                                           params=int(lib_entry.get("params", 0)),
                                           metrics=lib_entry.get("metrics") or _metrics(info.get("student")),
                                           loss=lib_entry.get("loss") or {})
        tick(f"library {library.id} ({library.params:,} params)")
        expert_ids = []
        for x in m["experts"]:
            metrics = dict(x.get("metrics") or {})
            acc = metrics.get("val_acc")
            expert, _ = self.register_expert(library.id, hier.version, x["task"], x["class_ids"], x["config"], read(x),
                                             params=int(x.get("params", 0)),
                                             val_accuracy=float(acc) if acc is not None else None,
                                             metrics=metrics, loss=x.get("loss") or {})
            expert_ids.append(expert.id)
            tick(f"expert {x['task']}")
        pv, created = self.publish_pool(name, version, library.id, expert_ids, info=info,
                                        description=f"imported from {root.resolve()}", aliases=aliases)
        tick(f"published {pv.name}@{pv.version}" + ("" if created else " (already published)"))
        return pv, created

    # -- pools to disk -----------------------------------------------------------------------------

    def export_pool(self, ref: str, directory: str | Path, *, overwrite: bool = False,
                    progress: Callable[[str], None] | None = None) -> tuple[r.PoolVersion, dict]:
        """Write a published pool version ("name", "name@version", "name@alias") to a directory in
        the format `import_pool` and `poe.engine.pool.load` read; returns the version and pool.json.

        Every blob is streamed to disk and checked against its sha256 and size (DataLoss
        otherwise). Files land in a staging folder inside `directory` first and are moved into
        place once all of them are verified, pool.json last: a failed export leaves the directory
        as it was. A non-empty `directory` is refused (AlreadyExists) unless `overwrite`, which
        replaces the pool's files and leaves any other file there alone.
        """
        root = Path(directory)
        try:
            if root.exists() and not root.is_dir():
                raise AlreadyExists(f"{root}: exists and is not a directory")
            if not overwrite and root.is_dir() and any(root.iterdir()):
                raise AlreadyExists(f"{root}: not empty; refusing to overwrite it")
            pv = self.get_pool(ref)
            oracle = self.get_oracle(pv.library.oracle_id) if pv.library.oracle_id else None
            manifest, blobs = _manifest(pv, oracle)
            created = not root.exists()
            root.mkdir(parents=True, exist_ok=True)
            try:
                self._write_pool(root, pv, manifest, blobs, progress or (lambda _msg: None))
            except BaseException:
                if created:  # only what this call made
                    shutil.rmtree(root, ignore_errors=True)
                raise
        except PermissionError as e:
            raise PermissionDenied(f"{root}: cannot write ({e.strerror})") from None
        except OSError as e:
            raise FailedPrecondition(f"{root}: cannot write ({e.strerror or e})") from None
        return pv, manifest

    def _write_pool(self, root: Path, pv: r.PoolVersion, manifest: dict, blobs: dict[str, c.BlobRef],
                    say: Callable[[str], None]) -> None:
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=root))
        try:
            (staging / "experts").mkdir()
            for step, (rel, blob) in enumerate(blobs.items(), 1):
                self.download_file(blob.sha256, staging / rel, size=blob.size)
                say(f"[{step}/{len(blobs)}] {rel} ({blob.size:,} bytes, sha256 verified)")
            (staging / manifest["hierarchy"]).write_text(hierarchy_from_message(pv.hierarchy).dump())
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            (root / "experts").mkdir(exist_ok=True)
            for rel in (*blobs, manifest["hierarchy"], MANIFEST):  # the manifest last
                os.replace(staging / rel, root / rel)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _manifest(pv: r.PoolVersion, oracle: r.Oracle | None) -> tuple[dict, dict[str, c.BlobRef]]:
    """pool.json of a pool version (as `poe.engine.pool.save` writes it) and the blob of each file."""
    hierarchy = hierarchy_from_message(pv.hierarchy)
    stray = [x.task for x in pv.experts if x.task not in hierarchy.tasks]
    if stray:  # task names become file names: only the hierarchy's (validated) names are written
        raise FailedPrecondition(f"pool {pv.name}@{pv.version}: experts for tasks not in its hierarchy: "
                                 f"{', '.join(map(repr, stray))}")
    info = _loads(pv.info_json)
    blobs: dict[str, c.BlobRef] = {}

    def file(rel: str, blob: c.BlobRef) -> dict:
        blobs[rel] = blob
        return {"file": rel, "sha256": blob.sha256, "bytes": blob.size}

    lib = pv.library
    library = {**file("library.safetensors", lib.blob), "student_config": _loads(lib.config_json),
               "params": lib.params}
    # Metrics import would not rebuild from info, and the distillation settings, travel in the entry.
    if _loads(lib.metrics_json) != _metrics(info.get("student")):
        library["metrics"] = _loads(lib.metrics_json)
    if lib.loss_json:
        library["loss"] = _loads(lib.loss_json)
    experts = []
    for x in pv.experts:
        metrics = _loads(x.metrics_json)
        if "val_acc" not in metrics and x.HasField("val_accuracy"):
            metrics["val_acc"] = x.val_accuracy
        experts.append({"task": x.task, "class_ids": list(x.class_ids), "config": _loads(x.config_json),
                        "params": x.params, "metrics": metrics, "loss": _loads(x.loss_json),
                        **file(f"experts/{x.task}.safetensors", x.blob)})
    manifest = {"format": FORMAT, "name": pv.name, "version": pv.version, "hierarchy": "hierarchy.yaml",
                "info": info, "library": library, "experts": experts}
    if oracle is not None:
        manifest["oracle"] = {**file("oracle.safetensors", oracle.blob), "config": _loads(oracle.config_json),
                              "params": oracle.params}
        if _loads(oracle.metrics_json) != _metrics(info.get("oracle")):
            manifest["oracle"]["metrics"] = _loads(oracle.metrics_json)
    return manifest, blobs


def _loads(text: str) -> dict:
    return json.loads(text) if text else {}


def _metrics(d) -> dict:
    """The metrics of an artifact as `info` records them for the oracle or the student."""
    return {k: v for k, v in d.items() if v is not None and k != "params"} if isinstance(d, dict) else {}
