"""The Registry over gRPC: real servers on port 0, real channels, SQLite + files and PostgreSQL + S3."""

from __future__ import annotations

import hashlib
import json
import os
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from poe.client.registry import ComposedUpload, RegistryClient
from poe.engine import hierarchy as hierarchy_mod
from poe.engine.architectures import placeholder_weights
from poe.engine.errors import AlreadyExists, DataLoss, FailedPrecondition, InvalidArgument, NotFound
from poe.v1 import registry_pb2 as r

SAFETENSORS_JSON = json.dumps({"depth": 10, "width": 1})
ORACLE_WEIGHTS = placeholder_weights({"depth": 10})  # oracles must be weights of their config's network


def _blob_keys(host) -> list[str]:
    return list(host.runtimes["registry"].registry.blobs.list())


def _staging_empty(host) -> bool:
    blobs = host.runtimes["registry"].registry.blobs
    if hasattr(blobs, "root"):
        return not any((blobs.root / "staging").iterdir())
    return not list(blobs.client.list_objects(blobs.bucket, prefix=f"{blobs.prefix}staging/", recursive=True))


def _seed(client):
    """A hierarchy, an oracle and a library; returns (hierarchy, oracle, library)."""
    h = hierarchy_mod.builtin("fashion-mnist")
    client.register_hierarchy(h)
    oracle, _ = client.register_oracle("oracle", h.dataset, {"depth": 10}, ORACLE_WEIGHTS)
    library, _ = client.register_library("library", h.dataset, {"depth": 10}, b"library-weights" * 100,
                                         oracle_id=oracle.id)
    return h, oracle, library


def test_import_pool_resolve_and_download(registry, pool_dir):
    client, host, _ = registry
    pv, created = client.import_pool(pool_dir)
    manifest = json.loads((pool_dir / "pool.json").read_text())
    assert created and (pv.name, pv.version) == ("test-pool", "1")
    assert list(pv.aliases) == ["latest"]
    assert [x.task for x in pv.experts] == [e["task"] for e in manifest["experts"]]
    assert pv.library.blob.sha256 == manifest["library"]["sha256"]
    assert pv.params == manifest["library"]["params"] + sum(e["params"] for e in manifest["experts"])

    res = client.resolve_classes("test-pool", ["sandal", "Bag", "7"])
    assert res.pool == "test-pool@1"
    assert list(res.class_ids) == [5, 7, 8] and list(res.class_names) == ["Sandal", "Sneaker", "Bag"]
    assert [x.task for x in res.experts] == ["footwear", "bags"]
    footwear = next(e for e in manifest["experts"] if e["task"] == "footwear")
    assert res.experts[0].blob.sha256 == footwear["sha256"]
    assert list(res.experts[0].class_ids) == footwear["class_ids"]

    data = client.download(footwear["sha256"])
    assert data == (pool_dir / footwear["file"]).read_bytes()
    tensors = client.download_tensors(res.library.blob.sha256)
    assert set(tensors) and all(hasattr(t, "shape") for t in tensors.values())

    # Importing again is idempotent: same ids, nothing new.
    before = sorted(_blob_keys(host))
    pv2, created2 = client.import_pool(pool_dir)
    assert not created2 and [x.id for x in pv2.experts] == [x.id for x in pv.experts]
    assert sorted(_blob_keys(host)) == before
    lineage = client.lineage("pool", "test-pool")
    assert [n.kind for n in lineage] == ["pool", "library", "oracle", "dataset"]
    assert lineage[2].blob.sha256 == manifest["oracle"]["sha256"]


