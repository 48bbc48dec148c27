"""The SQL metadata store, on SQLite and on PostgreSQL (every test runs on both)."""

from __future__ import annotations

import hashlib
import threading

import pytest
from sqlalchemy import func, select

from poe.engine import hierarchy as hierarchy_mod
from poe.engine.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from poe.engine.hierarchy import Hierarchy
from poe_services.registry import db
from poe_services.registry import entities as e
from poe_services.registry.models import BlobRow, ExpertRow, OracleRow, PoolVersionRow
from poe_services.registry.sqlstore import SqlRegistryStore

FM = "fashion-mnist"


def blob(content: str) -> e.Blob:
    return e.Blob(hashlib.sha256(content.encode()).hexdigest(), len(content), e.SAFETENSORS)


def count(store: SqlRegistryStore, model) -> int:
    with db.session_scope(store._factory) as s:
        return s.scalar(select(func.count()).select_from(model))


@pytest.fixture
def seeded(store):
    """Hierarchy, oracle, library and one expert per task; returns (store, hierarchy, library, experts)."""
    h = hierarchy_mod.builtin(FM)
    store.add_hierarchy(h)
    oracle, _ = store.add_oracle(e.OracleSpec("oracle", FM, {"depth": 16, "width": 4}, 2_700_000), blob("oracle"))
    lib, _ = store.add_library(e.LibrarySpec("library", FM, {"depth": 16}, oracle.id, 40_000), blob("library"))
    experts = {}
    for task, ids in h.tasks.items():
        experts[task], _ = store.add_expert(
            e.ExpertSpec(lib.id, 1, task, ids, {"num_classes": len(ids)}, 12_000, 0.9), blob(f"expert-{task}"))
    return store, h, lib, experts


def test_hierarchy_round_trip_idempotent_and_conflicts(store):
    h = hierarchy_mod.builtin(FM)
    got, created = store.add_hierarchy(h)
    assert created and got == h
    assert store.add_hierarchy(h) == (h, False)
    assert store.get_hierarchy(FM) == h and store.get_hierarchy(FM, 1) == h
    changed = Hierarchy(FM, 1, h.classes, {"all": tuple(range(10))})
    with pytest.raises(AlreadyExists, match="different tasks"):
        store.add_hierarchy(changed)
    v2, created = store.add_hierarchy(Hierarchy(FM, 2, h.classes, {"all": tuple(range(10))}))
    assert created and store.get_hierarchy(FM).version == 2
    with pytest.raises(FailedPrecondition, match="hierarchy.classes"):
        store.add_hierarchy(Hierarchy(FM, 3, tuple(reversed(h.classes)), {"all": tuple(range(10))}))
    with pytest.raises(NotFound):
        store.get_hierarchy("mnist")
    with pytest.raises(NotFound):
        store.get_hierarchy(FM, 9)
    with pytest.raises(InvalidArgument, match="hierarchy.dataset"):
        store.add_hierarchy(Hierarchy("Bad Name", 1, h.classes, h.tasks))


def test_artifacts_identity_is_content(seeded):
    store, h, lib, experts = seeded
    again, created = store.add_oracle(e.OracleSpec("renamed", FM, {"depth": 16, "width": 4}), blob("oracle"))
    assert not created and again.name == "oracle" and again.params == 2_700_000
    with pytest.raises(AlreadyExists):
        store.add_oracle(e.OracleSpec("oracle", FM, {"depth": 28}), blob("oracle"))
    lib2, created = store.add_library(e.LibrarySpec("library", FM, {"depth": 16}, lib.oracle_id, 40_000),
                                        blob("library"))
    assert not created and lib2.id == lib.id
    x, created = store.add_expert(e.ExpertSpec(lib.id, 1, "footwear", (5, 7, 9), {"num_classes": 3}),
                                  blob("expert-footwear"))
    assert not created and x.id == experts["footwear"].id
    with pytest.raises(AlreadyExists, match="class order"):
        store.add_expert(e.ExpertSpec(lib.id, 1, "footwear", (9, 7, 5), {"num_classes": 3}), blob("expert-footwear"))
    retrained, created = store.add_expert(e.ExpertSpec(lib.id, 1, "footwear", (5, 7, 9), {}), blob("retrained"))
    assert created and retrained.id != x.id
    assert x.class_names == ("Sandal", "Sneaker", "Ankle boot") and x.val_accuracy == pytest.approx(0.9)
    assert count(store, OracleRow) == 1 and count(store, BlobRow) == 8
    assert store.get_blob(blob("oracle").sha256) == blob("oracle")
    assert store.blob_referenced(blob("library").sha256) and not store.blob_referenced("f" * 64)


