"""End to end on real images: oracle -> library (KD) -> experts (CKD) -> composed model.

A tiny version of `poe train all` on 3000 real Fashion-MNIST training images; the composed
models must be far above chance on real test images.
"""

import json

import pytest
import torch

from poe.engine import pipeline
from poe.engine.compose import compose
from poe.engine.evaluate import evaluate_model, logits_of
from poe.engine.hierarchy import builtin
from poe.engine.nets import WRNConfig
from poe.engine.train import CKDSettings, Schedule


@pytest.mark.slow
def test_tiny_pool_end_to_end(tmp_path, fmnist_train, fmnist_test):
    run = tmp_path / "run"
    run.mkdir()
    train = fmnist_train.stratified(300, seed=0)
    test = fmnist_test.stratified(100, seed=0)
    spec = pipeline.OracleSpec(depth=10, width=1, schedule=Schedule(epochs=4, batch_size=64, lr=0.05))
    oracle = pipeline.oracle_stage(run, train, test, spec)
    views = pipeline.teacher_stage(run, oracle, train, views=2)
    student_cfg = WRNConfig(depth=10, width=1, mean=oracle.cfg.mean, std=oracle.cfg.std)
    student = pipeline.library_stage(run, views, None, student_cfg, Schedule(epochs=3, batch_size=64, lr=0.05))
    experts = pipeline.experts_stage(run, student, views, test, builtin("fashion-mnist"), 8,
                                     Schedule(epochs=3, batch_size=64, lr=0.05), ckd=CKDSettings())
    pool = pipeline.assemble_pool(run, "tiny", "1", builtin("fashion-mnist"), experts, student, oracle, {})

    oracle_logits = logits_of(pool.oracle(), test.images)
    for classes, chance in ((["Sandal", "Sneaker", "Bag"], 1 / 3), (["Trouser", "Bag", "Sneaker", "Coat"], 1 / 4)):
        p, model = compose(pool, classes)
        r = evaluate_model(model, list(p.class_ids), test, oracle_logits)
        assert r.accuracy > chance + 0.35, (classes, r)
    # The run directory records every stage; a second call resumes instead of retraining.
    log = [json.loads(line) for line in (run / "train.log").read_text().splitlines()]
    assert {r["stage"] for r in log} == {"oracle", "library", "experts"}
    again = pipeline.experts_stage(run, student, views, test, builtin("fashion-mnist"), 8,
                                   Schedule(epochs=3, batch_size=64, lr=0.05))
    assert all(torch.equal(again[t].state[k], experts[t].state[k]) for t in experts for k in experts[t].state)
