"""Extraction jobs end to end through gRPC: a real registry, real extractors, their stages as tasks
on a real Ray training tiny networks on a real Fashion-MNIST subset. Retries of a killed worker,
resume after a restart and task errors are in test_ray.py."""

from __future__ import annotations

import json

import pytest
import torch
from testenv import alive

from poe.engine.errors import AlreadyExists, FailedPrecondition
from poe.engine.hierarchy import builtin
from poe.v1 import common_pb2 as c

PENDING, RUNNING = c.EXTRACTION_STATE_PENDING, c.EXTRACTION_STATE_RUNNING
SUCCEEDED, FAILED, CANCELLED = c.EXTRACTION_STATE_SUCCEEDED, c.EXTRACTION_STATE_FAILED, c.EXTRACTION_STATE_CANCELLED
WAIT = 180.0
TASKS = list(builtin("fashion-mnist").tasks)


def log_lines(run, stage_prefix: str) -> list[dict]:
    path = run / "train.log"
    lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return [r for r in lines if r["stage"].startswith(stage_prefix)]


def epochs_of(lines: list[dict]) -> list[int]:
    return [r["epoch"] for r in lines if "event" not in r]


def test_tiny_extraction_end_to_end(extractor, registry, params, data, settings, poll):
    client, runtime = extractor
    # Experts of several epochs: the job lasts long enough for an ETA (measured over at least 0.5 s).
    job = client.start(params(expert_epochs=6))
    assert job.state == PENDING and job.id
    updates = list(client.follow(job.id, timeout=WAIT))
    final = updates[-1].job
    assert final.state == SUCCEEDED, final.error
    assert (final.pool, final.progress, final.stage) == ("tiny@1", 1.0, "done")

    # Progress: every phase in order, experts k of n with epoch/step/loss, an ETA along the way.
    phases = list(dict.fromkeys(u.progress.phase for u in updates))
    order = ["prepare", "teacher", "library", "experts", "publish", "done"]
    assert [p for p in phases if p in order] == order, phases
    experts = {(u.progress.expert, u.progress.experts, u.progress.task) for u in updates
               if u.progress.phase == "experts"}
    assert {(k, n, t) for k, n, t in experts} == {(k + 1, 5, t) for k, t in enumerate(TASKS)}
    lib = [u.progress for u in updates if u.progress.phase == "library" and u.progress.step]
    assert lib and lib[-1].step == lib[-1].steps == 6 and lib[-1].epochs == 1 and lib[-1].loss > 0
    assert any(u.progress.HasField("eta_seconds") for u in updates)
    assert all(u.progress.live and u.progress.attempt == 1 and u.progress.device == settings.device
               for u in updates if u.progress.phase in ("library", "experts"))
    states = [u.job.state for u in updates]
    assert states == sorted(states) and states[0] == PENDING and RUNNING in states
    fractions = [u.job.progress for u in updates]
    assert fractions == sorted(fractions)

    # The registry holds the published pool: one library from this oracle, five experts.
    pv = registry.client.get_pool("tiny@1")
    assert [x.task for x in pv.experts] == TASKS and "latest" in pv.aliases
    assert pv.library.oracle_id == final.oracle_id > 0
    assert all(x.HasField("val_accuracy") for x in pv.experts)  # the IDX folder has a test split
    info = json.loads(pv.info_json)
    assert info["input_shape"] == [1, 28, 28] and info["extraction"]["job"] == job.id
    got = client.get(job.id)
    assert got.job.state == SUCCEEDED and got.progress.phase == "done"
    assert [j.id for j in client.list()] == [job.id]
    run = settings.home / "extractions" / job.id
    assert log_lines(run, "library")  # the logs stay; checkpoints and teacher views go
    assert poll(lambda: not list(run.glob("*.ckpt")) and not (run / "teacher_views.safetensors").exists())

    # The composer serves the new pool.
    from poe.client.composer import Composer
    from poe_services.host import create_server

    host = create_server("127.0.0.1:0", settings, ("composer",), registry_target=registry.target, warm=False)
    host.start()
    try:
        with Composer(f"127.0.0.1:{host.port}") as composer:
            result = composer.compose(classes=["Sandal", "Sneaker", "Bag"], pool="tiny@1")
    finally:
        host.stop(0).wait(30)
    model, meta = result.load()
    assert meta["pool"] == "tiny@1" and meta["class_ids"] == [5, 7, 8]
    test = data["test"]
    mask = torch.isin(test.labels, torch.tensor([5, 7, 8]))
    with torch.no_grad():
        logits = model(test.images[mask].float() / 255)
    assert logits.shape == (int(mask.sum()), 3) and torch.isfinite(logits).all()