EXPERT_FIELD_CASES = [
    (lambda lib: e.ExpertSpec(lib, 1, "footwear", (5, 7), {}), "class_ids"),
    (lambda lib: e.ExpertSpec(lib, 1, "footwear", (5, 5, 7), {}), "class_ids"),
    (lambda lib: e.ExpertSpec(lib, 1, "shoes", (5, 7, 9), {}), "task"),
    (lambda lib: e.ExpertSpec(lib, 1, "footwear", (5, 7, 9), {"num_classes": 2}), "config_json"),
    (lambda lib: e.ExpertSpec(lib, 1, "footwear", (5, 7, 9), {}, val_accuracy=1.5), "val_accuracy"),
    (lambda lib: e.ExpertSpec(lib, 0, "footwear", (5, 7, 9), {}), "hierarchy_version"),
    (lambda lib: e.ExpertSpec(0, 1, "footwear", (5, 7, 9), {}), "library_id"),
    (lambda lib: e.ExpertSpec(lib, 1, "footwear", (5, 7, 9), {}, params=-1), "params"),
]


def test_expert_validation_names_the_field(seeded):
    store, _, lib, _ = seeded
    for spec, field in EXPERT_FIELD_CASES:
        with pytest.raises(InvalidArgument) as info:
            store.add_expert(spec(lib.id), blob("x"))
        assert info.value.field == field and str(info.value).startswith(f"{field}:"), (field, str(info.value))
    assert count(store, ExpertRow) == 5


def test_references_must_exist(seeded):
    store, _, lib, experts = seeded
    with pytest.raises(NotFound, match="dataset"):
        store.add_oracle(e.OracleSpec("o", "mnist", {}), blob("o2"))
    with pytest.raises(NotFound, match="oracle_id"):
        store.add_library(e.LibrarySpec("l", FM, {}, 999), blob("l2"))
    with pytest.raises(NotFound, match="library_id"):
        store.add_expert(e.ExpertSpec(999, 1, "bags", (8,), {}), blob("x"))
    with pytest.raises(NotFound, match="hierarchy_version"):
        store.add_expert(e.ExpertSpec(lib.id, 7, "bags", (8,), {}), blob("x"))
    assert count(store, ExpertRow) == 5


def test_publish_is_atomic_and_versions_are_immutable(seeded):
    store, h, lib, experts = seeded
    ids = tuple(x.id for x in experts.values())
    with pytest.raises(NotFound, match="expert_ids"):
        store.publish_pool(e.PoolSpec("fm", "1", lib.id, ids + (999,)))
    assert count(store, PoolVersionRow) == 0  # nothing half-published
    other, _ = store.add_expert(e.ExpertSpec(lib.id, 1, "bags", (8,), {}), blob("bags-2"))
    with pytest.raises(InvalidArgument, match="both for task"):
        store.publish_pool(e.PoolSpec("fm", "1", lib.id, ids + (other.id,)))
    pv, created = store.publish_pool(e.PoolSpec("fm", "1", lib.id, ids, {"input_shape": [1, 28, 28]}, "first"))
    assert created and pv.ref == "fm@1" and pv.aliases == ("latest",) and pv.hierarchy == h
    assert [x.task for x in pv.experts] == list(h.tasks) and pv.info == {"input_shape": [1, 28, 28]}
    assert pv.params == 40_000 + 5 * 12_000
    assert store.publish_pool(e.PoolSpec("fm", "1", lib.id, tuple(reversed(ids))))[1] is False
    with pytest.raises(AlreadyExists, match="immutable"):
        store.publish_pool(e.PoolSpec("fm", "1", lib.id, ids[:-1] + (other.id,)))
    with pytest.raises(InvalidArgument, match="aliases"):
        store.publish_pool(e.PoolSpec("fm", "2", lib.id, ids, aliases=("latest",)))


