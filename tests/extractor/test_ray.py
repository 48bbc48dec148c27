"""The Ray executor with the session's real one-node Ray on loopback (conftest), a real registry and
real extractors, training tiny networks on the real Fashion-MNIST subset: sharding, retries of a
killed worker, resume, cancel, task errors, the benchmark."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
from testenv import alive

from poe.engine import compose, evaluate
from poe.engine import pool as pool_mod
from poe.v1 import common_pb2 as c
from poe_services.extractor import stages

RUNNING, SUCCEEDED, CANCELLED = c.EXTRACTION_STATE_RUNNING, c.EXTRACTION_STATE_SUCCEEDED, c.EXTRACTION_STATE_CANCELLED
WAIT = 180.0
RAY = {"POE_RAY_WORKERS": "2", "POE_RAY_CPUS_PER_TASK": "1"}
# 300 images x 4 views: the teacher views come in two shards (500 + 700 images), the features too (1000 + 200).
VIEWS = 4


def log_lines(run, stage: str) -> list[dict]:
    path = run / "train.log"
    lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return [r for r in lines if r["stage"] == stage]


def epochs_of(lines: list[dict]) -> list[int]:
    return [r["epoch"] for r in lines if "event" not in r]


def composed_accuracy(registry, ref: str, tmp_path, test) -> float:
    """Accuracy of the pool's model of every class on the full Fashion-MNIST test set."""
    directory = tmp_path / ref.replace("@", "-")
    registry.client.export_pool(ref, directory)
    pool = pool_mod.load(directory, with_oracle=False)
    plan, model = compose.compose(pool, tasks=list(pool.hierarchy.tasks))
    with torch.no_grad():
        return evaluate.evaluate_model(model.eval(), list(plan.class_ids), test).accuracy


def test_shards_cover_everything_in_aligned_order():
    assert stages.shards(1200, 2, 500) == [(0, 500), (500, 1200)]
    assert stages.shards(1200, 3, 500) == [(0, 500), (500, 1000), (1000, 1200)]
    assert stages.shards(300, 4, 500) == [(0, 300)]
    assert stages.shards(0, 2, 500) == []
    for count, parts in ((10_001, 7), (5, 1), (4_000, 4)):
        got = stages.shards(count, parts, 1000)
        assert got[0][0] == 0 and got[-1][1] == count and len(got) <= parts
        assert all(a % 1000 == 0 and a < b for a, b in got)
        assert all(b == a2 for (_, b), (a2, _) in zip(got, got[1:], strict=False))


def test_ray_settings_are_checked():
    from poe.engine.config import Settings
    from poe.engine.errors import InvalidArgument

    s = Settings.from_env({"POE_RAY_ADDRESS": " ray://head:10001 ", "POE_RAY_WORKERS": "3",
                           "POE_RAY_CPUS_PER_TASK": "2", "POE_RAY_GPUS_PER_TASK": "0.5"})
    assert (s.ray_address, s.ray_workers, s.ray_cpus_per_task, s.ray_gpus_per_task) == \
        ("ray://head:10001", 3, 2.0, 0.5)
    d = Settings.from_env({})
    assert (d.ray_address, d.ray_workers, d.ray_cpus_per_task, d.ray_gpus_per_task) == ("", 0, 1.0, 0.0)
    assert Settings.from_env({"POE_RAY_RUNTIME_ENV": ' {"env_vars": {"A": "1"}} '}).ray_runtime_env == \
        '{"env_vars": {"A": "1"}}'
    for name, value, expected in (("POE_RAY_WORKERS", "-1", "a whole number >= 0"),
                                  ("POE_RAY_CPUS_PER_TASK", "-2", "a number >= 0"),
                                  ("POE_RAY_GPUS_PER_TASK", "nan", "a number >= 0"),
                                  ("POE_RAY_RUNTIME_ENV", "[1]", "a JSON object"),
                                  ("POE_RAY_RUNTIME_ENV", "{env_vars", "a JSON object")):
        with pytest.raises(InvalidArgument, match=f"^{name}: expected {expected}"):
            Settings.from_env({name: value})
    # Zero CPUs per task is a valid number but no way to run stages: the extractor refuses to start.
    from poe_services.extractor.ray_executor import RayExecutor

    with pytest.raises(InvalidArgument, match="^POE_RAY_CPUS_PER_TASK: expected a number > 0, got 0$"):
        RayExecutor(Settings.from_env({"POE_RAY_CPUS_PER_TASK": "0"}))