def test_download_range_and_large_blob_chunks(registry):
    client, _, _ = registry
    _, _, _ = _seed(client)
    data = placeholder_weights({"depth": 28, "width": 2})  # 5.6 MiB: several 1 MiB messages
    oracle, _ = client.register_oracle("big", "fashion-mnist", {"depth": 28, "width": 2}, data)
    chunks = list(client.stub.Download(r.DownloadRequest(sha256=oracle.blob.sha256)))
    assert len(chunks) == 6 and all(len(c.data) <= 1 << 20 for c in chunks)
    assert chunks[0].blob.size == len(data) and not chunks[1].HasField("blob")
    assert b"".join(c.data for c in chunks) == data
    assert client.download(oracle.blob.sha256, offset=1000, length=3000) == data[1000:4000]
    assert client.download(oracle.blob.sha256, offset=len(data) - 5) == data[-5:]
    with pytest.raises(InvalidArgument, match="offset"):
        client.download(oracle.blob.sha256, offset=len(data) + 1)


def test_corrupted_blob_is_data_loss_and_never_served(registry):
    client, host, _ = registry
    _, oracle, _ = _seed(client)
    sha = oracle.blob.sha256
    blobs = host.runtimes["registry"].registry.blobs
    bad = b"X" * oracle.blob.size
    if hasattr(blobs, "root"):
        (blobs.root / "sha256" / sha[:2] / sha).write_bytes(bad)
    else:
        import io

        blobs.client.put_object(blobs.bucket, blobs._key(sha), io.BytesIO(bad), len(bad))
    call = client.stub.Download(r.DownloadRequest(sha256=sha))
    received = []
    with pytest.raises(grpc.RpcError) as info:
        for msg in call:
            received.append(msg)
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    assert received == []  # not a single byte of the bad blob
    with pytest.raises(DataLoss):
        client.download(sha)
    # Registering the identical (verified) content again repairs the stored copy.
    again, created = client.register_oracle("oracle", "fashion-mnist", {"depth": 10}, ORACLE_WEIGHTS)
    assert not created and again.id == oracle.id
    assert client.download(sha) == ORACLE_WEIGHTS


def test_registered_blob_missing_from_store_is_data_loss(registry):
    client, host, _ = registry
    _, oracle, _ = _seed(client)
    host.runtimes["registry"].registry.blobs.delete(oracle.blob.sha256)
    with pytest.raises(DataLoss, match="missing"):
        client.download(oracle.blob.sha256)
    with pytest.raises(NotFound):
        client.download("0" * 64)


def test_interrupted_upload_leaves_no_row_and_no_blob(registry, poll):
    client, host, _ = registry
    h, _, library = _seed(client)
    blobs_before = sorted(_blob_keys(host))
    payload = b"expert-bytes" * 300_000  # ~3.4 MiB, several chunks
    sha = hashlib.sha256(payload).hexdigest()
    sent = threading.Event()

    def requests():
        yield r.RegisterExpertRequest(metadata=r.ExpertMetadata(
            library_id=library.id, hierarchy_version=1, task="bags", class_ids=[8], config_json="{}",
            sha256=sha, size=len(payload)))
        yield r.RegisterExpertRequest(chunk=payload[:1 << 20])
        yield r.RegisterExpertRequest(chunk=payload[1 << 20:2 << 20])
        sent.set()
        raise ConnectionError("client died mid-upload")

    with pytest.raises(grpc.RpcError) as info:
        client.stub.RegisterExpert(requests(), timeout=10, metadata=client.metadata)
    assert sent.is_set()
    assert info.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)
    assert poll(lambda: _staging_empty(host))
    assert sorted(_blob_keys(host)) == blobs_before
    assert list(client.list_experts()) == []