def test_aliases_latest_and_delete(seeded):
    store, _, lib, experts = seeded
    ids = tuple(x.id for x in experts.values())
    store.publish_pool(e.PoolSpec("fm", "1", lib.id, ids[:2], aliases=("stable",)))
    store.publish_pool(e.PoolSpec("fm", "2", lib.id, ids))
    assert store.get_pool("fm").version == "2" and store.get_pool("fm@latest").version == "2"
    assert store.get_pool("fm@stable").version == "1" and store.get_pool("fm@1").aliases == ("stable",)
    assert store.set_alias("fm", "canary", "2").aliases == ("canary", "latest")
    with pytest.raises(InvalidArgument, match="alias"):
        store.set_alias("fm", "latest", "1")
    with pytest.raises(NotFound, match="version"):
        store.set_alias("fm", "x", "stable")  # an alias is not a version
    store.add_composed_model(e.ComposedModelSpec("fm@2", (5, 7), "torchscript"), blob("model"))
    with pytest.raises(FailedPrecondition, match="canary"):
        store.delete_pool_version("fm", "2")
    store.delete_alias("fm", "canary")
    assert store.delete_pool_version("fm", "2") == 1
    assert store.get_pool("fm").version == "1"  # latest moved back
    with pytest.raises(NotFound):
        store.delete_pool_version("fm", "2")


def test_cached_pool_versions_follow_aliases_and_a_republished_version(seeded):
    """Pool entities are cached; their aliases are read fresh, and a version deleted and published
    again (SQLite may give it the same row id) is never served from the old entry."""
    store, _, lib, experts = seeded
    ids = tuple(x.id for x in experts.values())
    store.publish_pool(e.PoolSpec("fm", "1", lib.id, ids[:2], description="one"))
    store.publish_pool(e.PoolSpec("fm", "2", lib.id, ids, description="two"))
    assert store.get_pool("fm@1").aliases == () and store.get_pool("fm").aliases == ("latest",)
    store.set_alias("fm", "stable", "1")
    assert store.get_pool("fm@1").aliases == ("stable",)
    assert [(p.version, p.aliases) for p in store.list_pools(e.PoolFilter()).items] == \
        [("1", ("stable",)), ("2", ("latest",))]
    assert store.delete_pool_version("fm", "2") == 0
    assert store.get_pool("fm").aliases == ("latest", "stable")
    store.publish_pool(e.PoolSpec("fm", "2", lib.id, ids[:3], description="two again"))
    again = store.get_pool("fm@2")
    assert again.description == "two again" and [x.id for x in again.experts] == list(ids[:3])
    assert [p.description for p in store.list_pools(e.PoolFilter(name="fm")).items] == ["one", "two again"]


def test_listed_experts_come_from_the_cache_as_registered(seeded):
    store, _, lib, experts = seeded
    first = store.list_experts(e.ExpertFilter()).items
    assert first == tuple(store.get_expert(x.id) for x in first)  # whole entities, as a get gives them
    more, _ = store.add_expert(e.ExpertSpec(lib.id, 1, "bags", (8,), {"num_classes": 1}), blob("bags-again"))
    again = store.list_experts(e.ExpertFilter(task="bags")).items
    assert [x.id for x in again] == [experts["bags"].id, more.id] and again[1] == store.get_expert(more.id)


def test_list_search_and_paginate(seeded):
    store, _, lib, experts = seeded
    ids = tuple(x.id for x in experts.values())
    for i in range(5):
        store.publish_pool(e.PoolSpec(f"pool-{i}", "1", lib.id, ids[: i + 1]))
    pages, token = [], ""
    while True:
        page = store.list_pools(e.PoolFilter(), page_size=2, page_token=token)
        pages.append([p.name for p in page.items])
        token = page.next_page_token
        if not token:
            break
    assert pages == [["pool-0", "pool-1"], ["pool-2", "pool-3"], ["pool-4"]]
    with pytest.raises(InvalidArgument, match="page_token"):
        store.list_pools(e.PoolFilter(dataset=FM), page_size=2,
                         page_token=store.list_pools(e.PoolFilter(), page_size=2).next_page_token)
    # "Sandal" is in footwear, the 4th task: only pools with >= 4 experts have it.
    assert [p.name for p in store.list_pools(e.PoolFilter(class_name="sandal")).items] == ["pool-3", "pool-4"]
    assert store.list_pools(e.PoolFilter(dataset="mnist")).items == ()
    assert [x.task for x in store.list_experts(e.ExpertFilter(class_name="Ankle BOOT")).items] == ["footwear"]
    assert len(store.list_experts(e.ExpertFilter(pool="pool-2")).items) == 3
    assert len(store.list_experts(e.ExpertFilter(dataset=FM, library_id=lib.id, task="bags")).items) == 1
    with pytest.raises(NotFound):
        store.list_experts(e.ExpertFilter(pool="missing"))


