"""Fixtures shared by all tests: small real data and pools with random (but non-trivial) weights."""

from __future__ import annotations

import os

import pytest
import torch

from poe.engine import hierarchy
from poe.engine.nets import ExpertConfig, WideResNet, WRNConfig, make_expert
from poe.engine.pool import Expert, Pool, library_state_from_student


def pytest_configure(config):
    # Keep torch from oversubscribing the machine's cores when tests run beside other work.
    torch.set_num_threads(int(os.environ.get("POE_TEST_THREADS", str(min(2, os.cpu_count() or 1)))))


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