def test_truncated_or_mismatching_upload_is_rejected_without_traces(registry, poll):
    client, host, _ = registry
    _, _, library = _seed(client)
    blobs_before = sorted(_blob_keys(host))
    payload = b"z" * 5000

    def upload(sha: str, size: int, data: bytes):
        def requests():
            yield r.RegisterExpertRequest(metadata=r.ExpertMetadata(
                library_id=library.id, hierarchy_version=1, task="bags", class_ids=[8], sha256=sha, size=size))
            yield r.RegisterExpertRequest(chunk=data)
        return client.stub.RegisterExpert(requests(), timeout=10, metadata=client.metadata)

    good = hashlib.sha256(payload).hexdigest()
    with pytest.raises(grpc.RpcError) as info:
        upload(good, len(payload), payload[:4000])  # stream ended early
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("size:")
    with pytest.raises(grpc.RpcError) as info:
        upload("a" * 64, len(payload), payload)  # bytes do not hash to the declared sha256
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("sha256:")
    assert dict(info.value.trailing_metadata())["poe-field"] == "sha256"
    assert poll(lambda: _staging_empty(host))
    assert sorted(_blob_keys(host)) == blobs_before
    assert list(client.list_experts()) == []


def test_rejected_record_leaves_no_blob(registry):
    client, host, _ = registry
    _, _, library = _seed(client)
    blobs_before = sorted(_blob_keys(host))
    with pytest.raises(NotFound, match="library_id"):
        client.register_expert(library.id + 1000, 1, "bags", [8], {}, b"orphan bytes")
    with pytest.raises(InvalidArgument, match="class_ids"):
        client.register_expert(library.id, 1, "bags", [7], {}, b"orphan bytes")
    assert sorted(_blob_keys(host)) == blobs_before


def test_duplicate_registration_idempotent_and_conflicts(registry):
    client, _, _ = registry
    h, oracle, library = _seed(client)
    again, created = client.register_oracle("another name", h.dataset, {"depth": 10}, ORACLE_WEIGHTS)
    assert not created and again.id == oracle.id and again.name == "oracle"
    with pytest.raises(AlreadyExists, match="different"):
        client.register_oracle("oracle", h.dataset, {"depth": 10, "dropout": 0.1}, ORACLE_WEIGHTS)
    e1, c1 = client.register_expert(library.id, 1, "bags", [8], {"num_classes": 1}, b"bag expert", val_accuracy=0.9)
    e2, c2 = client.register_expert(library.id, 1, "bags", [8], {"num_classes": 1}, b"bag expert", val_accuracy=0.9)
    assert c1 and not c2 and e1.id == e2.id and e2.val_accuracy == pytest.approx(0.9)
    pv, created = client.publish_pool("p", "1", library.id, [e1.id])
    assert created
    pv_again, created = client.publish_pool("p", "1", library.id, [e1.id])
    assert not created and pv_again.version == "1"
    other, _ = client.register_expert(library.id, 1, "bags", [8], {"num_classes": 1}, b"retrained bag expert")
    with pytest.raises(AlreadyExists, match="immutable"):
        client.publish_pool("p", "1", library.id, [other.id])
    h2, created = client.register_hierarchy(h)
    assert not created and len(h2.tasks) == len(h.tasks)


def test_two_clients_register_the_same_content_at_once(registry, poll):
    from poe.client.registry import RegistryClient

    client, host, _ = registry
    _, _, library = _seed(client)
    target = client.target
    payload = b"shared expert" * 200_000  # ~2.6 MiB
    results, errors = [], []
    barrier = threading.Barrier(4)

    def register():
        try:
            with RegistryClient(target, timeout=30) as c:
                barrier.wait()
                results.append(c.register_expert(library.id, 1, "footwear", [9, 5, 7], {}, payload))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=register) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({x.id for x, _ in results}) == 1
    assert sorted(created for _, created in results) == [False, False, False, True]
    assert len(list(client.list_experts(task="footwear"))) == 1
    assert hashlib.sha256(payload).hexdigest() in _blob_keys(host)
    assert client.download(results[0][0].blob.sha256) == payload
    assert poll(lambda: _staging_empty(host))


def _as_service(client: RegistryClient) -> RegistryClient:
    """A client of the same registry with the test run's service token."""
    return RegistryClient(client.target, token=os.environ["POE_SERVICE_TOKEN"], timeout=client.timeout)


