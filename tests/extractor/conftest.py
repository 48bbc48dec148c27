"""Real components for the extractor tests.

- Data: a small stratified subset of the real Fashion-MNIST (Debian's dataset-fashion-mnist),
  written as an IDX folder (train + t10k files), an .npz and a 3-class image folder.
- An oracle: a tiny WRN-10-1 really trained on that subset (seconds), as a safetensors state dict
  with its config beside it (as `poe train` writes it) and as TorchScript.
- A real registry server on port 0 (SQLite from a migrated template + file blobs in tmp_path) and
  real extractor servers on port 0 talking to it.
- A real one-node Ray on loopback with 2 CPUs, started once for the session: the extractors run
  their jobs' stages on it as tasks of one torch thread each.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from testenv import auth_env, eventually

from poe.client.registry import RegistryClient
from poe.engine.config import Settings
from poe_services.host import Host

# Tiny networks and schedules: a whole job trains in about a second.
TINY = {"student_depth": 10, "student_width": 1, "expert_width": 4, "library_epochs": 1, "expert_epochs": 1,
        "batch_size": 50, "views": 1, "lr": 0.05}
DEVICE = os.environ.get("POE_TEST_DEVICE", "cpu")  # "cuda" on a machine with a GPU
WAIT = 180.0  # generous: this machine may be busy training other models


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    torch.set_num_threads(1)


# poll(predicate) in the tests: testenv.eventually with this suite's timeout.
wait_until = functools.partial(eventually, timeout=WAIT)


def _write_idx(path: Path, array: np.ndarray) -> None:
    code = {np.dtype(np.uint8): 0x08}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


@pytest.fixture(scope="session")
def data(tmp_path_factory, fmnist_train, fmnist_test) -> dict:
    """Paths of the small real data sets: idx (folder), npz, rgb3 (3-class RGB image folder)."""
    root = tmp_path_factory.mktemp("data")
    train = fmnist_train.stratified(30, seed=1)  # 300 images
    test = fmnist_test.stratified(10, seed=1)  # 100 images
    idx = root / "fmnist-idx"
    idx.mkdir()
    for prefix, ds in (("train", train), ("t10k", test)):
        _write_idx(idx / f"{prefix}-images-idx3-ubyte", ds.images[:, 0].numpy())
        _write_idx(idx / f"{prefix}-labels-idx1-ubyte", ds.labels.numpy().astype(np.uint8))
    npz = root / "fmnist.npz"
    np.savez(npz, images=train.images.numpy(), labels=train.labels.numpy(), classes=np.array(train.classes))
    from PIL import Image

    rgb = root / "rgb3"
    for c, name in enumerate(("a", "b", "c")):
        (rgb / name).mkdir(parents=True)
        for i, img in enumerate(train.images[train.labels == c][:4]):
            Image.fromarray(np.repeat(img[0].numpy()[..., None], 3, axis=2)).save(rgb / name / f"{i}.png")
    return {"idx": str(idx), "npz": str(npz), "rgb3": str(rgb), "train": train, "test": test}


@pytest.fixture(scope="session", autouse=True)
def ray_cluster():
    """The Ray every extractor of the session uses (one that this process started is used as it is,
    and not shut down by the extractors)."""
    import ray

    from poe_services.extractor.ray_executor import LOOPBACK_ENV, start_local_ray, warm_worker

    before = os.environ.get(LOOPBACK_ENV)
    start_local_ray(2)
    # Not waited for: the workers import while the first test's registry and extractor start.
    warming = [ray.remote(warm_worker).options(num_cpus=1).remote() for _ in range(2)]
    yield
    del warming
    ray.shutdown()
    if before is None:
        os.environ.pop(LOOPBACK_ENV, None)
    else:
        os.environ[LOOPBACK_ENV] = before


@pytest.fixture(scope="session")
def oracle(tmp_path_factory, data) -> dict:
    """A WRN-10-1 trained for 3 epochs on the subset: {"safetensors", "torchscript", "model"}."""
    from poe.engine import pipeline
    from poe.engine.export import quiet_jit
    from poe.engine.train import Schedule

    run = tmp_path_factory.mktemp("oracle-run")
    spec = pipeline.OracleSpec(depth=10, width=1, schedule=Schedule(epochs=3, batch_size=50, lr=0.05))
    quiet = os.environ.get("POE_NO_PROGRESS")
    os.environ["POE_NO_PROGRESS"] = "1"
    try:
        model = pipeline.oracle_stage(run, data["train"], None, spec).eval()
    finally:
        if quiet is None:
            del os.environ["POE_NO_PROGRESS"]
    ts = run / "oracle.pt"
    with quiet_jit():
        torch.jit.trace(model, torch.rand(2, 1, 28, 28)).save(str(ts))
    return {"safetensors": str(run / "oracle.safetensors"), "torchscript": str(ts), "model": model}


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    from poe_services.registry import db

    path = tmp_path_factory.mktemp("sqlite-template") / "registry.sqlite3"
    engine = db.make_engine(f"sqlite:///{path}")
    try:
        db.upgrade(engine)
    finally:
        engine.dispose()
    return path


def make_settings(tmp_path: Path, registry_target: str = "", **env: str) -> Settings:
    """Settings of the test's servers. The extractor's oracle directory is the session's temporary
    root, which holds the test data and oracles (session fixtures) and each test's own files; the
    tests of what lies outside it set POE_EXTRACTOR_ORACLE_DIR themselves."""
    return Settings.from_env({**auth_env(), "POE_EXTRACTOR_ORACLE_DIR": str(tmp_path.parent),
        "POE_HOME": str(tmp_path / "home"), "POE_DATABASE_URL": f"sqlite:///{tmp_path / 'registry.sqlite3'}",
        "POE_BLOB_URL": f"file://{tmp_path / 'blobs'}", "POE_REGISTRY_ADDR": registry_target,
        "POE_REGISTRY_HEALTH_INTERVAL": "0.2", "POE_RAY_CPUS_PER_TASK": "1", "POE_EXTRACTOR_MAX_JOBS": "1",
        "POE_EXTRACTOR_PROGRESS_INTERVAL": "0.1", "POE_EXTRACTOR_HEALTH_INTERVAL": "0.2", "POE_DEVICE": DEVICE,
        **env})


@dataclass
class RegistryServer:
    target: str
    client: RegistryClient
    host: Host


@pytest.fixture
def registry(tmp_path, sqlite_template):
    """A started registry server on a free port (SQLite + file blobs in tmp_path)."""
    from poe_services.host import create_server

    shutil.copyfile(sqlite_template, tmp_path / "registry.sqlite3")
    host = create_server("127.0.0.1:0", make_settings(tmp_path), ("registry",))
    host.start()
    target = f"127.0.0.1:{host.port}"
    client = RegistryClient(target, timeout=30)
    yield RegistryServer(target, client, host)
    client.close()
    host.stop(None).wait(30)


@pytest.fixture
def settings(tmp_path, registry) -> Settings:
    """The settings the test's extractors run with."""
    return make_settings(tmp_path, registry.target)


