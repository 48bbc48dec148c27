"""Accuracy of composed models on the real test images of their classes, next to the oracle's.

"Oracle restricted to the classes" means: the oracle's logits sliced to the requested classes,
argmax among them — the same question the composed model answers.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from poe.engine.compose import build, plan
from poe.engine.data import Dataset, to_float
from poe.engine.pool import Pool


@dataclass
class EvalResult:
    classes: list[str]
    class_ids: list[int]
    images: int
    accuracy: float
    oracle_accuracy: float | None
    per_class: dict[str, float]

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        if self.oracle_accuracy is not None:
            d["delta"] = round(self.accuracy - self.oracle_accuracy, 6)
        return d


@torch.no_grad()
def logits_of(model: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    return torch.cat([model(to_float(images[i:i + batch_size])) for i in range(0, images.shape[0], batch_size)])


def restricted_accuracy(logits: torch.Tensor, labels: torch.Tensor, class_ids: list[int]) -> float:
    """Accuracy when `logits` (over all classes) may only choose among `class_ids`."""
    ids = torch.tensor(class_ids)
    return float((ids[logits[:, ids].argmax(1)] == labels).float().mean())


def evaluate_model(model: nn.Module, class_ids: list[int], test: Dataset,
                   oracle_logits: torch.Tensor | None = None) -> EvalResult:
    """`model` maps images to one logit column per class in `class_ids` (output order)."""
    ids = torch.tensor(class_ids)
    mask = torch.isin(test.labels, ids)
    labels = test.labels[mask]
    pred = ids[logits_of(model, test.images[mask]).argmax(1)]
    per_class = {test.classes[c]: round(float((pred[labels == c] == c).float().mean()), 4) for c in class_ids}
    acc = float((pred == labels).float().mean())
    oracle_acc = None
    if oracle_logits is not None:
        oracle_acc = restricted_accuracy(oracle_logits[mask], labels, class_ids)
    return EvalResult([test.classes[c] for c in class_ids], list(class_ids), int(mask.sum()), acc, oracle_acc,
                      per_class)


def all_task_queries(pool: Pool, max_tasks: int = 5) -> list[tuple[str, ...]]:
    tasks = list(pool.experts)
    return [c for n in range(1, min(max_tasks, len(tasks)) + 1) for c in itertools.combinations(tasks, n)]


def evaluate_pool(pool: Pool, test: Dataset, max_tasks: int = 5, fused: bool = True) -> list[dict]:
    """Every query of 1..max_tasks primitive tasks: composed accuracy against the restricted oracle."""
    oracle_logits = logits_of(pool.oracle(), test.images)
    rows = []
    for tasks in all_task_queries(pool, max_tasks):
        p = plan(pool, tasks=list(tasks))
        model = build(pool, p, fused)
        r = evaluate_model(model, list(p.class_ids), test, oracle_logits)
        rows.append({"tasks": list(tasks), "n": len(tasks), **r.as_dict(),
                     "params": sum(x.numel() for x in model.parameters())})
    return rows