class _WithToken:
    """`client.stub`, whose calls send the client's token (protocol-level calls made directly)."""

    def __init__(self, client: RegistryClient):
        self._client = client

    def __getattr__(self, name: str):
        method = getattr(self._client.stub, name)
        return lambda request, **kw: method(request, metadata=self._client.metadata, **kw)


def test_bad_input_names_the_field(registry):
    client, _, _ = registry
    _, _, library = _seed(client)
    stub = _WithToken(client)
    cases = [
        (lambda: stub.GetPool(r.GetPoolRequest(pool="Bad Name")), "pool"),
        (lambda: stub.ResolveClasses(r.ResolveClassesRequest(pool="x")), "classes"),
        (lambda: stub.PublishPool(r.PublishPoolRequest(name="p", version="1", library_id=library.id)), "expert_ids"),
        (lambda: stub.PublishPool(r.PublishPoolRequest(name="p", version="bad version", library_id=library.id,
                                                       expert_ids=[1])), "version"),
        (lambda: stub.ListPools(r.ListPoolsRequest(page_token="garbage!")), "page_token"),
        (lambda: stub.ListExperts(r.ListExpertsRequest(page_size=-1)), "page_size"),
        (lambda: stub.Download(r.DownloadRequest(sha256="abc")).next(), "sha256"),
        (lambda: stub.SetPoolAlias(r.SetPoolAliasRequest(name="p", alias="latest", version="1")), "alias"),
        (lambda: stub.GetLineage(r.GetLineageRequest(kind="spaceship", id="1")), "kind"),
        (lambda: stub.RegisterOracle(iter([r.RegisterOracleRequest(metadata=r.OracleMetadata(
            name="o", dataset="fashion-mnist", config_json="[1, 2]", sha256="0" * 64))])), "config_json"),
        (lambda: stub.RegisterOracle(iter([r.RegisterOracleRequest(chunk=b"x")])), "metadata"),
        (lambda: stub.RegisterLibrary(iter([
            r.RegisterLibraryRequest(metadata=r.LibraryMetadata(name="l", dataset="fashion-mnist", sha256="0" * 64)),
            r.RegisterLibraryRequest(chunk=b"x" * ((1 << 20) + 1))])), "chunk"),
        (lambda: stub.RegisterHierarchy(r.RegisterHierarchyRequest()), "hierarchy"),
    ]
    for call, field in cases:
        with pytest.raises(grpc.RpcError) as info:
            call()
        err = info.value
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.code(), err.details())
        assert err.details().startswith(f"{field}:"), (field, err.details())
        assert dict(err.trailing_metadata()).get("poe-field") == field


def test_missing_things_are_not_found(registry):
    client, _, _ = registry
    h, _, library = _seed(client)
    with pytest.raises(NotFound, match="no pool named"):
        client.get_pool("nope")
    bags, _ = client.register_expert(library.id, 1, "bags", [8], {}, b"bag expert")
    client.publish_pool("p", "1", library.id, [bags.id])
    with pytest.raises(NotFound, match="no version or alias"):
        client.get_pool("p@7")
    assert client.get_composed_model("p", [8], "torchscript") is None
    with pytest.raises(NotFound):
        client.get_expert(12345)


