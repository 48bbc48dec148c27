"""StartExtraction refuses what cannot work, before any job exists: oracles, data sets and
hierarchies that do not fit together, bad parameters, unknown references (real servers, no workers)."""

from __future__ import annotations

import json
import shutil

import grpc
import numpy as np
import pytest
import torch

from poe.engine.errors import AlreadyExists, InvalidArgument, NotFound, PoeError
from poe.engine.export import quiet_jit


def code_of(err: PoeError) -> grpc.StatusCode:
    return err.grpc_code  # type: ignore[attr-defined]


@pytest.fixture
def bad_files(tmp_path, oracle, data):
    """Oracles and data sets that do not fit the 10-class grayscale Fashion-MNIST subset."""
    files = {}
    # A TorchScript oracle with 7 classes.
    seven = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 7))
    with quiet_jit():
        torch.jit.trace(seven, torch.rand(2, 1, 28, 28)).save(str(tmp_path / "seven.pt"))
    files["seven"] = tmp_path / "seven.pt"
    # A pickled checkpoint (torch.save): refused, never unpickled.
    torch.save(oracle["model"].state_dict(), tmp_path / "pickled.pt")
    files["pickled"] = tmp_path / "pickled.pt"
    (tmp_path / "noise.bin").write_bytes(b"\x07" * 100)
    files["noise"] = tmp_path / "noise.bin"
    # The safetensors oracle without the config beside it.
    (tmp_path / "bare").mkdir()
    shutil.copyfile(oracle["safetensors"], tmp_path / "bare" / "weights.safetensors")
    files["bare"] = tmp_path / "bare" / "weights.safetensors"
    # RGB images of the 10 classes (the oracle takes one channel).
    train = data["train"]
    np.savez(tmp_path / "rgb10.npz", images=train.images.repeat(1, 3, 1, 1).numpy(), labels=train.labels.numpy())
    files["rgb10"] = tmp_path / "rgb10.npz"
    np.savez(tmp_path / "broken.npz", pictures=np.zeros(3))
    files["broken"] = tmp_path / "broken.npz"
    return files