def test_queue_bound_idempotent_start_and_cancel(extractor, registry, params, settings, poll):
    client, runtime = extractor
    slow = client.start(params(expert_epochs=40))
    queued = client.start(params(), job_id="queued-1")  # the next version; waits: one job at a time
    assert json.loads(queued.params_json)["pool"]["version"] == "2"
    # Retrying a start with the same id and parameters is idempotent; other parameters are not.
    assert client.start(params(), job_id="queued-1").id == "queued-1"
    with pytest.raises(AlreadyExists, match="different parameters"):
        client.start(params(seed=7), job_id="queued-1")
    with pytest.raises(AlreadyExists, match=f"job {slow.id} is already extracting tiny@1"):
        client.start(params(pool_version="1"))
    assert client.get("queued-1").job.state == PENDING
    cancelled = client.cancel("queued-1")  # never started: nothing to undo
    assert cancelled.state == CANCELLED
    assert not (settings.home / "extractions" / "queued-1").exists()

    for u in client.follow(slow.id, timeout=WAIT):
        assert u.job.state in (PENDING, RUNNING)
        if u.progress.phase == "experts" and u.progress.epoch >= 1 and runtime.task_pids(slow.id):
            break
    pids = list(runtime.task_pids(slow.id).values())
    assert pids and all(alive(p) for p in pids)
    job = client.cancel(slow.id)
    assert job.state == CANCELLED and job.message == "cancelled"

    # The tasks stop, the run directory goes, nothing is published; the state stays CANCELLED.
    run = settings.home / "extractions" / slow.id
    assert poll(lambda: not any(alive(p) for p in pids) and not run.exists() and not runtime.task_pids(slow.id))
    assert poll(lambda: runtime.jobs.get(slow.id) is None)
    assert list(registry.client.list_pools()) == []
    assert client.get(slow.id).job.state == CANCELLED
    assert registry.client.get_job(slow.id).state == CANCELLED
    with pytest.raises(FailedPrecondition, match="already cancelled"):
        client.cancel(slow.id)
    assert {j.id: j.state for j in client.list()} == {slow.id: CANCELLED, "queued-1": CANCELLED}


