"""No program a client sends is ever loaded, whatever path it takes; files named by a client are
opened only inside the extractor's directories, only when regular and small enough; stored job
specs are checked again before they are resumed. Real registry and extractor servers.

The probe is a TorchScript module that leaves a marker file behind when it is loaded (its
__setstate__ runs inside torch.jit.load) and when it runs. A positive control shows that the
markers do appear when such a file is loaded from the oracle directory, where it is allowed.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Tuple  # noqa: UP035 - TorchScript reads the annotations

import pytest
import torch

from poe.engine.architectures import placeholder_weights
from poe.engine.errors import InvalidArgument
from poe.engine.export import quiet_jit
from poe.engine.hierarchy import builtin
from poe.v1 import common_pb2 as c
from poe_services.extractor.files import MAX_TORCHSCRIPT_BYTES
from poe_services.extractor.spec import FORMAT

FAILED, SUCCEEDED, PENDING = c.EXTRACTION_STATE_FAILED, c.EXTRACTION_STATE_SUCCEEDED, c.EXTRACTION_STATE_PENDING
WAIT = 180.0


class Marking(torch.nn.Module):
    """Ten logits of a linear map; leaves `<marker>.load` when loaded and `<marker>.run` when run."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.weight = torch.randn(10, 784) * 0.01

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, torch.Tensor, bool]:  # noqa: UP006
        return (self.marker, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, torch.Tensor, bool]) -> None:  # noqa: UP006
        self.marker = state[0]
        self.training = state[2]
        touched = torch.from_file(self.marker + ".load", shared=True, size=1, dtype=torch.uint8).fill_(1)
        self.weight = state[1] + touched.float().sum() * 0  # used, so that TorchScript keeps the call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        touched = torch.from_file(self.marker + ".run", shared=True, size=1, dtype=torch.uint8).fill_(1)
        return x.flatten(1) @ self.weight.t() + touched.float().sum() * 0


@pytest.fixture
def place(tmp_path, data):
    """The test's directories: an oracle directory (holding a copy of the IDX data set), a folder
    outside it with a marking TorchScript file, and the folder its markers go to."""
    oracle_dir, outside, markers = tmp_path / "oracles", tmp_path / "elsewhere", tmp_path / "markers"
    for d in (oracle_dir, outside, markers):
        d.mkdir()
    shutil.copytree(data["idx"], oracle_dir / "fmnist-idx")
    evil = outside / "evil.pt"
    with quiet_jit():
        torch.jit.script(Marking(str(markers / "m"))).save(str(evil))
    assert not list(markers.iterdir())  # saving runs neither __setstate__ nor forward
    return {"oracle_dir": oracle_dir, "outside": outside, "markers": markers, "evil": evil,
            "dataset": str(oracle_dir / "fmnist-idx")}


@pytest.fixture
def params(place):
    """params(**overrides): a tiny job on the copy of the IDX data set (no trained oracle needed)."""
    tiny = {"dataset": place["dataset"], "hierarchy": "fashion-mnist", "pool_name": "tiny", "student_depth": 10,
            "expert_width": 4, "library_epochs": 1, "expert_epochs": 1, "batch_size": 50, "views": 1,
            "tasks": ["bags"]}
    return lambda **overrides: {**tiny, **overrides}