def test_bad_oracle_and_data_combinations(extractor, registry, params, data, oracle, bad_files):
    client, _runtime = extractor
    three = {"format": "poe.hierarchy/v1", "dataset": "rgb3", "classes": ["a", "b", "c"],
             "tasks": {"ab": ["a", "b"], "c": ["c"]}}
    cases = [
        # (params, error type, status code, fragment of the message)
        (params(dataset=data["rgb3"], hierarchy_text=json.dumps(three)), InvalidArgument,
         "params.oracle.path: class count mismatch: the oracle has 10 classes but the data set"),
        (params(dataset=data["rgb3"]), InvalidArgument,
         "params.hierarchy: class count mismatch: hierarchy fashion-mnist v1 has 10 classes"),
        (params(oracle={"path": str(bad_files["seven"])}), InvalidArgument,
         "class count mismatch: the oracle has 7 classes but the data set"),
        (params(dataset=str(bad_files["rgb10"])), InvalidArgument, "the oracle takes 1-channel images"),
        (params(oracle={"path": str(bad_files["pickled"])}), InvalidArgument, "not a TorchScript module"),
        (params(oracle={"path": str(bad_files["noise"])}), InvalidArgument, "noise.bin: not a safetensors file"),
        (params(oracle={"path": str(bad_files["bare"])}), InvalidArgument,
         "params.oracle.path.config_json: weights.safetensors: a safetensors oracle needs its config"),
        (params(oracle={"path": str(bad_files["bare"]),
                        "config_json": json.dumps({"depth": 16, "width": 1, "num_classes": 10})}),
         InvalidArgument, "do not match WRN-16-1 with 1 input channel(s) and 10 classes: missing"),
        (params(oracle={"path": "/nonexistent/oracle.pt"}), InvalidArgument,
         "params.oracle.path: '/nonexistent/oracle.pt' is not inside"),
        (params(oracle={"path": "no-such-oracle.pt"}), InvalidArgument,
         "no-such-oracle.pt: no such file on the extractor"),
        (params(oracle={"registry_id": 999}), NotFound, "no oracle 999"),
        (params(oracle={}), InvalidArgument, "params.oracle: required"),
        (params(dataset="/nonexistent/data"), InvalidArgument, "params.dataset:"),
        (params(dataset=str(bad_files["broken"])), InvalidArgument, "needs arrays 'images' and 'labels'"),
        (params(dataset=""), InvalidArgument, "params.dataset: required"),
        (params(hierarchy="no-such-hierarchy"), InvalidArgument, "params.hierarchy: no built-in hierarchy"),
        (params(tasks=["footwear", "hats"]), InvalidArgument, "params.tasks: unknown primitive tasks: 'hats'"),
        (params(library_epochs=0), InvalidArgument, "params.library_epochs: must be in [1,"),
        (params(lr=-1.0), InvalidArgument, "params.lr: must be > 0"),
        (params(student_depth=11), InvalidArgument, "params.student_depth: WRN depth must be 6n + 4"),
        (params(batch_size=5000), InvalidArgument, "params.batch_size: 5000 is larger than the training set"),
        (params(soft_weight=0.0, scale_weight=0.0), InvalidArgument, "cannot both be 0"),
        (params(pool_name="Bad Name"), InvalidArgument, "params.pool_name"),
        (params(aliases=["latest"]), InvalidArgument, "params.aliases"),
        (params(base_pool="nothing-here"), NotFound, "nothing-here"),
        (params(ray_workers=-1), InvalidArgument, "params.ray_workers: must be in [0, 4096], got -1"),
        (params(ray_cpus_per_task=5000.0), InvalidArgument, "params.ray_cpus_per_task: must be a finite number in"),
        (params(ray_gpus_per_task=-0.5), InvalidArgument, "params.ray_gpus_per_task: must be a finite number in "
                                                          "[0.0, 64.0], got -0.5"),
        (params(library_workers=5000), InvalidArgument, "params.library_workers: must be in [0, 4096]"),
    ]
    if not torch.cuda.is_available():
        cases.append((params(device="cuda"), InvalidArgument, "params.device: device 'cuda' requested but CUDA"))
    for request, error, fragment in cases:
        with pytest.raises(error) as info:
            client.start(request)
        assert fragment in str(info.value), (fragment, str(info.value))
        expected = grpc.StatusCode.NOT_FOUND if error is NotFound else grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(info.value) == expected
    # The field is in the trailing metadata too.
    with pytest.raises(InvalidArgument) as info:
        client.start(params(oracle={"path": str(bad_files["seven"])}))
    assert info.value.field == "params.oracle.path"  # type: ignore[attr-defined]
    # Nothing was recorded for refused requests.
    assert list(registry.client.list_jobs()) == []
    with pytest.raises(NotFound):
        registry.client.get_oracle(1)


def test_pool_versions_and_base_pools(extractor, registry, params, pool_dir):
    client, _runtime = extractor
    registry.client.import_pool(pool_dir)  # test-pool@1: all five tasks, experts of width 8
    with pytest.raises(AlreadyExists, match="params.pool_version: test-pool@1 is already published"):
        client.start(params(pool_name="test-pool", pool_version="1"))
    base = {k: v for k, v in params(base_pool="test-pool").items()
            if k not in ("student_depth", "student_width", "pool_name", "expert_width")}
    with pytest.raises(InvalidArgument, match="nothing to train: test-pool@1 already covers every task"):
        client.start(base)
    with pytest.raises(InvalidArgument, match="params.tasks: already covered by test-pool@1: bags"):
        client.start({**base, "tasks": ["bags"]})
    with pytest.raises(InvalidArgument, match="params.student_depth: not allowed with a base pool"):
        client.start({**base, "student_depth": 10})
    with pytest.raises(InvalidArgument, match="params.expert_width: 4 differs from the base pool's experts"):
        client.start({**base, "expert_width": 4})
    with pytest.raises(NotFound, match="job_id: no job 'nope'"):
        client.get("nope")
    with pytest.raises(NotFound):
        client.cancel("nope")
    with pytest.raises(InvalidArgument, match="job_id: required"):
        client.get("")
    with pytest.raises(InvalidArgument, match="job_id: 'bad id!' must be"):
        client.start(params(), job_id="bad id!")
    assert list(registry.client.list_jobs()) == []


def test_health_follows_the_registry(extractors, registry, poll):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    _host, client, _runtime = extractors.start()
    stub = health_pb2_grpc.HealthStub(client.channel)

    def status(service: str = "poe.v1.Extractor"):
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    assert status() == status("") == health_pb2.HealthCheckResponse.SERVING
    registry.host.stop(None).wait()
    assert poll(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=10)
    with pytest.raises(PoeError) as info:
        client.get("some-job")
    assert code_of(info.value) == grpc.StatusCode.UNAVAILABLE