def test_resolve_classes_names_the_field_and_the_missing_expert(registry):
    """ResolveClasses answers through poe.engine.compose.plan, as ComposeModel does
    (tests/composer compares the two RPCs error for error)."""
    client, _, _ = registry
    h, _, library = _seed(client)
    experts = {t: client.register_expert(library.id, 1, t, ids, {}, f"{t} expert".encode())[0]
               for t, ids in h.tasks.items()}
    client.publish_pool("fm", "1", library.id, [x.id for t, x in experts.items() if t != "tops"])
    res = client.resolve_classes("fm", ["Ankle boot", "bag", 5, " 7 "])
    assert list(res.class_ids) == [5, 7, 8, 9] and list(res.class_names) == ["Sandal", "Sneaker", "Bag", "Ankle boot"]
    assert [x.task for x in res.experts] == ["footwear", "bags"] and res.pool == "fm@1"
    assert list(res.experts[1].class_ids) == list(h.tasks["bags"]) and res.library.id == library.id
    assert list(client.resolve_classes("fm@latest", [], ["warm-layers", ""]).class_ids) == [2, 4]
    for classes, tasks, field, message in [(["Unicorn"], [], "classes", "unknown classes"),
                                           ([], ["hats"], "tasks", "unknown primitive tasks"),
                                           (["", " "], [], "classes", "empty request")]:
        with pytest.raises(InvalidArgument, match=message) as info:
            client.resolve_classes("fm", classes, tasks)
        assert info.value.field == field and str(info.value).startswith(f"{field}: ")
    with pytest.raises(NotFound, match="pool fm@1 has no expert for primitive task.*tops"):
        client.resolve_classes("fm", ["Shirt"])
    with pytest.raises(NotFound, match="no pool named"):
        client.resolve_classes("nope", ["Bag"])


def test_pools_versions_aliases_search_and_delete(registry):
    client, _, _ = registry
    h, _, library = _seed(client)
    experts = {}
    for task, ids in h.tasks.items():
        experts[task], _ = client.register_expert(library.id, 1, task, list(ids), {"num_classes": len(ids)},
                                                  f"expert {task}".encode())
    v1, _ = client.publish_pool("fm", "1", library.id, [experts["bags"].id, experts["tops"].id], aliases=["prod"])
    v2, _ = client.publish_pool("fm", "2", library.id, [x.id for x in experts.values()])
    assert list(client.get_pool("fm").aliases) == ["latest"] and client.get_pool("fm").version == "2"
    assert client.get_pool("fm@prod").version == "1"
    assert [x.task for x in client.get_pool("fm@1").experts] == ["tops", "bags"]  # hierarchy order
    assert [p.version for p in client.list_pools(class_name="sneaker")] == ["2"]
    assert [p.version for p in client.list_pools(alias="prod")] == ["1"]
    assert [p.version for p in client.list_pools(dataset="fashion-mnist", page_size=1)] == ["1", "2"]
    assert [x.task for x in client.list_experts(class_name="COAT")] == ["warm-layers"]
    assert len(list(client.list_experts(pool="fm@1"))) == 2
    assert len(list(client.list_experts(page_size=2))) == 5

    # The composed-model cache is written by the composer only (role service).
    with _as_service(client) as composer:
        model, created = composer.put_composed_model("fm@prod", [8, 0], "torchscript", b"model bytes",
                                                     metadata={"k": 1})
    assert created and model.pool == "fm@1" and list(model.class_ids) == [0, 8]
    assert client.get_composed_model("fm@1", [0, 8], "torchscript").hits == 1
    assert client.get_composed_model("fm@1", [8, 0], "torchscript").hits == 2
    assert [n.kind for n in client.lineage("composed_model", model.blob.sha256)] == [
        "composed_model", "pool", "library", "oracle", "dataset"]

    # Several at once, as composers record: all or none, in order, a key given twice created once.
    def upload(pool: str, ids: tuple[int, ...], data: bytes) -> ComposedUpload:
        return ComposedUpload(pool, ids, "torchscript", data, {"n": len(ids)})

    with _as_service(client) as composer:
        with pytest.raises(NotFound, match="no pool named 'nope'"):
            composer.put_composed_models([upload("fm@1", (1, 2), b"a"), upload("nope@1", (3,), b"b")])
        bad = r.PutComposedModelsRequest(models=[
            r.ComposedModelUpload(metadata=r.ComposedModelMetadata(pool="fm@1", class_ids=[1, 2], format="torchscript",
                                                                   sha256=hashlib.sha256(b"a").hexdigest(), size=1),
                                  data=b"a"),
            r.ComposedModelUpload(metadata=r.ComposedModelMetadata(pool="fm@1", class_ids=[3], format="torchscript",
                                                                   sha256=hashlib.sha256(b"x").hexdigest(), size=1),
                                  data=b"b")])
        with pytest.raises(InvalidArgument, match=r"^models\[1\]\.sha256: declared"):
            composer._call(composer.stub.PutComposedModels, bad)
        with pytest.raises(InvalidArgument, match=r"^models: 0 entries"):
            composer._call(composer.stub.PutComposedModels, r.PutComposedModelsRequest())
        assert client.get_composed_model("fm@1", [1, 2], "torchscript") is None  # nothing of a refused call
        results = composer.put_composed_models([upload("fm@1", (1, 2), b"a"), upload("fm@prod", (0, 8), b"other"),
                                                upload("fm@1", (2, 1), b"a"), upload("fm@2", (4,), b"c" * 64)])
    assert [(list(m.class_ids), m.pool, created) for m, created in results] == [
        ([1, 2], "fm@1", True), ([0, 8], "fm@1", False), ([1, 2], "fm@1", False), ([4], "fm@2", True)]
    assert results[1][0].blob.sha256 == model.blob.sha256  # the first entry for a key wins
    assert client.download(results[3][0].blob.sha256) == b"c" * 64
    assert json.loads(client.get_composed_model("fm@1", [1, 2], "torchscript").metadata_json) == {"n": 2}

    with pytest.raises(FailedPrecondition, match="prod"):
        client.delete_pool_version("fm", "1")
    client.set_alias("fm", "prod", "2")
    assert client.delete_pool_version("fm", "1") == 2  # its two composed models go with it
    with pytest.raises(NotFound):
        client.get_pool("fm@1")
    client.delete_alias("fm", "prod")
    with pytest.raises(NotFound, match="alias"):
        client.delete_alias("fm", "prod")
    assert client.delete_pool_version("fm", "2") == 1  # and its one
    assert list(client.list_pools()) == []
    # The artifacts stay (they are not owned by a pool version).
    assert client.get_expert(experts["bags"].id).task == "bags"


