"""Fixtures shared by all tests: small real data and pools with random (but non-trivial) weights."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from poe.engine import hierarchy
from poe.engine.nets import ExpertConfig, WideResNet, WRNConfig, make_expert
from poe.engine.pool import Expert, Pool, library_state_from_student

# Helper modules of the tests (testenv) are imported by name; sub-folders' conftests need them early.
sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    # Keep torch from oversubscribing the machine's cores when tests run beside other work.
    torch.set_num_threads(int(os.environ.get("POE_TEST_THREADS", str(min(2, os.cpu_count() or 1)))))
    _run_tokens()


def _run_tokens() -> None:
    """One token file for the run (tests/testenv.py says how servers and clients use it); a POE_HOME
    of its own, so that no admin.token of this machine's `poe up` is picked up."""
    from poe_services import tokens

    root = Path(tempfile.mkdtemp(prefix="poe-test-run-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    path = root / "tokens.json"
    _, admin = tokens.create(path, "admin", "tests", token_id="test-admin")
    _, service = tokens.create(path, "service", "test services", token_id="test-service")
    os.environ.update({"POE_HOME": str(root / "home"), "POE_TOKENS_FILE": str(path), "POE_TOKEN": admin,
                       "POE_SERVICE_TOKEN": service})


def randomize_bn(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters, so that tests that
    compare two executions would notice a BN applied to the wrong channels."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.rand(n, generator=generator) * 0.4 - 0.2)


def make_random_pool(seed: int = 0, with_oracle: bool = True, depth: int = 10, expert_width: int = 8) -> Pool:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    h = hierarchy.builtin("fashion-mnist")
    student_cfg = WRNConfig(depth=depth, width=1)
    student = WideResNet(student_cfg)
    randomize_bn(student, g)
    experts = {}
    for task, ids in h.tasks.items():
        cfg = ExpertConfig(student.library.out_channels, expert_width, student_cfg.blocks_per_group, len(ids))
        e = make_expert(cfg)
        randomize_bn(e, g)
        experts[task] = Expert(task, ids, cfg, e.state_dict(), {"val_acc": 0.5})
    oracle_cfg = oracle_state = None
    if with_oracle:
        oracle_cfg = WRNConfig(depth=10, width=1)
        oracle = WideResNet(oracle_cfg)
        randomize_bn(oracle, g)
        oracle_state = oracle.state_dict()
    return Pool("test-pool", "1", h, student_cfg, library_state_from_student(student), experts,
                oracle_cfg, oracle_state, {"dataset": "fashion-mnist", "input_shape": [1, 28, 28]})


@pytest.fixture(scope="session")
def random_pool() -> Pool:
    return make_random_pool()


@pytest.fixture(scope="session")
def fmnist_test():
    from poe.engine.data import load_fashion_mnist

    return load_fashion_mnist("test")


@pytest.fixture(scope="session")
def fmnist_train():
    from poe.engine.data import load_fashion_mnist

    return load_fashion_mnist("train")


def check_storage(*where, corrupt=(), older_than: float = 0.0):
    """What `poe registry fsck` checks, on `where`: a Settings, (database URL, file:// blob URL) or
    (metadata store, blob store). Asserts that it finds exactly the blobs `corrupt` corrupt and
    nothing else inconsistent; returns the report. `older_than=0` (the default) counts every blob
    without a row as an orphan: right wherever no upload can be in flight."""
    import contextlib
    import json

    from poe_services.registry.blobstore import open_blob_store
    from poe_services.registry.maintenance import check_blobs
    from poe_services.registry.sqlstore import SqlRegistryStore

    with contextlib.ExitStack() as opened:
        if len(where) == 2 and not isinstance(where[0], str):
            store, blobs = where
        else:
            settings = where[0] if len(where) == 1 else None
            database_url, blob_url = (settings.database_url, settings.blob_url) if settings else where
            # Opened as the command opens them (poe.cli.registry._storage).
            store = SqlRegistryStore(database_url)
            opened.callback(store.close)
            blobs = open_blob_store(blob_url, settings)
            opened.callback(blobs.close)
        report = check_blobs(store, blobs, older_than=older_than)
    details = json.dumps(report.to_dict(), indent=1)
    assert sorted(c["sha256"] for c in report.corrupt) == sorted(corrupt), details
    assert report.missing == [] and report.size_mismatch == [] and report.orphans == [], details
    return report


@pytest.fixture
def assert_fsck_clean():
    """assert_fsck_clean(settings | database_url, blob_url | store, blobs, corrupt=(), older_than=0)
    -> FsckReport: `poe registry fsck` finds nothing inconsistent but the `corrupt` blobs named."""
    return check_storage
