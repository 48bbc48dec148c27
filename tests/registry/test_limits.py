"""Hostile and oversized input against a real registry (SQLite + files, PostgreSQL + S3).

Every case is something that once stored a record the registry could not serve back, or answered
INTERNAL: now each is INVALID_ARGUMENT (NOT_FOUND where that is the truth) naming the field, with
a short message, and nothing is stored.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os

import grpc
import pytest

from poe.engine import hierarchy as hierarchy_mod
from poe.engine import limits
from poe.v1 import common_pb2 as c
from poe.v1 import registry_pb2 as r

# The service token may call everything the registry serves but DeletePoolVersion (jobs and the
# composed-model cache are internal); without authentication configured, no token is needed.
AUTH = (("authorization", f"Bearer {os.environ['POE_SERVICE_TOKEN']}"),) if os.environ.get("POE_SERVICE_TOKEN") \
    else ()
DEEP_JSON = "[" * 30_000 + "]" * 30_000  # within the 64 KiB of a config: refused for its depth
STUB_TIMEOUT = 60


def _call(method, request):
    result = method(request, metadata=AUTH, timeout=STUB_TIMEOUT)
    return list(result) if hasattr(result, "__next__") else result


def _error(method, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        _call(method, request)
    return info.value


def expect_invalid(method, request, field: str) -> str:
    """The call fails with INVALID_ARGUMENT naming `field` (message and trailer); returns the message."""
    err = _error(method, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.code(), err.details())
    assert dict(err.trailing_metadata() or ()).get("poe-field") == field, (field, err.details())
    assert err.details().startswith(field), err.details()
    assert len(err.details()) < 2000, len(err.details())
    return err.details()


def expect_not_found(method, request) -> None:
    err = _error(method, request)
    assert err.code() == grpc.StatusCode.NOT_FOUND, (err.code(), err.details())


def _upload(kind: str, **metadata):
    """A one-chunk client-streaming upload request iterator (the bytes are never read when the
    metadata is refused)."""
    data = metadata.pop("data", b"weights")
    req, meta = {"expert": (r.RegisterExpertRequest, r.ExpertMetadata),
                 "library": (r.RegisterLibraryRequest, r.LibraryMetadata)}[kind]
    return iter([req(metadata=meta(sha256=hashlib.sha256(data).hexdigest(), size=len(data), **metadata)),
                 req(chunk=data)])


def _seed_pool(client, h=None, name="fm"):
    """A hierarchy, a library (no oracle) and one expert per task, published as `name`@1."""
    h = h or hierarchy_mod.builtin("fashion-mnist")
    client.register_hierarchy(h)
    lib, _ = client.register_library(f"{name} library", h.dataset, {"depth": 10}, f"{name} library".encode())
    experts = [client.register_expert(lib.id, h.version, t, list(ids), {}, f"{name} {t}".encode())[0]
               for t, ids in h.tasks.items()]
    pv, _ = client.publish_pool(name, "1", lib.id, [x.id for x in experts], info={"input_shape": [1, 28, 28]})
    return h, lib, experts, pv


def _pool_refs(client) -> list[str]:
    return [f"{p.name}@{p.version}" for p in client.list_pools()]


def _jobs(stub) -> list[str]:
    return [j.id for j in _call(stub.ListExtractionJobs, r.ListExtractionJobsRequest()).jobs]


# -- records that could not be served back ----------------------------------------------------------

def test_oversized_records_are_refused_and_lists_keep_working(registry):
    client, host, _ = registry
    stub = client.stub
    _, lib, experts, _ = _seed_pool(client)
    # 2.9 MB of "é" is 8.7 MB once served as JSON (\u00e9): it was committed and broke every job list.
    params = json.dumps({"note": "é" * 1_450_000}, ensure_ascii=False)
    assert len(params.encode()) < limits.MAX_LARGE_JSON_BYTES
    msg = expect_invalid(stub.CreateExtractionJob, r.CreateExtractionJobRequest(params_json=params), "params_json")
    assert "as stored" in msg
    assert _jobs(stub) == []

    # A 4 MiB description broke ListPools and `poe registry list`.
    expect_invalid(stub.PublishPool, r.PublishPoolRequest(
        name="fm", version="2", library_id=lib.id, expert_ids=[x.id for x in experts],
        description="d" * (4 << 20)), "description")
    assert _pool_refs(client) == ["fm@1"]

    # Records at their caps: any page of them still fits a message, cut by bytes.
    big = {"note": "a" * (limits.MAX_LARGE_JSON_BYTES - 100)}
    made = [_call(stub.CreateExtractionJob, r.CreateExtractionJobRequest(params_json=json.dumps(big), job_id=f"j{i}"))
            .job.id for i in range(3)]
    seen, token, pages = [], "", 0
    while True:
        resp = _call(stub.ListExtractionJobs, r.ListExtractionJobsRequest(page_size=1000, page_token=token))
        assert resp.ByteSize() < limits.MAX_MESSAGE_BYTES
        seen += [j.id for j in resp.jobs]
        pages += 1
        token = resp.next_page_token
        if not token:
            break
    # All three in one page would be 9 MiB, over the message limit: each page holds one.
    assert sorted(seen) == sorted(made) and pages == 3


def test_a_pool_record_too_large_to_serve_is_not_published(registry):
    client, _, _ = registry
    stub = client.stub
    tasks = {f"t{i:02d}": [f"c{i:02d}"] for i in range(25)}
    h = hierarchy_mod.from_dict({"dataset": "wide", "classes": [f"c{i:02d}" for i in range(25)], "tasks": tasks})
    client.register_hierarchy(h)
    lib, _ = client.register_library("wide library", "wide", {"depth": 10}, b"wide library")
    # Each expert's record is within its caps (3 x 60 KiB of JSON), but 25 of them take 4.6 MB.
    blob = {"k": "v" * (60 << 10)}
    ids = [client.register_expert(lib.id, 1, t, h.tasks[t], blob, t.encode(), metrics=blob, loss=blob)[0].id
           for t in h.tasks]
    msg = expect_invalid(stub.PublishPool, r.PublishPoolRequest(name="wide", version="1", library_id=lib.id,
                                                                expert_ids=ids, info_json=json.dumps(blob)),
                         "expert_ids")
    assert "bytes as served" in msg
    assert _pool_refs(client) == []
    expect_not_found(stub.GetPool, r.GetPoolRequest(pool="wide"))
    # A pool of fewer of them fits, and is listed.
    pv, created = client.publish_pool("wide", "1", lib.id, ids[:10])
    assert created and _pool_refs(client) == ["wide@1"]


def test_network_configs_beyond_the_caps_are_refused_before_upload(registry):
    client, host, _ = registry
    stub = client.stub
    h = hierarchy_mod.builtin("fashion-mnist")
    client.register_hierarchy(h)
    blobs_before = sorted(host.runtimes["registry"].registry.blobs.list())
    for config in ({"depth": 1000}, {"width": 64}, {"in_channels": 1 << 20}, {"depth": "16"}):
        expect_invalid(stub.RegisterLibrary, _upload("library", name="lib", dataset=h.dataset,
                                                     config_json=json.dumps(config)), "config_json")
    lib, _ = client.register_library("lib", h.dataset, {"depth": 16, "width": 1}, b"library")
    for config in ({"width": 4096}, {"blocks": 100}, {"in_channels": 32, "width": 16.0}, {"width": True}):
        expect_invalid(stub.RegisterExpert, _upload("expert", library_id=lib.id, hierarchy_version=1, task="bags",
                                                    class_ids=[8], config_json=json.dumps(config)), "config_json")
    assert list(client.list_experts()) == []
    blobs = host.runtimes["registry"].registry.blobs
    assert sorted(blobs.list()) == sorted(blobs_before + [lib.blob.sha256])


# -- INTERNAL errors from client input --------------------------------------------------------------

def _token(payload: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


def test_hostile_values_are_invalid_argument_naming_the_field(registry):
    client, _, _ = registry
    stub = client.stub
    h, lib, experts, pv = _seed_pool(client)

    # Forged page tokens (the offset went straight into SQL).
    for token in (_token({"o": 1e30, "q": "x"}), _token({"o": -1, "q": "x"}), _token({"o": 2 ** 40, "q": "x"}),
                  _token({"o": "5", "q": "x"}), _token({"o": True, "q": "x"}), _token({"o": 0}), "!!!", "A" * 5000):
        expect_invalid(stub.ListPools, r.ListPoolsRequest(page_token=token), "page_token")
        expect_invalid(stub.ListExperts, r.ListExpertsRequest(page_token=token), "page_token")
        expect_invalid(stub.ListExtractionJobs, r.ListExtractionJobsRequest(page_token=token), "page_token")
    expect_invalid(stub.ListPools, r.ListPoolsRequest(page_size=-1), "page_size")

    # Ids: beyond int64 is invalid; within it but beyond any row is simply not found.
    for ident in ("99999999999999999999999", str(2 ** 63), "-1", "1e3", "٣"):
        expect_invalid(stub.GetLineage, r.GetLineageRequest(kind="expert", id=ident), "id")
    for ident in (str(2 ** 63 - 1), str(2 ** 31)):
        expect_not_found(stub.GetLineage, r.GetLineageRequest(kind="library", id=ident))
    expect_not_found(stub.GetExpert, r.GetExpertRequest(id=2 ** 63 - 1))
    expect_not_found(stub.GetOracle, r.GetOracleRequest(id=2 ** 31))
    assert not _call(stub.ListExperts, r.ListExpertsRequest(library_id=2 ** 63 - 1)).experts
    expect_not_found(stub.PublishPool, r.PublishPoolRequest(name="fm", version="2", library_id=lib.id,
                                                            expert_ids=[2 ** 63 - 1]))
    expect_not_found(stub.CreateExtractionJob, r.CreateExtractionJobRequest(oracle_id=2 ** 63 - 1))

    # JSON nested 100,000 levels deep, NaN, NUL, integers of thousands of digits.
    expect_invalid(stub.RegisterExpert, _upload("expert", library_id=lib.id, hierarchy_version=1, task="bags",
                                                class_ids=[8], config_json=DEEP_JSON), "config_json")
    expect_invalid(stub.CreateExtractionJob, r.CreateExtractionJobRequest(
        params_json="[" * 100_000 + "]" * 100_000), "params_json")
    for info in (DEEP_JSON, '{"a": NaN}', '{"a": "\\u0000"}', '{"a": ' + "9" * 5000 + "}", "[1]"):
        expect_invalid(stub.PublishPool, r.PublishPoolRequest(name="fm", version="2", library_id=lib.id,
                                                              expert_ids=[x.id for x in experts], info_json=info),
                       "info_json")

    # Class references the resolver once crashed on, and too many of them.
    expect_invalid(stub.ResolveClasses, r.ResolveClassesRequest(pool="fm", classes=["²"]), "classes")
    expect_invalid(stub.ResolveClasses, r.ResolveClassesRequest(pool="fm", classes=["9" * 100]), "classes")
    msg = expect_invalid(stub.ResolveClasses, r.ResolveClassesRequest(
        pool="fm", classes=[f"nope{i}" for i in range(100_000)]), "classes")
    assert "100000" in msg
    msg = expect_invalid(stub.ResolveClasses, r.ResolveClassesRequest(
        pool="fm", classes=[f"nope{i}" for i in range(20_000)]), "classes")
    assert "nope0" in msg and "more" in msg
    expect_invalid(stub.ResolveClasses, r.ResolveClassesRequest(pool="fm", classes=["x" * 1000]), "classes")

    # NUL bytes (PostgreSQL refuses them in text) and over-long names (its columns are bounded).
    expect_invalid(stub.PublishPool, r.PublishPoolRequest(name="fm", version="2", library_id=lib.id,
                                                          expert_ids=[x.id for x in experts], description="a\x00b"),
                   "description")
    expect_invalid(stub.ListPools, r.ListPoolsRequest(class_name="bag\x00"), "class_name")
    expect_invalid(stub.ListExperts, r.ListExpertsRequest(class_name="x" * 300), "class_name")
    expect_invalid(stub.ListExperts, r.ListExpertsRequest(dataset="fashion-mnist\x00"), "dataset")
    expect_invalid(stub.RegisterLibrary, _upload("library", name="lib\x00", dataset=h.dataset), "name")
    expect_invalid(stub.RegisterLibrary, _upload("library", name="l" * 300, dataset=h.dataset), "name")
    for classes in (["a\x00", "b"], ["a" * 300, "b"], ["a", "b" * 129]):
        expect_invalid(stub.RegisterHierarchy, r.RegisterHierarchyRequest(hierarchy=c.Hierarchy(
            dataset="bad", version=1, classes=classes, tasks=[c.PrimitiveTask(name="t", class_ids=[0, 1])])),
            "hierarchy.classes")
    job = _call(stub.CreateExtractionJob, r.CreateExtractionJobRequest(job_id="job-1")).job
    for field, update in (("stage", {"stage": "s\x00"}), ("stage", {"stage": "s" * 100}),
                          ("message", {"message": "m\x00"}), ("error", {"error": "e" * 20_000})):
        expect_invalid(stub.UpdateExtractionJob, r.UpdateExtractionJobRequest(job_id=job.id, **update), field)
    expect_invalid(stub.GetExtractionJob, r.GetExtractionJobRequest(job_id="j" * 300), "job_id")
    expect_invalid(stub.GetExtractionJob, r.GetExtractionJobRequest(job_id="job\x00"), "job_id")

    # Nothing of it was stored.
    assert _pool_refs(client) == ["fm@1"]
    assert _jobs(stub) == ["job-1"]
    stored = _call(stub.GetExtractionJob, r.GetExtractionJobRequest(job_id="job-1")).job
    assert (stored.stage, stored.message, stored.error) == ("", "", "")
    expect_not_found(stub.GetHierarchy, r.GetHierarchyRequest(dataset="bad"))
    assert len(list(client.list_experts())) == len(experts)


# -- names and class names --------------------------------------------------------------------------

def test_names_with_a_trailing_newline_are_refused(registry):
    client, _, _ = registry
    stub = client.stub
    _, lib, experts, _ = _seed_pool(client)
    ids = [x.id for x in experts]
    expect_invalid(stub.PublishPool, r.PublishPoolRequest(name="fm2\n", version="1", library_id=lib.id,
                                                          expert_ids=ids), "name")
    expect_invalid(stub.PublishPool, r.PublishPoolRequest(name="fm", version="2\n", library_id=lib.id,
                                                          expert_ids=ids), "version")
    expect_invalid(stub.PublishPool, r.PublishPoolRequest(name="fm", version="2", library_id=lib.id,
                                                          expert_ids=ids, aliases=["stable\n"]), "aliases")
    expect_invalid(stub.SetPoolAlias, r.SetPoolAliasRequest(name="fm", alias="stable\n", version="1"), "alias")
    expect_invalid(stub.GetPool, r.GetPoolRequest(pool="fm\n"), "pool")
    expect_invalid(stub.CreateExtractionJob, r.CreateExtractionJobRequest(job_id="job\n"), "job_id")
    expect_invalid(stub.RegisterHierarchy, r.RegisterHierarchyRequest(hierarchy=c.Hierarchy(
        dataset="other\n", version=1, classes=["a"], tasks=[c.PrimitiveTask(name="t", class_ids=[0])])),
        "hierarchy.dataset")
    assert _pool_refs(client) == ["fm@1"] and list(client.get_pool("fm").aliases) == ["latest"]
    assert _jobs(stub) == []


def test_class_names_are_checked_and_looked_up_as_the_composer_does(registry):
    client, _, _ = registry
    stub = client.stub

    def register(classes: list[str]):
        return r.RegisterHierarchyRequest(hierarchy=c.Hierarchy(
            dataset="cafe", version=1, classes=classes,
            tasks=[c.PrimitiveTask(name="t", class_ids=list(range(len(classes))))]))

    for classes in (["Cat", "cat"], [" Cat", "Dog"], ["Cat\t", "Dog"], ["Ca\nt", "Dog"], ["Cafe\u0301", "Dog"],
                    ["Cat", ""], ["Cat", "\u00a0"]):
        expect_invalid(stub.RegisterHierarchy, register(classes), "hierarchy.classes")
    expect_not_found(stub.GetHierarchy, r.GetHierarchyRequest(dataset="cafe"))

    # Names are stored in NFC; a request in another normalization or case finds them, everywhere.
    h = hierarchy_mod.from_dict({"dataset": "cafe", "classes": ["Café", "Straße", "²"],
                                 "tasks": {"drinks": ["Café"], "streets": ["Straße", "²"]}})
    _seed_pool(client, h, name="cafe")
    res = client.resolve_classes("cafe", ["CAFE\u0301", "STRASSE", "²"])
    assert list(res.class_names) == ["Café", "Straße", "²"]
    assert [p.name for p in client.list_pools(class_name="cafe\u0301")] == ["cafe"]
    assert [x.task for x in client.list_experts(class_name="STRASSE")] == ["streets"]
    expect_invalid(stub.ResolveClasses, r.ResolveClassesRequest(pool="cafe", classes=["Cafe"]), "classes")