def test_incremental_experts_reuse_library_and_experts(extractor, registry, params, settings, random_pool,
                                                       tmp_path):
    """New experts on a published pool: the library and the other experts are reused as they are."""
    import dataclasses

    from poe.engine import pool as pool_mod

    client, _runtime = extractor
    partial = dataclasses.replace(random_pool, experts={t: e for t, e in random_pool.experts.items()
                                                        if t != "footwear"})
    v1, _ = registry.client.import_pool(pool_mod.save(partial, tmp_path / "partial"))
    assert [x.task for x in v1.experts] == ["tops", "warm-layers", "lower-body-and-dresses", "bags"]

    # The missing task is trained; oracle, pool name and version default from the base pool.
    p = {k: v for k, v in params(base_pool="test-pool").items()
         if k not in ("student_depth", "student_width", "oracle", "pool_name", "expert_width")}
    second = client.wait(client.start(p).id, timeout=WAIT)
    assert second.state == SUCCEEDED, second.error
    assert second.pool == "test-pool@2" and second.oracle_id == v1.library.oracle_id
    v2 = registry.client.get_pool("test-pool@2")
    assert [x.task for x in v2.experts] == TASKS
    assert v2.library.id == v1.library.id
    ids1, ids2 = ({x.task: x.id for x in v.experts} for v in (v1, v2))
    assert {t: ids2[t] for t in ids1} == ids1
    assert json.loads(v2.experts[3].config_json)["width"] == 8  # the base pool's expert shape
    run2 = settings.home / "extractions" / second.id
    assert not log_lines(run2, "library")
    assert {r["stage"] for r in log_lines(run2, "expert-")} == {"expert-footwear"}

    # A new hierarchy version that regroups the upper body: one new expert; the unchanged tasks'
    # experts carry over (the same weights, filed under the new hierarchy version).
    h2 = builtin("fashion-mnist").to_dict()
    h2["version"] = 2
    tasks = dict(h2["tasks"])
    h2["tasks"] = {"upper-body": tasks.pop("tops") + tasks.pop("warm-layers"), **tasks}
    p = {**{k: v for k, v in p.items() if k != "hierarchy"}, "base_pool": "test-pool@2",
         "hierarchy_text": json.dumps(h2)}
    third = client.wait(client.start(p).id, timeout=WAIT)
    assert third.state == SUCCEEDED, third.error
    v3 = registry.client.get_pool("test-pool@3")
    assert v3.hierarchy.version == 2 and v3.library.id == v1.library.id
    assert [x.task for x in v3.experts] == ["upper-body", "lower-body-and-dresses", "footwear", "bags"]
    sha2 = {x.task: x.blob.sha256 for x in v2.experts}
    for x in v3.experts[1:]:
        assert x.blob.sha256 == sha2[x.task] and x.hierarchy_version == 2
    run3 = settings.home / "extractions" / third.id
    assert {r["stage"] for r in log_lines(run3, "expert-")} == {"expert-upper-body"}


def test_two_extractors_on_one_registry(extractors, registry, params, settings, poll, tmp_path):
    """Extractors "a" and "b" serve one registry, each with its own POE_HOME: each resumes only its
    own jobs, and a job of "a" cancelled through "b" stops on "a" (nothing published)."""
    home_b = {"POE_EXTRACTOR_ID": "b", "POE_HOME": str(tmp_path / "home-b")}
    host_a, client_a, runtime_a = extractors.start(POE_EXTRACTOR_ID="a")
    _host_b, client_b, runtime_b = extractors.start(**home_b)
    job = client_a.start(params(expert_epochs=40, tasks=["tops"], pool_name="of-a"))
    for u in client_a.follow(job.id, timeout=WAIT):
        if u.progress.phase == "experts" and u.progress.epoch >= 1:
            break
    assert json.loads(registry.client.get_job(job.id).params_json)["extractor"] == "a"
    extractors.stop(host_a)  # the job stays RUNNING, on a's run directory
    assert registry.client.get_job(job.id).state == RUNNING

    # Another "b" looks at the unfinished jobs: not its own, left alone.
    _host, client_b2, runtime_b2 = extractors.start(**home_b)
    assert runtime_b2.jobs.get(job.id) is None and registry.client.get_job(job.id).state == RUNNING
    # "a" again: resumes it; cancelled through "b", it stops on "a".
    _host, client_a2, runtime_a2 = extractors.start(POE_EXTRACTOR_ID="a")
    assert poll(lambda: bool(runtime_a2.task_pids(job.id)))
    pids = list(runtime_a2.task_pids(job.id).values())
    assert client_b.cancel(job.id).state == CANCELLED  # not b's job: only the record changes
    assert poll(lambda: runtime_a2.jobs.get(job.id) is None and not any(alive(p) for p in pids), timeout=30)
    assert not (settings.home / "extractions" / job.id).exists()
    assert list(registry.client.list_pools()) == []
    assert client_a2.get(job.id).job.state == CANCELLED


def test_extractor_id_is_checked():
    from poe.engine.config import Settings
    from poe.engine.errors import InvalidArgument

    assert Settings.from_env({"POE_EXTRACTOR_ID": " extractor-0 "}).extractor_id == "extractor-0"
    for bad in ("Extractor", "-a", "a/b", "x" * 64):
        with pytest.raises(InvalidArgument, match="^POE_EXTRACTOR_ID: expected 1-63 lower-case"):
            Settings.from_env({"POE_EXTRACTOR_ID": bad})