def test_extraction_jobs(registry):
    admin, _, _ = registry
    _, oracle, library = _seed(admin)
    client = _as_service(admin)  # jobs are created and updated by the extractor (role service)
    job = client.create_job({"epochs": 3}, oracle_id=oracle.id, job_id="job-1")
    assert job.state == 1 and job.progress == 0.0  # PENDING
    with pytest.raises(AlreadyExists, match="job_id"):
        client.create_job({}, job_id="job-1")
    job = client.update_job("job-1", state="running", progress=0.5, stage="experts", message="task 3/5")
    assert (job.stage, job.message, job.progress) == ("experts", "task 3/5", 0.5)
    with pytest.raises(InvalidArgument, match="progress"):
        client.update_job("job-1", progress=1.5)
    bags, _ = client.register_expert(library.id, 1, "bags", [8], {}, b"bag expert")
    client.publish_pool("p", "1", library.id, [bags.id])
    job = client.update_job("job-1", state="succeeded", progress=1.0, pool="p@1")
    assert job.pool == "p@1"
    with pytest.raises(FailedPrecondition, match="succeeded"):
        client.update_job("job-1", state="running")
    client.create_job({"x": 1})
    assert [j.id for j in client.list_jobs(state="succeeded")] == ["job-1"]
    assert len(list(client.list_jobs(page_size=1))) == 2
    assert json.loads(client.get_job("job-1").params_json) == {"epochs": 3}


def test_health_and_reflection(registry):
    client, _, _ = registry
    health = health_pb2_grpc.HealthStub(client.channel)
    for service in ("", "poe.v1.Registry"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"poe.v1.Registry", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
