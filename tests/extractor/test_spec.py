"""The job spec as stored with a job (params_json, format poe.extraction/v1): it reads back exactly
what was written, specs stored before `JobSpec` existed still load, and a bad dict is refused."""

from __future__ import annotations

import copy
import json

import pytest

from poe.engine.errors import InvalidArgument
from poe.engine.hierarchy import builtin
from poe.engine.train import Schedule
from poe_services.extractor.spec import FORMAT, JobSpec, RayResources, RegistryOracle, TorchScriptOracle

SCHEDULE = {"epochs": 1, "batch_size": 50, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0005,
            "warmup_epochs": 1.0, "seed": 0}
ORACLE_CONFIG = {"depth": 10, "width": 1, "in_channels": 1, "num_classes": 10, "stem_stride": 1, "dropout": 0.0,
                 "mean": [0.286], "std": [0.353]}

# What the planner stored before the spec was a dataclass (a plain dict, written key by key).
STORED_FULL = {
    "format": "poe.extraction/v1",
    "request": {"dataset": "/data/fmnist-idx", "hierarchy": "fashion-mnist", "pool_name": "tiny",
                "oracle": {"path": "/runs/oracle.safetensors"}, "library_epochs": 1},
    "dataset": "/data/fmnist-idx", "subset": 0, "seed": 0, "views": 1, "input_shape": [1, 28, 28],
    "num_classes": 10, "train_images": 300, "hierarchy": builtin("fashion-mnist").to_dict(),
    "tasks": ["tops", "footwear"], "oracle": {"kind": "registry", "id": 3, "config": ORACLE_CONFIG},
    "base": None, "student": {"depth": 10, "width": 1, "stem_stride": 1}, "expert": {"width": 4, "blocks": 1},
    "library_schedule": SCHEDULE, "expert_schedule": SCHEDULE,
    "ckd": {"temperature": 4.0, "soft_weight": 1.0, "scale_weight": 0.3}, "device": "cpu",
    "pool": {"name": "tiny", "version": "1", "aliases": []},
}
STORED_INCREMENTAL = {
    **STORED_FULL,
    "request": {"dataset": "/data/fmnist-idx", "base_pool": "test-pool", "oracle": {"path": "/runs/o.pt"}},
    "tasks": ["footwear"],
    "oracle": {"kind": "torchscript", "file": "oracle.torchscript", "source": "/runs/o.pt", "sha256": "ab" * 32,
               "num_classes": 10},
    "base": {"pool": "test-pool@1", "library_id": 1, "library_sha256": "cd" * 32, "library_config": ORACLE_CONFIG,
             "library_oracle_id": 2, "hierarchy_version": 1, "dropped": [],
             "reuse": {"tops": {"id": 4, "sha256": "ef" * 32, "class_ids": [0, 6], "config": {"width": 8},
                                "params": 100, "hierarchy_version": 1, "val_accuracy": None, "metrics": {},
                                "loss": {"temperature": 4.0}}}},
    "student": None, "library_schedule": None, "expert": {"width": 8, "blocks": 1},
    "pool": {"name": "test-pool", "version": "2", "aliases": ["stable"]},
    "resources": {"workers": 8, "cpus_per_task": 2.0, "gpus_per_task": 0.5, "library_workers": 4},
}


@pytest.mark.parametrize("stored", [STORED_FULL, STORED_INCREMENTAL], ids=["full", "incremental"])
def test_stored_specs_load_and_serialise_to_the_same_dict(stored):
    spec = JobSpec.from_dict(json.loads(json.dumps(stored)))
    assert spec.to_dict() == {"resources": {"workers": 0, "cpus_per_task": 0.0, "gpus_per_task": 0.0,
                                            "library_workers": 0}, **stored}
    assert JobSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_a_spec_stored_before_jobs_had_their_own_ray_resources_uses_the_extractors():
    """STORED_FULL has no "resources" key (specs stored before it existed): zeros, which mean the
    extractor's POE_RAY_* settings; it is written out with the key from then on."""
    assert "resources" not in STORED_FULL
    spec = JobSpec.from_dict(json.loads(json.dumps(STORED_FULL)))
    assert spec.resources == RayResources()
    assert spec.to_dict()["resources"] == {"workers": 0, "cpus_per_task": 0.0, "gpus_per_task": 0.0,
                                           "library_workers": 0}
    assert JobSpec.from_dict(STORED_INCREMENTAL).resources == RayResources(8, 2.0, 0.5, 4)


