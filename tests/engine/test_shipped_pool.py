"""The pool shipped in pools/fashion-mnist meets the product's accuracy bar on the real test set.

Over all 31 queries of 1 to 5 primitive tasks, composed models are on average within 1.0 point of
the oracle restricted to the same classes and never more than 2.5 points below; a one-task model
has at most 1/10 of the oracle's parameters. (The same figures, with the command, are in
docs/BENCHMARKS.md.)
"""

from pathlib import Path

import pytest

from poe.engine.evaluate import evaluate_pool
from poe.engine.nets import count_params
from poe.engine.pool import load

SHIPPED_POOL = Path(__file__).resolve().parents[2] / "pools" / "fashion-mnist"


@pytest.fixture(scope="module")
def shipped():
    assert (SHIPPED_POOL / "pool.json").exists(), f"the shipped pool is missing from {SHIPPED_POOL}"
    return load(SHIPPED_POOL)


def test_shipped_oracle_is_big_and_accurate(shipped):
    oracle = shipped.oracle()
    assert count_params(oracle) >= 2_500_000
    assert shipped.info["oracle"]["test_acc"] >= 0.935


@pytest.mark.slow
def test_composed_models_match_the_restricted_oracle(shipped, fmnist_test):
    rows = evaluate_pool(shipped, fmnist_test)
    assert len(rows) == 31
    deltas = [r["delta"] for r in rows]
    mean = sum(deltas) / len(deltas)
    assert mean >= -0.010, f"mean delta {mean:+.4f}"
    assert min(deltas) >= -0.025, min(rows, key=lambda r: r["delta"])
    oracle_params = count_params(shipped.oracle())
    for r in rows:
        if r["n"] == 1:
            assert r["params"] * 10 <= oracle_params, r


def test_the_input_shape_comes_from_the_pool(shipped):
    import dataclasses

    from poe.engine.errors import FailedPrecondition

    assert shipped.input_shape == (1, 28, 28)  # recorded in pool.json; the registry keeps the same info
    with pytest.raises(FailedPrecondition, match="records no input shape"):
        _ = dataclasses.replace(shipped, info={}).input_shape
    with pytest.raises(FailedPrecondition, match="has 3 channel"):
        _ = dataclasses.replace(shipped, info={"input_shape": [3, 28, 28]}).input_shape
