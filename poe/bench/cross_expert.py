"""`poe bench cross-expert`: the error analysis of the method (Kim and Choi, *Pool of Experts*, SIGMOD 2021).

For every query of 2..5 primitive tasks, the share of the composed model's errors whose predicted
class belongs to another primitive task than the true class, for expert sets trained with L_soft
only, L_scale only and both (the pool's own experts, or a set retrained on the ablations' schedule).
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from poe.bench import common
from poe.bench.common import Progress, quiet
from poe.bench.report import hardware, header, percent, stamp
from poe.engine import pool as pool_mod
from poe.engine.data import Dataset
from poe.engine.errors import InvalidArgument
from poe.engine.nets import ExpertConfig
from poe.engine.pool import Expert, Pool
from poe.engine.train import CKDSettings, Schedule, TeacherViews, train_experts

TITLE = "Cross-expert errors: L_soft, L_scale and both"
TRAINED_ON = "ablation experts trained on {}; every expert set evaluated on the CPU"


@dataclass(frozen=True)
class CrossExpertSettings:
    queries: int = 0  # 0: every query of 2..max_tasks primitive tasks
    max_tasks: int = 5
    epochs: int = 10  # the ablation experts' schedule; `poe train`'s defaults for experts
    batch_size: int = 128
    lr: float = 0.1
    views: int = 4  # teacher views when they are not taken from a run directory
    retrain_both: bool = False  # train the L_soft + L_scale set too, on the same schedule as the ablations
    seed: int = 0
    device: str = "cpu"  # where the ablation experts train: cpu, cuda, cuda:N or auto

    def __post_init__(self) -> None:
        common.check_device_name(self.device)
        if min(self.epochs, self.batch_size, self.views, self.max_tasks) < 1 or self.queries < 0 or self.lr <= 0:
            raise InvalidArgument("epochs, batch size, views and max tasks must be >= 1, queries >= 0, lr > 0")
        if self.max_tasks < 2:
            raise InvalidArgument("cross-expert errors need queries of at least 2 primitive tasks (max tasks >= 2)")


VARIANTS = {
    "soft": ("L_soft only", CKDSettings(soft_weight=1.0, scale_weight=0.0)),
    "scale": ("L_scale only", CKDSettings(soft_weight=0.0, scale_weight=0.3)),
    "both": ("L_soft + L_scale", CKDSettings()),
}


def cross_expert_counts(pred: torch.Tensor, labels: torch.Tensor, task_of: torch.Tensor) -> tuple[int, int]:
    """(errors, cross-expert errors): predictions of another class, and of a class of another task."""
    wrong = pred != labels
    cross = wrong & (task_of[pred] != task_of[labels])
    return int(wrong.sum()), int(cross.sum())


def _settings_key(pool: Pool, train: Dataset, views: TeacherViews, name: str, s: CrossExpertSettings) -> str:
    h = hashlib.sha256(pool_mod.tensors_to_bytes(pool.library_state))
    h.update(train.labels.numpy().tobytes())
    h.update(views.logits[:1000].numpy().tobytes())
    key = (len(views), s.epochs, s.batch_size, s.lr, s.seed, VARIANTS[name][1])
    kind = torch.device(s.device).type
    # Experts trained on a GPU are kept apart (their checkpoints hold CUDA tensors); the CPU's key is the
    # one it always was, so existing CPU runs resume.
    h.update(str(key if kind == "cpu" else (*key, kind)).encode())
    return f"{pool.name}-{pool.version}-{name}-{h.hexdigest()[:12]}"


def ablation_experts(pool: Pool, views: TeacherViews, name: str, s: CrossExpertSettings, train: Dataset,
                     work_dir: Path, progress: Progress = quiet) -> tuple[dict[str, Expert], float]:
    """One expert per primitive task, trained with the variant's loss on the pool's frozen library.

    Training runs through `poe.engine.train.train_experts`, checkpointed under a directory named after the
    settings, so an interrupted full run resumes and a finished one is not trained again.
    """
    ckd = VARIANTS[name][1]
    first = next(iter(pool.experts.values())).config
    out_dir = work_dir / _settings_key(pool, train, views, name, s)
    tasks = {t: list(ids) for t, ids in pool.hierarchy.tasks.items()}
    batch = max(1, min(s.batch_size, len(views)))
    progress(f"training the '{VARIANTS[name][0]}' experts ({s.epochs} epoch(s) on {len(views)} views"
             + (f", on {s.device}" if s.device != "cpu" else "") + f") in {out_dir}")
    t0 = common.now(s.device)
    heads = train_experts(pool.library(), tasks, ExpertConfig(first.in_channels, first.width, first.blocks, 1),
                          views, None, Schedule(s.epochs, batch, s.lr, seed=s.seed), out_dir, device=s.device,
                          ckd=ckd, stage=f"experts-{name}")
    seconds = common.now(s.device) - t0
    loss = dataclasses.asdict(ckd)
    # The experts are evaluated on the CPU, as the product runs them: their weights come back there.
    return {t: Expert(t, tuple(tasks[t]), ExpertConfig(first.in_channels, first.width, first.blocks, len(tasks[t])),
                      {k: v.cpu() for k, v in heads[t].state_dict().items()}, {}, loss) for t in tasks}, seconds


def run_cross_expert(pool: Pool, train: Dataset, test: Dataset, s: CrossExpertSettings, work_dir: Path,
                     views: TeacherViews | None = None, views_source: str = "",
                     progress: Progress = quiet) -> dict:
    """Cross-expert error share of composed models for the three expert sets.

    The ablation experts train on `s.device`; every expert set is evaluated on the CPU, so that the
    pool's own experts give exactly the composed model's (CPU) predictions."""
    s = dataclasses.replace(s, device=common.bench_device(s.device))
    queries = common.select_queries(pool, range(2, s.max_tasks + 1), s.queries, s.seed)
    if not queries:
        raise InvalidArgument("cross-expert errors need queries of at least 2 primitive tasks")
    sets: dict[str, dict] = {}
    for name in VARIANTS:
        if name == "both" and not s.retrain_both:
            sets[name] = {"experts": pool.experts, "source": "pool",
                          "loss": next(iter(pool.experts.values())).loss, "train_s": None}
            continue
        if views is None:
            views, views_source = common.teacher_views(pool, train, s.views, seed=s.seed, progress=progress,
                                                device=s.device)
        experts, seconds = ablation_experts(pool, views, name, s, train, work_dir, progress)
        sets[name] = {"experts": experts, "source": "trained", "loss": dataclasses.asdict(VARIANTS[name][1]),
                      "train_s": round(seconds, 1)}

    progress(f"evaluating {len(queries)} queries x {len(sets)} expert sets on {len(test)} test images")
    feats = common.library_features(pool.library(), test.images)
    task_of = torch.empty(len(pool.hierarchy.classes), dtype=torch.long)
    for i, ids in enumerate(pool.hierarchy.tasks.values()):
        task_of[list(ids)] = i
    # One pass of every expert over the test images; a query's composed prediction is the argmax over
    # its experts' concatenated logits (what ReferenceExperts computes; tests check it against compose).
    logits = {name: {t: common.head_logits(e.module(), feats) for t, e in st["experts"].items()}
              for name, st in sets.items()}
    rows = []
    for tasks in queries:
        ids = torch.tensor([c for t in tasks for c in pool.experts[t].class_ids])
        mask = torch.isin(test.labels, ids)
        labels = test.labels[mask]
        row = {"tasks": list(tasks), "n": len(tasks), "test_images": int(mask.sum())}
        for name in sets:
            cat = torch.cat([logits[name][t][mask] for t in tasks], dim=1)
            pred = ids[cat.argmax(1)]
            errors, cross = cross_expert_counts(pred, labels, task_of)
            row[name] = {"accuracy": round(1 - errors / max(1, len(labels)), 6), "errors": errors,
                         "cross_expert_errors": cross,
                         "cross_expert_share": round(cross / errors, 6) if errors else None}
        rows.append(row)

    by_n = {}
    for n in sorted({r["n"] for r in rows}):
        rs = [r for r in rows if r["n"] == n]
        by_n[str(n)] = {"queries": len(rs)}
        for name in sets:
            errors = sum(r[name]["errors"] for r in rs)
            cross = sum(r[name]["cross_expert_errors"] for r in rs)
            by_n[str(n)][name] = {"errors": errors, "cross_expert_errors": cross,
                                  "share": round(cross / errors, 6) if errors else None,
                                  "mean_query_share": common.mean([r[name]["cross_expert_share"] for r in rs]),
                                  "accuracy": common.mean([r[name]["accuracy"] for r in rs])}
    return {"part": "cross-expert", "pool": pool.ref, "settings": dataclasses.asdict(s),
            "train_images": len(train), "test_images": len(test), "teacher_views": views_source or None,
            "views": len(views) // len(train) if views is not None else None,
            "expert_sets": {name: {k: v for k, v in st.items() if k != "experts"} | {"label": VARIANTS[name][0]}
                            for name, st in sets.items()},
            "queries": len(rows), "summary": {"by_n": by_n}, "rows": rows}


def markdown(result: dict) -> str:
    s, sets = result["settings"], result["expert_sets"]
    names = list(sets)
    trained = [n for n in names if sets[n]["source"] == "trained"]
    lines = header(result, TRAINED_ON) + [
        "",
        f"Share of errors whose predicted class belongs to another primitive task than the true class (all "
        f"errors of the n = 2..{s['max_tasks']} queries pooled), with the composed models' mean accuracy in "
        f"brackets; {result['queries']} queries, {result['test_images']} test images. "
        + (f"Ablation experts ({', '.join(sets[n]['label'] for n in trained)}) trained on the pool's frozen library "
           f"for {s['epochs']} epoch(s), batch {s['batch_size']}, lr {s['lr']}, on "
           f"{result['views']} teacher view(s) of {result['train_images']} training images "
           f"({'from ' + result['teacher_views'] if result['teacher_views'] not in (None, 'computed') else 'computed'})"
           "; " if trained else "")
        + ("L_soft + L_scale: the pool's own experts." if sets.get("both", {}).get("source") == "pool"
           else "L_soft + L_scale: retrained on the same schedule."),
        "",
        "| n | queries | " + " | ".join(sets[n]["label"] for n in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for n, b in result["summary"]["by_n"].items():
        cells = []
        for name in names:
            c = b[name]
            cells.append("–" if c["share"] is None else f"{100 * c['share']:.1f}% ({percent(c['accuracy'])})")
        lines.append(f"| {n} | {b['queries']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- entry point (the CLI) -----------------------------------------------------------------------

QUICK = CrossExpertSettings(epochs=1, batch_size=64, views=2)
FULL = CrossExpertSettings()
DEFAULT_WORK_DIR = "runs/bench-cross-expert"  # full runs keep their ablation experts (a rerun resumes)


def settings(quick: bool = False, **overrides) -> CrossExpertSettings:
    """The full or quick preset, with every override that is not None applied."""
    return common.with_overrides(QUICK if quick else FULL, overrides)


def run(pool_dir: str | Path, quick: bool = False, dataset: str | None = None, run_dir: str | None = None,
        work_dir: str | None = None, command: str | None = None, progress: Progress = quiet, **overrides) -> dict:
    """The benchmark on a pool directory; `overrides` replace fields of the (quick) settings. With
    `run_dir`, the ablation experts learn from the teacher views `poe train` stored there; their
    checkpoints go to `work_dir` (quick runs without one: a temporary directory)."""
    s = settings(quick, **overrides)
    # Before any work: an unknown or absent device is a one-line error.
    s = dataclasses.replace(s, device=common.bench_device(s.device))
    pool = pool_mod.load(pool_dir)
    hw = hardware(s.device)
    started = time.time()
    train, test = common.load_data(pool, dataset, quick, s.seed, progress)
    views, source = None, ""
    if run_dir:
        views, source = common.teacher_views(pool, train, s.views, run_dir, s.seed, progress, s.device)
    work_dir = work_dir or (None if quick else DEFAULT_WORK_DIR)
    if work_dir:
        result = run_cross_expert(pool, train, test, s, Path(work_dir), views, source, progress)
    else:
        with tempfile.TemporaryDirectory(prefix="poe-bench-xe-") as tmp:
            result = run_cross_expert(pool, train, test, s, Path(tmp), views, source, progress)
    return stamp(result, quick=quick, hw=hw, command=command, started=started)