def test_composed_model_cache(seeded):
    store, _, lib, experts = seeded
    store.publish_pool(e.PoolSpec("fm", "1", lib.id, tuple(x.id for x in experts.values())))
    m, created = store.add_composed_model(e.ComposedModelSpec("fm", (9, 5), "torchscript", {"params": 1}),
                                          blob("model-a"))
    assert created and m.pool == "fm@1" and m.class_ids == (5, 9) and m.hits == 0
    again, created = store.add_composed_model(e.ComposedModelSpec("fm@1", (5, 9), "torchscript"), blob("model-b"))
    assert not created and again.blob == m.blob  # the first entry for a key wins
    assert store.get_composed_model("fm", (5, 9), "torchscript").hits == 1
    hit = store.get_composed_model("fm@latest", [9, 5], "torchscript")
    assert hit.hits == 2 and hit.last_hit_at is not None
    assert store.get_composed_model("fm", (5, 9), "torchscript", count_hit=False).hits == 2
    with pytest.raises(NotFound):
        store.get_composed_model("fm", (5,), "torchscript")
    with pytest.raises(InvalidArgument, match="class_ids"):
        store.add_composed_model(e.ComposedModelSpec("fm", (5, 99), "torchscript"), blob("m"))
    with pytest.raises(InvalidArgument, match="format"):
        store.add_composed_model(e.ComposedModelSpec("fm", (5,), "Torch Script"), blob("m"))


def test_jobs_and_lineage(seeded):
    store, _, lib, experts = seeded
    job = store.create_job({"pool": "fm"}, oracle_id=lib.oracle_id)
    assert job.state is e.JobState.PENDING and len(job.id) == 32
    store.update_job(job.id, e.JobUpdate(state=e.JobState.RUNNING, progress=0.25, stage="library"))
    store.publish_pool(e.PoolSpec("fm", "1", lib.id, tuple(x.id for x in experts.values())))
    done = store.update_job(job.id, e.JobUpdate(state=e.JobState.FAILED, error="disk full"))
    assert done.error == "disk full" and done.progress == 0.25 and done.updated_at >= done.created_at
    with pytest.raises(FailedPrecondition):
        store.update_job(job.id, e.JobUpdate(progress=0.5))
    with pytest.raises(NotFound):
        store.update_job("nope", e.JobUpdate(progress=0.5))
    with pytest.raises(NotFound, match="oracle_id"):
        store.create_job({}, oracle_id=999)
    assert [j.id for j in store.list_jobs(e.JobState.FAILED).items] == [job.id]

    nodes = store.lineage("expert", str(experts["bags"].id))
    assert [(n.kind, n.name) for n in nodes] == [("expert", "bags"), ("library", "library"), ("oracle", "oracle"),
                                                 ("dataset", FM)]
    assert nodes[2].blob == blob("oracle")
    assert [n.kind for n in store.lineage("oracle", str(lib.oracle_id))] == ["oracle", "dataset"]
    with pytest.raises(InvalidArgument, match="id"):
        store.lineage("expert", "bags")


def test_concurrent_identical_registrations_make_one_row(seeded):
    store, _, lib, _ = seeded
    results, errors = [], []
    barrier = threading.Barrier(6)

    def register():
        try:
            barrier.wait()
            results.append(store.add_expert(e.ExpertSpec(lib.id, 1, "tops", (0, 6), {}), blob("same")))
        except Exception as err:  # noqa: BLE001 - asserted below
            errors.append(err)

    threads = [threading.Thread(target=register) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({x.id for x, _ in results}) == 1 and sum(created for _, created in results) == 1


def test_before_commit_failure_leaves_no_row(seeded):
    store, _, lib, _ = seeded
    n = count(store, ExpertRow), count(store, BlobRow)

    def boom():
        raise Unavailable("blob store down")

    with pytest.raises(Unavailable):
        store.add_expert(e.ExpertSpec(lib.id, 1, "bags", (8,), {}), blob("new"), before_commit=boom)
    assert (count(store, ExpertRow), count(store, BlobRow)) == n


def test_session_scope_maps_database_errors(store, tmp_path):
    from sqlalchemy import text

    with pytest.raises(AlreadyExists):
        with db.session_scope(store._factory, write=True) as s:
            s.add(BlobRow(sha256="a" * 64, size=1, media_type="x"))
            s.add(BlobRow(sha256="a" * 64, size=1, media_type="x"))
            s.flush()
    assert count(store, BlobRow) == 0
    dead = SqlRegistryStore("postgresql+psycopg://nobody@127.0.0.1:1/none", require_current=False)
    with pytest.raises(Unavailable, match="database unavailable"):
        dead.get_oracle(1)
    with pytest.raises(Unavailable):
        dead.ping()
    with pytest.raises(Unavailable):
        with db.session_scope(dead._factory) as s:
            s.execute(text("SELECT 1"))
    dead.close()
    store.ping()