def test_typed_fields():
    full = JobSpec.from_dict(STORED_FULL)
    assert isinstance(full.oracle, RegistryOracle) and full.registered_oracle_id == 3
    assert full.expert_schedule == Schedule(**SCHEDULE) and full.ref == "tiny@1"
    assert (full.hierarchy_dataset, full.hierarchy_version) == ("fashion-mnist", 1)
    inc = JobSpec.from_dict(STORED_INCREMENTAL)
    assert isinstance(inc.oracle, TorchScriptOracle) and inc.registered_oracle_id is None
    assert inc.base.reuse["tops"].class_ids == [0, 6] and inc.student is None and inc.ref == "test-pool@2"


def _changed(path: tuple[str, ...], value=None, delete: bool = False) -> dict:
    d = copy.deepcopy(STORED_INCREMENTAL)
    target = d
    for key in path[:-1]:
        target = target[key]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return d


@pytest.mark.parametrize("bad, message", [
    (_changed(("seeds",), 1), "job spec: unknown key(s) seeds"),
    (_changed(("views",), delete=True), "job spec: missing key(s) views"),
    (_changed(("format",), delete=True), "job spec: missing key(s) format"),
    (_changed(("format",), "poe.extraction/v0"), f"job spec: format 'poe.extraction/v0', expected '{FORMAT}'"),
    (_changed(("pool", "alias"), "x"), "job spec: pool: unknown key(s) alias"),
    (_changed(("expert_schedule", "lr"), delete=True), "job spec: expert_schedule: missing key(s) lr"),
    (_changed(("base", "reuse", "tops", "sha"), "x"), "job spec: base.reuse.tops: unknown key(s) sha"),
    (_changed(("oracle", "kind"), "pickle"), "job spec: oracle: kind must be one of registry, torchscript"),
    (_changed(("oracle", "id"), 3), "job spec: oracle: unknown key(s) id"),
    (_changed(("student",), [10, 1, 1]), "job spec: student: expected an object, got list"),
    (_changed(("resources", "gpus"), 1), "job spec: resources: unknown key(s) gpus"),
    ([STORED_FULL], "job spec: expected an object, got list"),
])
def test_bad_dicts_are_refused_with_the_key_they_are_about(bad, message):
    with pytest.raises(InvalidArgument) as info:
        JobSpec.from_dict(bad)
    assert str(info.value).startswith(message), str(info.value)


def test_an_unreadable_stored_spec_fails_its_job_on_resume(registry, extractors):
    """A restarted extractor fails a job whose spec it cannot read instead of leaving it unfinished;
    jobs of another format are left alone."""
    import os

    from poe.client.registry import RegistryClient
    from poe.v1 import common_pb2 as c

    broken = {k: v for k, v in STORED_FULL.items() if k != "seed"}
    # Job records are written by the extractor, with the service token.
    with RegistryClient(registry.target, token=os.environ.get("POE_SERVICE_TOKEN")) as service:
        service.create_job(broken, job_id="broken-1")
        service.update_job("broken-1", state="running")
        service.create_job({"format": "someone-else/v1"}, job_id="foreign-1")
    _host, client, _runtime = extractors.start()  # returns once the unfinished jobs were looked at
    job = client.get("broken-1").job
    assert job.state == c.EXTRACTION_STATE_FAILED
    assert job.error == "cannot resume: job spec: missing key(s) seed"
    assert client.get("foreign-1").job.state == c.EXTRACTION_STATE_PENDING