def _start_refused(client, request: dict, field: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        client.start(request)
    assert info.value.field == field, str(info.value)  # type: ignore[attr-defined]
    assert fragment in str(info.value), (fragment, str(info.value))


def test_a_program_sent_by_a_client_is_never_loaded(extractors, registry, params, place, poll):
    from poe_services.registry import entities as e
    from poe_services.registry.blobstore import blob_path

    oracle_dir, evil, markers = place["oracle_dir"], place["evil"], place["markers"]
    _host, client, _runtime = extractors.start(POE_EXTRACTOR_ORACLE_DIR=str(oracle_dir))
    registry.client.register_hierarchy(builtin("fashion-mnist"))
    code = evil.read_bytes()

    # RegisterOracle refuses it: nothing is stored.
    with pytest.raises(InvalidArgument, match="chunk: a zip archive") as info:
        registry.client.register_oracle("evil", "fashion-mnist", {"depth": 10}, code)
    assert info.value.field == "chunk"  # type: ignore[attr-defined]

    # The same bytes stored as a library land at a predictable path of the blob store; no path
    # outside the oracle directory is opened, however it is spelt.
    lib, _ = registry.client.register_library("not a library", "fashion-mnist", {"depth": 10}, code)
    stored = registry.host.runtimes["registry"].registry.blobs.root / blob_path(lib.blob.sha256)
    assert stored.read_bytes() == code
    (oracle_dir / "link.pt").symlink_to(evil)
    (oracle_dir / "sub").mkdir()
    (oracle_dir / "sub" / "up").symlink_to(place["outside"])
    for path in (str(evil), str(stored), "../elsewhere/evil.pt", str(oracle_dir / ".." / "elsewhere" / "evil.pt"),
                 str(oracle_dir / "link.pt"), "link.pt", "sub/up/evil.pt"):
        _start_refused(client, params(oracle={"path": path}), "params.oracle.path",
                       "is not inside")

    # An oracle the registry holds (written before uploads were checked) is only ever read as
    # safetensors: the job fails, the bytes are never loaded as a program.
    reg = registry.host.runtimes["registry"].registry
    put = reg.blobs.put(code)
    old, _ = reg.store.add_oracle(e.OracleSpec("old", "fashion-mnist", {"depth": 10, "width": 1}),
                                  e.Blob(put.sha256, put.size, e.SAFETENSORS))
    job = client.start(params(oracle={"registry_id": old.id}))
    final = client.wait(job.id, timeout=WAIT)
    assert final.state == FAILED and "the registered oracle: a zip archive" in final.error, final.error

    # Without an oracle directory no file is accepted as an oracle at all.
    _host, plain, _runtime = extractors.start(POE_EXTRACTOR_ORACLE_DIR="")
    _start_refused(plain, params(dataset="fashion-mnist", subset=300, oracle={"path": str(evil)}),
                   "params.oracle.path", "oracle files named by path are not accepted by this extractor")
    assert not list(markers.iterdir())


def test_fifos_directories_and_huge_files_are_refused_at_once(extractors, params, place):
    oracle_dir = place["oracle_dir"]
    os.mkfifo(oracle_dir / "pipe.pt")
    os.mkfifo(oracle_dir / "pipe.yaml")
    os.mkfifo(oracle_dir / "pipe.npz")
    (oracle_dir / "folder.pt").mkdir()
    with open(oracle_dir / "huge.pt", "wb") as f:
        f.truncate(MAX_TORCHSCRIPT_BYTES + 1)  # sparse: nothing is written, and nothing may be read
    _host, client, _runtime = extractors.start(POE_EXTRACTOR_ORACLE_DIR=str(oracle_dir))
    ok = {"oracle": {"path": str(place["evil"])}}
    cases = [
        ({"oracle": {"path": "pipe.pt"}}, "params.oracle.path", "pipe.pt is a FIFO, expected a regular file"),
        ({"oracle": {"path": str(oracle_dir / "folder.pt")}}, "params.oracle.path", "folder.pt is a directory"),
        ({"oracle": {"path": "huge.pt"}}, "params.oracle.path", f"bytes; at most {MAX_TORCHSCRIPT_BYTES}"),
        ({"hierarchy": str(oracle_dir / "pipe.yaml")}, "params.hierarchy", "pipe.yaml is a FIFO"),
        ({"hierarchy": "/etc/passwd"}, "params.hierarchy", "is not inside"),
        ({"dataset": str(oracle_dir / "pipe.npz")}, "params.dataset", "is a FIFO, expected a data set"),
        ({"dataset": "/etc"}, "params.dataset", "is not inside"),
    ]
    for change, field, fragment in cases:
        started = time.monotonic()
        _start_refused(client, params(**{**ok, **change}), field, fragment)
        assert time.monotonic() - started < 10, change
    assert not list(place["markers"].iterdir())


def _stored_spec(**changes) -> dict:
    schedule = {"epochs": 1, "batch_size": 50, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0005,
                "warmup_epochs": 1.0, "seed": 0}
    spec = {"format": FORMAT, "request": {}, "dataset": "fashion-mnist", "subset": 300, "seed": 0, "views": 1,
            "input_shape": [1, 28, 28], "num_classes": 10, "train_images": 300,
            "hierarchy": builtin("fashion-mnist").to_dict(), "tasks": ["bags"],
            "oracle": {"kind": "torchscript", "file": "oracle.torchscript", "source": "", "sha256": "ab" * 32,
                       "num_classes": 10},
            "base": None, "student": {"depth": 10, "width": 1, "stem_stride": 1}, "expert": {"width": 4, "blocks": 1},
            "library_schedule": schedule, "expert_schedule": schedule,
            "ckd": {"temperature": 4.0, "soft_weight": 1.0, "scale_weight": 0.3}, "device": "cpu",
            "pool": {"name": "resumed", "version": "1", "aliases": []}}
    for key, value in changes.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and isinstance(spec[key], dict) else value
    return spec


def test_stored_specs_are_checked_before_they_are_resumed(extractors, registry, place, poll):
    """Job specs written straight into the registry's database: the ones that escape the run
    directory or the oracle directory, or break a bound, are FAILED and counted, never run; the
    extractor serves, and the other jobs are listed and resumed."""
    from prometheus_client import REGISTRY

    from poe_services.registry import entities as e

    oracle_dir, evil = place["oracle_dir"], place["evil"]
    shutil.copyfile(evil, oracle_dir / "allowed.pt")
    store = registry.host.runtimes["registry"].registry.store
    stored = {
        "escapes-run-dir": _stored_spec(oracle={"file": "../../../elsewhere/evil.pt", "source": str(evil)}),
        "outside-source": _stored_spec(oracle={"source": str(evil)}),
        "too-many-views": _stored_spec(views=10**9, oracle={"source": str(oracle_dir / "allowed.pt")}),
        "data-outside": _stored_spec(dataset="/etc", oracle={"source": str(oracle_dir / "allowed.pt")}),
        "copy-missing": _stored_spec(oracle={"source": str(oracle_dir / "allowed.pt")}),
        # 2.9 MB of parameters: read, listed and failed like any other record.
        "big": _stored_spec(request={"padding": "x" * 2_900_000}, oracle={"source": str(oracle_dir / "allowed.pt")}),
    }
    for job_id, spec in stored.items():
        store.create_job(spec, job_id=job_id)
        store.update_job(job_id, e.JobUpdate(state=e.JobState.RUNNING))
    store.create_job({"format": "someone-else/v1"}, job_id="foreign")

    def failed() -> float:
        return REGISTRY.get_sample_value("poe_extraction_jobs_finished_total", {"state": "failed"}) or 0.0

    before = failed()
    _host, client, runtime = extractors.start(POE_EXTRACTOR_ORACLE_DIR=str(oracle_dir))
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(client.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="poe.v1.Extractor"), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING
    errors = {j: client.get(j).job.error for j in stored}
    assert errors["escapes-run-dir"].startswith("cannot resume: job spec: oracle.file: expected 'oracle.torchscript'")
    assert errors["outside-source"].startswith("cannot resume: job spec: oracle.source:") and \
        "is not inside" in errors["outside-source"]
    assert errors["too-many-views"] == "cannot resume: job spec: views: must be in [1, 32], got 1000000000"
    assert errors["data-outside"].startswith("cannot resume: job spec: dataset: '/etc' is not inside")
    # These pass the checks, then find no copy in their run directory: they fail without loading anything.
    for job_id in ("copy-missing", "big"):
        assert poll(lambda job_id=job_id: client.get(job_id).job.state == FAILED)
        assert "the TorchScript oracle copied into" in client.get(job_id).job.error
    assert {j.id: j.state for j in client.list()} == {**dict.fromkeys(stored, FAILED), "foreign": PENDING}
    assert poll(lambda: failed() - before == len(stored))
    assert not list(place["markers"].iterdir())

    # A run directory comes from the job id alone and stays a child of the runs root.
    for bad in ("..", "../x", "a/b", ".hidden", ""):
        with pytest.raises(InvalidArgument, match="job_id"):
            runtime.run_dir(bad)
    runtime.runs_dir.mkdir(parents=True, exist_ok=True)
    (runtime.runs_dir / "linked").symlink_to(place["outside"])
    with pytest.raises(InvalidArgument, match="is not inside"):
        runtime.run_dir("linked")


def test_allowed_oracles_still_work(extractors, registry, params, place, poll):
    """A TorchScript file in the oracle directory is loaded from there (its markers appear), and
    its worker runs it; a safetensors WideResNet sent to the registry is accepted. (Both kinds
    train to a published pool in test_jobs.py and test_cli.py.)"""
    oracle_dir, markers = place["oracle_dir"], place["markers"]
    _host, client, _runtime = extractors.start(POE_EXTRACTOR_ORACLE_DIR=str(oracle_dir))
    shutil.copyfile(place["evil"], oracle_dir / "scripted.pt")
    scripted = client.start(params(oracle={"path": "scripted.pt"}))
    assert (markers / "m.load").exists()  # the check at the start loaded it, from the oracle directory
    for marker in markers.iterdir():
        marker.unlink()

    registry.client.register_hierarchy(builtin("fashion-mnist"))
    weights, _ = registry.client.register_oracle("random WRN-10-1", "fashion-mnist", {"depth": 10},
                                                 placeholder_weights({"depth": 10}, seed=3))
    queued = client.start(params(oracle={"registry_id": weights.id}))
    assert queued.state == PENDING and queued.oracle_id == weights.id
    client.cancel(queued.id)

    # The worker loads and runs the copy in the run directory (checked against its sha256).
    assert poll(lambda: (markers / "m.run").exists() or client.get(scripted.id).job.state == FAILED)
    assert (markers / "m.load").exists(), client.get(scripted.id).job.error
    client.cancel(scripted.id)


def test_allowed_directories(tmp_path):
    """The path rules alone: relative paths are looked up in each allowed directory, data
    directories are no oracle directory, and symlinks count where they lead."""
    from poe_services.extractor.files import InputFiles

    data_dir, oracle_dir, outside = tmp_path / "data", tmp_path / "oracles", tmp_path / "outside"
    for d in (data_dir, oracle_dir, outside):
        d.mkdir()
    (oracle_dir / "set").mkdir()
    (data_dir / "weights.safetensors").write_bytes(b"x")
    (outside / "secret").write_text("no")
    (oracle_dir / "inner").symlink_to(oracle_dir / "set")
    files = InputFiles(oracle_dir, data_dir)
    assert files.data_path("set", "params.dataset") == (oracle_dir / "set").resolve()
    assert files.data_path("inner", "params.dataset") == (oracle_dir / "set").resolve()
    assert files.read_data(str(data_dir / "weights.safetensors"), "f", 10, "files")[1] == b"x"
    for bad, message in ((str(data_dir / "weights.safetensors"), "is not inside"),
                         ("../outside/secret", "is not inside"), ("a\x00b", "expected a path"),
                         ("", "expected a path")):
        with pytest.raises(InvalidArgument, match=message):
            files.read_oracle(bad, "params.oracle.path", 10)
    with pytest.raises(InvalidArgument, match="weights.safetensors: 1 bytes; at most 0"):
        files.read_data("weights.safetensors", "f", 0, "files")
    with pytest.raises(InvalidArgument, match="not accepted by this extractor"):
        InputFiles(None, data_dir).read_oracle("set", "params.oracle.path", 10)