# Run in a fresh interpreter: the extractor's own local Ray (POE_RAY_RUNTIME_ENV set) runs a task
# that sees the runtime environment's variable, then stops with the extractor.
RUNTIME_ENV_CHECK = """
import os, sys
import ray
from poe.engine.config import Settings
from poe_services.extractor.ray_executor import RayCluster

cluster = RayCluster(Settings.from_env({"POE_HOME": sys.argv[1],
                                        "POE_RAY_RUNTIME_ENV": '{"env_vars": {"POE_MARK": "from-env"}}'}))
cluster.connect()
try:
    seen = ray.get(ray.remote(lambda: os.environ.get("POE_MARK")).options(num_cpus=1).remote())
finally:
    cluster.close()
print(seen, ray.is_initialized())
"""


def test_the_runtime_env_setting_reaches_the_tasks(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", RUNTIME_ENV_CHECK, str(tmp_path)], capture_output=True, text=True,
                          timeout=180, env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "from-env False"


def test_sharded_extraction_matches_the_one_worker_one(extractors, registry, params, oracle, settings, tmp_path,
                                                       fmnist_test):
    """The same job with one worker per stage and with two (two extractors, one registry, at once):
    identical teacher views, library and experts (same seeds, one torch thread each, shards aligned
    on the batches), so the composed models are equally accurate. The TorchScript oracle travels to
    the tasks as the bytes checked at the start (and runs in fp32: bf16 is slow on CPUs without
    native support); the other tests use the registered safetensors oracle."""
    job_params = params(views=VIEWS, oracle={"path": oracle["torchscript"]})
    _host, local, _runtime = extractors.start(**{**RAY, "POE_RAY_WORKERS": "1"})
    _host, client, runtime = extractors.start(**RAY)  # both have looked for jobs to resume: none
    local_job = local.start({**job_params, "pool_name": "local"})
    job = client.start({**job_params, "pool_name": "ray"})
    updates = list(client.follow(job.id, timeout=WAIT))
    final = updates[-1].job
    assert final.state == SUCCEEDED, final.error
    local_final = local.wait(local_job.id, timeout=WAIT)
    assert local_final.state == SUCCEEDED, local_final.error
    assert final.pool == "ray@1" and runtime.task_pids(job.id) == {}  # nothing left running
    phases = list(dict.fromkeys(u.progress.phase for u in updates))
    order = ["prepare", "teacher", "library", "experts", "publish", "done"]
    assert [p for p in phases if p in order] == order, phases
    assert {u.progress.task for u in updates if u.progress.phase == "experts"} >= set(json.loads(
        final.params_json)["tasks"])
    fractions = [u.job.progress for u in updates]
    assert fractions == sorted(fractions)

    # Registered bytes: the library and every expert are the local run's, bit for bit.
    local_pool, ray_pool = registry.client.get_pool("local@1"), registry.client.get_pool("ray@1")
    assert ray_pool.library.blob.sha256 == local_pool.library.blob.sha256
    assert [(x.task, x.blob.sha256) for x in ray_pool.experts] == [(x.task, x.blob.sha256) for x in local_pool.experts]
    # The run directory has the training log of every stage, relayed from the Ray tasks.
    run = settings.home / "extractions" / job.id
    assert epochs_of(log_lines(run, "library")) == [1]
    assert all(epochs_of(log_lines(run, f"expert-{x.task}")) == [1] for x in ray_pool.experts)

    acc_local = composed_accuracy(registry, "local@1", tmp_path, fmnist_test)
    acc_ray = composed_accuracy(registry, "ray@1", tmp_path, fmnist_test)
    assert abs(acc_ray - acc_local) <= 0.01, (acc_ray, acc_local)


def _follow_until(client, job_id: str, predicate) -> bool:
    for u in client.follow(job_id, timeout=WAIT):
        assert u.job.state in (c.EXTRACTION_STATE_PENDING, RUNNING), u.job.error
        if predicate(u):
            return True
    return False


def test_killed_ray_worker_is_retried_and_a_restarted_extractor_resumes(extractors, registry, params, settings):
    """SIGKILL of the Ray worker training an expert: Ray runs the task again, from the expert's last
    epoch checkpoint. Then the extractor stops mid-expert; the next one skips the finished experts
    and resumes the unfinished one from its checkpoint."""
    host, client, runtime = extractors.start(**RAY)
    # One expert at a time: the job's own ray_workers wins over the extractor's POE_RAY_WORKERS=2.
    job = client.start(params(tasks=["tops", "footwear", "bags"], expert_epochs=4, batch_size=3,  # slow epochs
                              ray_workers=1))
    pids = runtime.task_pids
    assert _follow_until(client, job.id, lambda u: u.progress.phase == "experts" and u.progress.task == "tops"
                         and u.progress.epoch >= 2 and "expert-tops" in pids(job.id))
    killed = pids(job.id)["expert-tops"]
    os.kill(killed, signal.SIGKILL)

    assert _follow_until(client, job.id, lambda u: u.progress.task == "footwear" and u.progress.epoch >= 2
                         and "expert-footwear" in pids(job.id))
    assert killed not in pids(job.id).values()
    registered = {x.task: x.id for x in registry.client.list_experts(dataset="fashion-mnist")}
    assert set(registered) == {"tops"}
    extractors.stop(host)  # cancels the tasks; the job stays RUNNING
    assert registry.client.get_job(job.id).state == RUNNING

    _host, client2, _runtime2 = extractors.start(**RAY)
    final = client2.wait(job.id, timeout=WAIT)
    assert final.state == SUCCEEDED, final.error
    run = settings.home / "extractions" / job.id
    tops = log_lines(run, "expert-tops")
    assert any(r.get("event") == "resumed" and r["epoch"] >= 1 for r in tops)  # the retried task
    assert sorted(set(epochs_of(tops))) == [1, 2, 3, 4] and len(epochs_of(tops)) <= 5
    footwear = log_lines(run, "expert-footwear")
    assert any(r.get("event") == "resumed" and r["epoch"] >= 1 for r in footwear)  # the restarted extractor
    assert sorted(set(epochs_of(footwear))) == [1, 2, 3, 4] and len(epochs_of(footwear)) <= 5
    assert epochs_of(log_lines(run, "expert-bags")) == [1, 2, 3, 4]
    assert epochs_of(log_lines(run, "library")) == [1]
    pv = registry.client.get_pool("tiny@1")
    assert [x.task for x in pv.experts] == ["tops", "footwear", "bags"]
    assert pv.experts[0].id == registered["tops"]


def test_cancel_stops_every_ray_task(extractors, registry, params, settings, poll):
    """Cancel mid-experts: every task's worker process is gone within 10 s, nothing is published."""
    _host, client, runtime = extractors.start(**RAY)
    job = client.start(params(expert_epochs=50, batch_size=10))
    pids = runtime.task_pids
    assert _follow_until(client, job.id, lambda u: u.progress.phase == "experts" and len(pids(job.id)) == 2)
    running = list(pids(job.id).values())
    assert all(alive(p) for p in running)
    t0 = time.monotonic()
    assert client.cancel(job.id).state == CANCELLED
    assert poll(lambda: not any(alive(p) for p in running), timeout=10), "a Ray task outlived the cancel"
    assert time.monotonic() - t0 <= 10
    run = settings.home / "extractions" / job.id
    assert poll(lambda: runtime.jobs.get(job.id) is None and not run.exists())
    assert list(registry.client.list_pools()) == []
    assert registry.client.get_job(job.id).state == CANCELLED


def test_an_error_in_a_task_fails_the_job(extractors, registry, params, oracle, tmp_path, settings):
    """An oracle that passes the start-up check (two images) but fails on a real batch, in a Ray task:
    the job fails at once (no retry) with the task's message, and publishes nothing."""
    from poe.engine.export import quiet_jit

    class Picky(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > 2:
                raise RuntimeError("picky oracle: at most 2 images per batch")
            return self.inner(x)

    path = tmp_path / "picky.pt"
    with quiet_jit():
        torch.jit.script(Picky(torch.jit.trace(oracle["model"], torch.rand(2, 1, 28, 28)))).save(str(path))
    _host, client, _runtime = extractors.start(**RAY)
    final = client.wait(client.start(params(oracle={"path": str(path)})).id, timeout=WAIT)
    assert final.state == c.EXTRACTION_STATE_FAILED
    assert final.error.startswith("teacher-0: ") and "picky oracle" in final.error, final.error
    assert final.message.startswith("failed:")
    assert list(registry.client.list_pools()) == []
    assert (settings.home / "extractions" / final.id / "oracle.torchscript").exists()  # kept for a post-mortem


def test_bench_extract_quick(pool_dir, tmp_path):
    """`poe bench extract --quick` on the test pool (its tiny oracle), in the tests' Ray: every stage
    timed for 1 and 2 workers, with the same trained bytes."""
    from poe.bench import extract

    result = extract.run(pool_dir, (1, 2), quick=True)
    rows = result["rows"]
    assert [r["workers"] for r in rows] == [1, 2]
    assert all(r["seconds"][k] > 0 for r in rows for k in extract.STAGES)
    assert all(r["same_result"] for r in rows)
    text = extract.markdown({**result, "hardware": {"cpu": "cpu", "cores": 2, "torch": "t", "torch_threads": 1,
                                                    "python": "3.11"}, "date": "today"}, "poe bench extract --quick")
    assert "| 2 | " in text and "same result" in text


def test_a_job_with_a_data_parallel_library(extractors, registry, params, settings, poll):
    """library_workers=2: the library's KD runs on two Ray Train workers (rank 0 reports), the job
    publishes a pool; a second such job cancelled mid-KD stops both ranks within 10 s and gives their
    CPUs back."""
    import ray

    _host, client, runtime = extractors.start(**RAY)
    job = client.start(params(library_workers=2, library_epochs=2, tasks=["bags"], pool_name="ddp"))
    final = client.wait(job.id, timeout=WAIT)
    assert final.state == SUCCEEDED, final.error
    run = settings.home / "extractions" / job.id
    assert epochs_of(log_lines(run, "library")) == [1, 2]  # rank 0's log, once per epoch
    assert [x.task for x in registry.client.get_pool("ddp@1").experts] == ["bags"]

    slow = client.start(params(library_workers=2, library_epochs=50, batch_size=10, tasks=["bags"],
                               pool_name="ddp-cancelled"))
    assert _follow_until(client, slow.id, lambda u: u.progress.phase == "library" and u.progress.epoch >= 1
                         and "library" in runtime.task_pids(slow.id))
    rank0 = runtime.task_pids(slow.id)["library"]
    t0 = time.monotonic()
    assert client.cancel(slow.id).state == CANCELLED
    assert poll(lambda: not alive(rank0), timeout=10), "a data-parallel rank outlived the cancel"
    assert time.monotonic() - t0 <= 10
    assert poll(lambda: ray.available_resources().get("CPU", 0) >= 2, timeout=10)  # placement group gone
    assert [p.name for p in registry.client.list_pools()] == ["ddp"]
