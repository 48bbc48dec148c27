"""`poe bench pool`: every query of 1..5 primitive tasks against the oracle restricted to its classes.

The models are built from a pool directory (`poe.engine.evaluate.evaluate_pool`) or, with a
composer's address, taken through ComposeModel exactly as a client gets them
(`evaluate_served_pool`); the oracle always comes from the pool directory.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from torch import nn

from poe.client.composer import Composer
from poe.client.registry import RegistryClient
from poe.engine import pool as pool_mod
from poe.engine.data import Dataset, load_dataset
from poe.engine.errors import InvalidArgument
from poe.engine.evaluate import evaluate_model, evaluate_pool, logits_of
from poe.engine.nets import count_params


def evaluate_served_pool(target: str, ref: str, oracle: nn.Module, test: Dataset, max_tasks: int = 5,
                         execution: str = "fused") -> list[dict]:
    """`evaluate_pool` for a pool the composer at `target` serves: every query's model comes through
    ComposeModel (sha256-verified) and is loaded with plain `torch.jit.load`; the registry is asked
    at the same address for the pool's primitive tasks."""
    with RegistryClient(target) as registry:
        pv = registry.get_pool(ref)
    have = {e.task for e in pv.experts}
    tasks = [t.name for t in pv.hierarchy.tasks if t.name in have]
    oracle_logits = logits_of(oracle, test.images)
    rows = []
    with Composer(target) as composer:
        for n in range(1, min(max_tasks, len(tasks)) + 1):
            for combo in itertools.combinations(tasks, n):
                result = composer.compose(tasks=list(combo), pool=ref, execution=execution)
                model, meta = result.load()
                r = evaluate_model(model, list(meta["class_ids"]), test, oracle_logits)
                rows.append({"tasks": list(combo), "n": n, **r.as_dict(),
                             "params": sum(x.numel() for x in model.parameters()), "pool": result.header.pool})
    return rows


def run(pool_dir: str | Path, dataset: str | None = None, max_tasks: int = 5, execution: str = "fused",
        target: str | None = None, served: str | None = None) -> dict:
    """Every query's accuracy next to the restricted oracle's, with a summary. With `target` and
    `served` (they go together) the models come from that composer; else they are built from `pool_dir`."""
    if bool(target) != bool(served):
        raise InvalidArgument("--target and --served go together: the composer's address and the pool it serves")
    if max_tasks < 1:
        raise InvalidArgument(f"max tasks must be >= 1, got {max_tasks}")
    pool = pool_mod.load(pool_dir)
    test = load_dataset(dataset or pool.info.get("dataset", "fashion-mnist"), "test")
    t0 = time.time()
    if target:
        rows = evaluate_served_pool(target, served, pool.oracle(), test, max_tasks, execution)
        ref = rows[0]["pool"] if rows else served
    else:
        rows = evaluate_pool(pool, test, max_tasks, fused=execution == "fused")
        ref = pool.ref
    if not rows:
        raise InvalidArgument(f"pool {ref} has no experts to compose")
    oracle_params = count_params(pool.oracle())
    deltas = [r["delta"] for r in rows]
    one_task = [r["params"] for r in rows if r["n"] == 1]
    return {"pool": ref, "served_by": target, "oracle_from": pool.ref, "queries": len(rows),
            "test_images": len(test),
            "oracle_params": oracle_params, "oracle_test_acc": pool.info.get("oracle", {}).get("test_acc"),
            "mean_delta_pt": round(100 * sum(deltas) / len(deltas), 3),
            "worst_delta_pt": round(100 * min(deltas), 3),
            "mean_accuracy": round(sum(r["accuracy"] for r in rows) / len(rows), 5),
            "mean_oracle_accuracy": round(sum(r["oracle_accuracy"] for r in rows) / len(rows), 5),
            "one_task_params_max": max(one_task),
            "seconds": round(time.time() - t0, 1), "rows": rows}


def table(summary: dict) -> str:
    """One line per query (params, PoE's and the restricted oracle's accuracy, delta) and a summary line."""
    lines = [f"{'tasks':<58} {'params':>8} {'PoE':>7} {'oracle':>7} {'delta':>7}"]
    for r in summary["rows"]:
        lines.append(f"{'+'.join(r['tasks']):<58} {r['params']:>8,} {r['accuracy']:>7.4f} "
                     f"{r['oracle_accuracy']:>7.4f} {100 * r['delta']:>+6.2f}")
    oracle_params, largest = summary["oracle_params"], summary["one_task_params_max"]
    lines.append(f"{summary['queries']} queries on {summary['test_images']} test images: mean delta "
                 f"{summary['mean_delta_pt']:+.2f} pt, worst {summary['worst_delta_pt']:+.2f} pt; oracle "
                 f"{oracle_params:,} params, largest one-task model {largest:,} ({largest / oracle_params:.1%})")
    return "\n".join(lines)