class Extractors:
    """Starts extractor servers on free ports against the test registry; stops them afterwards."""

    def __init__(self, tmp_path: Path, registry_target: str):
        self.tmp_path, self.registry_target = tmp_path, registry_target
        self.hosts: list = []

    def start(self, **env: str):
        """(host, client, runtime) of a new, started extractor."""
        from poe.client.extractor import ExtractorClient
        from poe_services.host import create_server

        settings = make_settings(self.tmp_path, self.registry_target, **env)
        host = create_server("127.0.0.1:0", settings, ("extractor",))
        host.start()
        client = ExtractorClient(f"127.0.0.1:{host.port}", timeout=60)
        self.hosts.append((host, client))
        runtime = host.runtimes["extractor"]
        assert runtime.recovered.wait(30), "the extractor never reached the registry"
        return host, client, runtime

    def stop(self, host: Host) -> None:
        host.stop(0).wait(60)

    def close(self) -> None:
        for host, client in self.hosts:
            client.close()
            host.stop(0).wait(60)


@pytest.fixture
def extractors(tmp_path, registry):
    ex = Extractors(tmp_path, registry.target)
    yield ex
    ex.close()


@pytest.fixture
def extractor(extractors):
    """(client, runtime) of one started extractor."""
    _server, client, runtime = extractors.start()
    return client, runtime


def tiny(data: dict, oracle: dict, overrides: dict) -> dict:
    """ExtractionParams (as a dict) of a tiny job on the IDX subset with the safetensors oracle."""
    return {"dataset": data["idx"], "hierarchy": "fashion-mnist", "oracle": {"path": oracle["safetensors"]},
            "pool_name": "tiny", **TINY, **overrides}


def train_log(run: Path) -> list[dict]:
    path = run / "train.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def params(data, oracle) -> Callable[..., dict]:
    """params(**overrides): a tiny job's ExtractionParams as a dict (see `tiny`)."""
    return lambda **overrides: tiny(data, oracle, overrides)


@pytest.fixture
def poll() -> Callable[..., bool]:
    """poll(predicate, timeout=WAIT): wait until the predicate holds; returns whether it did."""
    return wait_until


@pytest.fixture(scope="session")
def pool_dir(random_pool, tmp_path_factory) -> Path:
    """The root conftest's random pool (test-pool@1, all five tasks) as a pool directory."""
    from poe.engine import pool as pool_mod

    return pool_mod.save(random_pool, tmp_path_factory.mktemp("pool") / "test-pool")
