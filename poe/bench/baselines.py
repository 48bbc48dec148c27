"""`poe bench baselines`: accuracy, size and time to build of PoE against models trained for the query.

For queries of 1..5 primitive tasks: accuracy and size of the oracle restricted to the query's
classes, of PoE (train-free, `poe.engine.compose`) and of three models trained for the query (the
baselines of Kim and Choi, *Pool of Experts*, SIGMOD 2021), and the time each needs to be built:

- *Scratch*: the library's architecture, freshly initialised, plus a head of width w*n (w = the
  pool's expert width, 16 in the publication and the shipped pool; n = number of primitive tasks),
  trained end to end with cross-entropy on the training images of the query's classes;
- *Transfer*: the same head on the pool's frozen library, cross-entropy on the same images;
- *CKD head*: the same head on the frozen library, trained with CKD (L_soft + 0.3 L_scale) against
  the oracle's logits sliced to the query's classes, on the whole training set (CKD's definition:
  the expert also sees images outside its classes).

Time to build: PoE's compose time (plan + build of the in-memory model; median of repeats) against
the wall time a baseline needs until its accuracy on a *monitor slice* (a seeded slice of the
query's test images) first reaches PoE's accuracy on the same slice, evaluated every `eval_every`
steps with the clock stopped during evaluation. Every figure in the accuracy table is on all test
images of the query's classes, after the whole training budget.

What each baseline is charged: its training steps, plus the frozen library's forward pass over its
training images (measured once over the training set and charged pro rata). Not charged: the
oracle's logits on the training set that the CKD head needs (computed once, as PoE's preprocessing
already does), and all evaluation. Both favour the baselines, so the speed-up is a lower bound.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from poe.bench.common import (
    Progress,
    bench_device,
    check_device_name,
    head_logits,
    library_features,
    load_data,
    mean,
    median,
    now,
    quiet,
    select_queries,
    teacher_views,
    with_overrides,
)
from poe.bench.report import hardware, header, percent, stamp
from poe.engine import pool as pool_mod
from poe.engine.compose import build, compose, plan, plan_params
from poe.engine.data import Dataset, to_float
from poe.engine.errors import InvalidArgument
from poe.engine.evaluate import logits_of, restricted_accuracy
from poe.engine.losses import ckd_loss
from poe.engine.nets import Head, Library, count_flops, count_params
from poe.engine.pool import Pool
from poe.engine.train import Schedule, TeacherViews, fit

TITLE = "Accuracy, size and time to build against trained baselines"
METHODS = ("scratch", "transfer", "ckd")
METHOD_NAMES = {"scratch": "Scratch", "transfer": "Transfer", "ckd": "CKD head"}
TRAINED_ON = "baselines trained on {}; PoE composed and evaluated on the CPU"


@dataclass(frozen=True)
class BaselineSettings:
    queries: int = 0  # 0: every query of 1..max_tasks primitive tasks; else a seeded sample
    max_tasks: int = 5
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.1
    eval_every: int = 25  # training steps between evaluations on the monitor slice
    monitor_images: int = 1000
    budget_s: float = 0.0  # cap on each baseline's training time per query; 0: the epochs alone
    stop_at_target: bool = False  # stop a baseline once it reaches PoE's accuracy (faster, truncates accuracy)
    bf16: bool = True  # bf16 autocast for the baselines' training steps (the engine trains this way too)
    compose_repeats: int = 5
    methods: tuple[str, ...] = METHODS
    seed: int = 0
    device: str = "cpu"  # where the baselines train: cpu, cuda, cuda:N or auto (PoE always composes on the CPU)

    def __post_init__(self) -> None:
        check_device_name(self.device)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise InvalidArgument(f"unknown baselines: {', '.join(unknown) or '(none given)'} "
                                  f"(known: {', '.join(METHODS)})")
        if min(self.epochs, self.batch_size, self.eval_every, self.monitor_images, self.max_tasks) < 1:
            raise InvalidArgument("epochs, batch size, eval-every, monitor images and max tasks must be >= 1")
        if self.queries < 0 or self.budget_s < 0 or self.lr <= 0:
            raise InvalidArgument("queries and budget must be >= 0, lr > 0")


def query_class_ids(pool: Pool, tasks: tuple[str, ...]) -> list[int]:
    return sorted(c for t in tasks for c in pool.hierarchy.tasks[t])


def device_logits(model: nn.Module, images: torch.Tensor, device: str = "cpu",
                  batch_size: int = 1000) -> torch.Tensor:
    """`poe.engine.evaluate.logits_of` for a model on `device` (images there or on the CPU): logits on the CPU."""
    if device == "cpu":
        return logits_of(model, images, batch_size)
    with torch.no_grad():
        return torch.cat([model(to_float(images[i:i + batch_size].to(device))).float().cpu()
                          for i in range(0, images.shape[0], batch_size)])


# -- training a baseline to PoE's accuracy -------------------------------------------------------

@dataclass
class _Trainee:
    """One baseline, ready to train: what `fit` needs and how to get its predictions."""

    modules: dict[str, nn.Module]
    step: Callable[[torch.Tensor, torch.Generator], torch.Tensor]
    num_examples: int
    monitor_logits: Callable[[], torch.Tensor]
    test_logits: Callable[[], torch.Tensor]
    setup_s: float
    params: int
    flops: int


def head_width(pool: Pool, n_tasks: int) -> int:
    """The baselines' head width: the pool's expert width times the number of primitive tasks."""
    return next(iter(pool.experts.values())).config.width * n_tasks


def train_to_target(name: str, t: _Trainee, target: float, monitor_labels: torch.Tensor, s: BaselineSettings,
                    progress: Progress = quiet) -> dict:
    """Train with `poe.engine.train.fit`, evaluating on the monitor slice every `eval_every` steps.

    The clock (which starts with the setup time) runs only during training steps; on a CUDA device
    it waits for the queued kernels before every reading. Returns the time at which the monitor
    accuracy first reached `target` (None if never), the best monitor accuracy, the whole curve and
    the final accuracy on every test image of the query's classes.
    """
    batch = max(1, min(s.batch_size, t.num_examples))
    schedule = Schedule(epochs=s.epochs, batch_size=batch, lr=s.lr, warmup_epochs=0.1 * s.epochs, seed=s.seed)
    device = s.device
    clock = {"train": t.setup_s, "since": now(device), "steps": 0}
    curve: list[list[float]] = []
    reached: list[float] = []

    def evaluate() -> None:
        clock["train"] += now(device) - clock["since"]
        for m in t.modules.values():
            m.eval()
        acc = float((t.monitor_logits().argmax(1) == monitor_labels).float().mean())
        for m in t.modules.values():
            m.train()
        curve.append([clock["steps"], round(clock["train"], 4), round(acc, 5)])
        if not reached and acc >= target:
            reached.append(clock["train"])
        clock["since"] = now(device)

    def should_stop() -> bool:
        clock["steps"] += 1
        if clock["steps"] % s.eval_every == 0:
            evaluate()
        if s.stop_at_target and reached:
            return True
        spent = clock["train"] + now(device) - clock["since"]
        return bool(s.budget_s) and spent >= s.budget_s

    evaluate()  # step 0: the untrained model (and the setup time)
    if not (s.stop_at_target and reached):
        fit(name, t.modules, t.step, t.num_examples, schedule, should_stop=should_stop)
    if curve[-1][0] != clock["steps"]:
        evaluate()
    for m in t.modules.values():
        m.eval()
    test_logits = t.test_logits()
    total = curve[-1][1]
    progress(f"  {METHOD_NAMES.get(name, name)}: {clock['steps']} steps, {total:.1f} s, best monitor accuracy "
             f"{max(c[2] for c in curve):.4f} (target {target:.4f}"
             + (f", reached after {reached[0]:.1f} s)" if reached else ", not reached)"))
    return {"params": t.params, "flops": t.flops, "steps": clock["steps"], "setup_s": round(t.setup_s, 4),
            "train_s": round(total, 4), "time_to_target_s": round(reached[0], 4) if reached else None,
            "reached": bool(reached), "best_monitor_accuracy": round(max(c[2] for c in curve), 5),
            "test_logits": test_logits, "curve": curve}


def _autocast(enabled: bool, device: str = "cpu"):
    """bf16 autocast for the device's type (cpu or cuda), as `poe.engine.train` trains."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if enabled else nullcontext()


def _flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """count_flops runs one CPU input through the model: a model on a CUDA device is counted on a copy."""
    if any(p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).cpu()
    return count_flops(model, input_shape)


def make_trainee(method: str, pool: Pool, tasks: tuple[str, ...], ids: list[int], train: Dataset,
                 train_feats: torch.Tensor, feats_s: float, teacher: torch.Tensor | None, test_images: torch.Tensor,
                 test_feats: torch.Tensor, monitor: torch.Tensor, s: BaselineSettings) -> _Trainee:
    """Scratch, Transfer or CKD head for one query (see the module docstring).

    Everything the baseline trains and is evaluated on is on `s.device`: `train_feats`, `teacher`,
    `test_images`, `test_feats` and `monitor` are passed there already (once per run or query);
    the model and the query's training images and labels are moved there here, inside the setup
    time. Batches are indexed on the device (fit's index tensors are copied there, a few hundred
    integers per step)."""
    device = s.device
    ids_t = torch.tensor(ids)
    lut = torch.full((len(pool.hierarchy.classes),), -1, dtype=torch.long)
    lut[ids_t] = torch.arange(len(ids))
    mask = torch.isin(train.labels, ids_t)
    width = head_width(pool, len(tasks))
    blocks = pool.library_config.blocks_per_group
    input_shape = tuple(train.images.shape[1:])
    feat_ch = pool.library_config.channels[2]  # the library's output channels
    torch.manual_seed(s.seed)  # the models are initialised on the CPU, as in a CPU run, then moved
    t0 = now(device)
    if method == "scratch":
        model = nn.Sequential(Library(pool.library_config), Head(feat_ch, width, blocks, len(ids)))
        images, labels = train.images[mask], lut[train.labels[mask]]
        if device != "cpu":
            model = model.to(device)
            images, labels = images.to(device), labels.to(device)
        made = now(device) - t0

        def step(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
            idx = idx.to(device)
            with _autocast(s.bf16, device):
                logits = model(to_float(images[idx]))
            return F.cross_entropy(logits.float(), labels[idx])

        return _Trainee({"model": model}, step, len(images),
                        lambda: device_logits(model, test_images[monitor], device),
                        lambda: device_logits(model, test_images, device), made, count_params(model),
                        _flops(model, input_shape))

    head = Head(feat_ch, width, blocks, len(ids))
    made = now(device) - t0
    full = nn.Sequential(pool.library(), head)
    params, flops = count_params(full), count_flops(full, input_shape)  # on the CPU, before the move
    if device != "cpu":
        t0 = now(device)
        head = head.to(device)
        made += now(device) - t0
    ids_d = ids_t.to(device)
    mask_d = mask.to(device)
    if method == "transfer":
        feats, labels = train_feats[mask_d], lut[train.labels[mask]].to(device)

        def step(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
            idx = idx.to(device)
            with _autocast(s.bf16, device):
                logits = head(feats[idx].float())
            return F.cross_entropy(logits.float(), labels[idx])

        setup = made + feats_s * len(feats) / len(train_feats)
    elif method == "ckd":
        if teacher is None:
            raise InvalidArgument("the CKD head needs the oracle's logits on the training images")
        feats = train_feats

        def step(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
            idx = idx.to(device)
            with _autocast(s.bf16, device):
                logits = head(feats[idx].float())
            return ckd_loss(logits.float(), teacher[idx], ids_d)

        setup = made + feats_s
    else:
        raise InvalidArgument(f"unknown baseline {method!r} (known: {', '.join(METHODS)})")
    return _Trainee({"head": head}, step, len(feats), lambda: head_logits(head, test_feats[monitor]),
                    lambda: head_logits(head, test_feats), setup, params, flops)


def _warm_up(pool: Pool, train: Dataset, train_feats: torch.Tensor, teacher: torch.Tensor | None,
             s: BaselineSettings) -> None:
    """On a CUDA device: a few untimed steps of each baseline on throwaway models, through the same
    code (make_trainee, fit, SGD, autocast, evaluation), so that what CUDA and torch load or set up
    at first use is not charged to the first query's baselines."""
    tasks = (next(iter(pool.experts)),)
    ids = query_class_ids(pool, tasks)
    with torch.random.fork_rng(devices=[]):  # the throwaway models are initialised on the CPU
        for method in s.methods:
            t = make_trainee(method, pool, tasks, ids, train, train_feats, 0.0, teacher, torch.empty(0),
                             torch.empty(0), torch.empty(0, dtype=torch.long), s)
            batch = max(1, min(s.batch_size, t.num_examples))
            fit(f"warm-up ({method})", t.modules, t.step, min(t.num_examples, 3 * batch),
                Schedule(epochs=1, batch_size=batch, lr=s.lr, seed=s.seed))
            for m in t.modules.values():
                m.eval()
            probe = train.images[:batch].to(s.device)
            with torch.no_grad():
                (t.modules["model"](to_float(probe)) if method == "scratch"
                 else t.modules["head"](train_feats[:batch].float()))
    now(s.device)


def run_baselines(pool: Pool, train: Dataset, test: Dataset, s: BaselineSettings,
                  views: TeacherViews | None = None, progress: Progress = quiet) -> dict:
    """Accuracy, size and time to build of PoE against the oracle and the trained baselines.

    The baselines train on `s.device`; the oracle's logits and the frozen library's features are
    computed there too (the features' time, charged to Transfer and CKD head, is measured there).
    PoE composes and is evaluated on the CPU, as the product does."""
    s = dataclasses.replace(s, device=bench_device(s.device))
    device = s.device
    queries = select_queries(pool, range(1, s.max_tasks + 1), s.queries, s.seed)
    input_shape = tuple(train.images.shape[1:])
    oracle = pool.oracle()
    oracle_params, oracle_flops = count_params(oracle), count_flops(oracle, input_shape)
    progress(f"oracle logits on {len(test)} test images" + (f" on {device}" if device != "cpu" else ""))
    oracle_logits = device_logits(oracle.to(device), test.images, device)
    del oracle
    library = pool.library().to(device)
    progress(f"library features of {len(train)} training and {len(test)} test images")
    if device != "cpu":  # one untimed batch first: CUDA loads its kernels at their first use
        library_features(library, train.images[:1000], device=device)
    t0 = now(device)
    train_feats = library_features(library, train.images, device=device)
    feats_s = now(device) - t0
    test_feats = library_features(library, test.images, device=device)
    teacher = None
    if "ckd" in s.methods:
        if views is None:
            views, _ = teacher_views(pool, train, 1, progress=progress, device=device)
        teacher = views.logits[:len(train)].to(device)
    if device != "cpu":
        _warm_up(pool, train, train_feats, teacher, s)

    rows = []
    for qi, tasks in enumerate(queries):
        ids = query_class_ids(pool, tasks)
        ids_t = torch.tensor(ids)
        qmask = torch.isin(test.labels, ids_t)
        q_images, q_labels = test.images[qmask], test.labels[qmask]
        g = torch.Generator().manual_seed(s.seed * 7919 + qi)
        monitor = torch.randperm(len(q_labels), generator=g)[:s.monitor_images].sort().values
        monitor_d, q_images_d, q_feats = monitor.to(device), q_images.to(device), test_feats[qmask.to(device)]
        remapped = torch.searchsorted(ids_t, q_labels)  # label -> output column (ids are sorted)
        progress(f"query {qi + 1}/{len(queries)}: {'+'.join(tasks)} ({len(ids)} classes, {len(q_labels)} test images)")

        p = plan(pool, tasks=list(tasks))
        seconds = []
        for _ in range(max(1, s.compose_repeats)):
            t0 = time.perf_counter()
            compose(pool, tasks=list(tasks))
            seconds.append(time.perf_counter() - t0)
        poe_model = build(pool, p, fused=True)
        poe_logits = logits_of(poe_model, q_images)
        poe_acc = float((poe_logits.argmax(1) == remapped).float().mean())
        target = float((poe_logits[monitor].argmax(1) == remapped[monitor]).float().mean())
        row = {
            "tasks": list(tasks), "n": len(tasks), "classes": [pool.hierarchy.classes[c] for c in ids],
            "test_images": len(q_labels), "monitor_images": len(monitor),
            "oracle": {"accuracy": round(restricted_accuracy(oracle_logits[qmask], q_labels, ids), 6),
                       "params": oracle_params, "flops": oracle_flops},
            "poe": {"accuracy": round(poe_acc, 6), "monitor_accuracy": round(target, 6),
                    "params": plan_params(pool, p), "flops": count_flops(build(pool, p, fused=False), input_shape),
                    "compose_s": round(statistics.median(seconds), 6)},
        }
        progress(f"  PoE: accuracy {poe_acc:.4f} (monitor {target:.4f}), composed in "
                 f"{row['poe']['compose_s'] * 1e3:.1f} ms")
        for method in s.methods:
            trainee = make_trainee(method, pool, tasks, ids, train, train_feats, feats_s, teacher, q_images_d,
                                   q_feats, monitor_d, s)
            r = train_to_target(method, trainee, target, remapped[monitor], s, progress)
            logits = r.pop("test_logits")
            r["accuracy"] = round(float((logits.argmax(1) == remapped).float().mean()), 6)
            r["speedup"] = (round(r["time_to_target_s"] / row["poe"]["compose_s"], 1)
                            if r["reached"] and row["poe"]["compose_s"] > 0 else None)
            row[method] = r
        reached = [row[m]["time_to_target_s"] for m in s.methods if row[m]["reached"]]
        row["fastest_baseline_s"] = min(reached) if reached else None
        row["speedup_vs_fastest"] = (round(min(reached) / row["poe"]["compose_s"], 1)
                                     if reached and row["poe"]["compose_s"] > 0 else None)
        rows.append(row)
    return {"part": "baselines", "pool": pool.ref, "settings": dataclasses.asdict(s),
            "train_images": len(train), "test_images": len(test),
            "head_width_per_task": head_width(pool, 1), "queries": len(rows),
            "possible_queries": len(select_queries(pool, range(1, s.max_tasks + 1))),
            "summary": summarize_baselines(rows, s.methods), "rows": rows}


def summarize_baselines(rows: list[dict], methods: tuple[str, ...]) -> dict:
    def block(rs: list[dict]) -> dict:
        out = {"queries": len(rs),
               "oracle_accuracy": mean([r["oracle"]["accuracy"] for r in rs]),
               "oracle_params": rs[0]["oracle"]["params"], "oracle_flops": rs[0]["oracle"]["flops"],
               "poe_accuracy": mean([r["poe"]["accuracy"] for r in rs]),
               "poe_params": mean([r["poe"]["params"] for r in rs]),
               "poe_flops": mean([r["poe"]["flops"] for r in rs]),
               "poe_compose_s": median([r["poe"]["compose_s"] for r in rs])}
        for m in methods:
            out[m] = {"accuracy": mean([r[m]["accuracy"] for r in rs]),
                      "best_monitor_accuracy": mean([r[m]["best_monitor_accuracy"] for r in rs]),
                      "params": mean([r[m]["params"] for r in rs]), "flops": mean([r[m]["flops"] for r in rs]),
                      "reached": sum(r[m]["reached"] for r in rs),
                      "time_to_target_s": median([r[m]["time_to_target_s"] for r in rs]),
                      "train_s": median([r[m]["train_s"] for r in rs])}
        # A query of one class is left out of the speed-up: every model, even an untrained one, is
        # right on all its images, so "time to PoE's accuracy" measures nothing there.
        timed = [r for r in rs if len(r["classes"]) > 1]
        speedups = [r["speedup_vs_fastest"] for r in timed if r["speedup_vs_fastest"] is not None]
        out["speedup_vs_fastest"] = {"queries": len(speedups), "median": median(speedups),
                                     "min": min(speedups) if speedups else None,
                                     "one_class_queries_left_out": len(rs) - len(timed)}
        if "scratch" in methods:
            deltas = [r["poe"]["accuracy"] - r["scratch"]["accuracy"] for r in rs]
            out["poe_minus_scratch_pt"] = {"mean": round(100 * statistics.fmean(deltas), 3),
                                           "min": round(100 * min(deltas), 3)}
        return out

    by_n = {str(n): block([r for r in rows if r["n"] == n]) for n in sorted({r["n"] for r in rows})}
    return {"by_n": by_n, "all": block(rows) if rows else {}}

def _k(v: float | None) -> str:
    return "–" if v is None else f"{v / 1e3:,.1f}k"


def _mflops(v: float | None) -> str:
    return "–" if v is None else f"{v / 1e6:,.2f}"


def _secs(v: float | None) -> str:
    return "never" if v is None else (f"{v * 1e3:.1f} ms" if v < 1 else f"{v:,.1f} s")


def _reach(b: dict) -> str:
    """When a baseline matched PoE, or its best monitor accuracy and total time if it never did."""
    if b["reached"]:
        return _secs(b["time_to_target_s"])
    return f"never; best {percent(b['best_monitor_accuracy'])} in {_secs(b['train_s'])}"


def _times(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f}x"


def markdown(result: dict) -> str:
    s, summary = result["settings"], result["summary"]
    methods = [m for m in METHODS if m in s["methods"]]
    names = [METHOD_NAMES[m] for m in methods]
    lines = header(result, TRAINED_ON) + [
        "",
        f"{result['queries']} of the {result['possible_queries']} queries of 1..{s['max_tasks']} primitive tasks"
        f"{' (a seeded sample)' if result['queries'] < result['possible_queries'] else ''}; "
        f"{result['train_images']} training and {result['test_images']} test images. Baselines: "
        f"head width {result['head_width_per_task']}n, {s['epochs']} epoch(s), batch {s['batch_size']}, lr {s['lr']}"
        f"{', bf16 autocast' if s['bf16'] else ''}"
        + (f", time budget {s['budget_s']:g} s" if s["budget_s"] else "") +
        f"{', stopped at the target' if s['stop_at_target'] else ''}. Accuracy: mean over the queries, on all test "
        "images of each query's classes (%).",
        "",
        "| n | queries | oracle (restricted) | PoE | " + " | ".join(names) + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    rows = [(n, b) for n, b in summary["by_n"].items()] + [("all", summary["all"])]
    for n, b in rows:
        lines.append(f"| {n} | {b['queries']} | {percent(b['oracle_accuracy'])} | {percent(b['poe_accuracy'])} | "
                     + " | ".join(percent(b[m]["accuracy"]) for m in methods) + " |")
    lines += ["", "Size: parameters and MFLOPs (multiply-accumulates) per image, mean over the queries.", "",
              "| n | oracle | PoE | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for n, b in rows:
        lines.append(f"| {n} | {_k(b['oracle_params'])} / {_mflops(b['oracle_flops'])} | {_k(b['poe_params'])} / "
                     f"{_mflops(b['poe_flops'])} | "
                     + " | ".join(f"{_k(b[m]['params'])} / {_mflops(b[m]['flops'])}" for m in methods) + " |")
    lines += ["", f"Time to build: PoE's compose time (median) against each baseline's training time until it "
                  f"first matched PoE's accuracy on a monitor slice of up to {s['monitor_images']} test images "
                  f"(checked every {s['eval_every']} steps; median over the queries where it did, and in how many "
                  "it did). Speed-up: the fastest baseline that got there over PoE, per query.", "",
              "| n | PoE compose | " + " | ".join(names) + " | speed-up (median) | speed-up (min) |",
              "|---|---|" + "---|" * len(names) + "---|---|"]
    for n, b in rows:
        sp = b["speedup_vs_fastest"]
        lines.append(f"| {n} | {_secs(b['poe_compose_s'])} | "
                     + " | ".join(f"{_secs(b[m]['time_to_target_s'])} ({b[m]['reached']}/{b['queries']})"
                                  for m in methods)
                     + f" | {_times(sp['median'])} | {_times(sp['min'])} |")
    a = summary["all"]
    lines += ["", "Against the targets:", ""]
    if "poe_minus_scratch_pt" in a:
        d = a["poe_minus_scratch_pt"]
        verdict = ("met on every query" if d["min"] >= 0 else "met on average, not on every query"
                   if d["mean"] >= 0 else "missed")
        lines.append(f"- PoE accuracy at least Scratch's: PoE - Scratch = {d['mean']:+.2f} pt on average, "
                     f"{d['min']:+.2f} pt at worst -> {verdict}.")
    sp = a["speedup_vs_fastest"]
    left_out = sp.get("one_class_queries_left_out", 0)
    unreached = a["queries"] - left_out - sp["queries"]
    if sp["min"] is None:
        lines.append("- Build-time speed-up >= 1000x: no baseline reached PoE's accuracy within its budget.")
    else:
        lines.append(f"- Build-time speed-up >= 1000x over the fastest baseline that reaches PoE's accuracy: "
                     f"min {sp['min']:,.0f}x, median {sp['median']:,.0f}x over {sp['queries']} queries -> "
                     f"{'met' if sp['min'] >= 1000 else 'missed'}"
                     + (f"; in {unreached} queries no baseline reached PoE's accuracy" if unreached else "")
                     + (f"; {left_out} one-class quer{'y' if left_out == 1 else 'ies'} left out (every model, "
                        "even untrained, is right on all its images)" if left_out else "") + ".")
    lines += ["", "<details><summary>Per query</summary>", "",
              "Accuracy (%) after the whole budget, and (in brackets) the training time until the monitor accuracy "
              "matched PoE's.", "",
              "| tasks | oracle | PoE | " + " | ".join(names) + " | PoE compose | fastest baseline |",
              "|---|---|---|" + "---|" * len(names) + "---|---|"]
    for r in result["rows"]:
        lines.append(f"| {'+'.join(r['tasks'])} | {percent(r['oracle']['accuracy'])} | "
                     f"{percent(r['poe']['accuracy'])} | "
                     + " | ".join(f"{percent(r[m]['accuracy'])} ({_reach(r[m])})" for m in methods)
                     + f" | {_secs(r['poe']['compose_s'])} | {_secs(r['fastest_baseline_s'])} |")
    lines += ["", "</details>"]
    return "\n".join(lines)


# -- entry point (the CLI) -----------------------------------------------------------------------

QUICK = BaselineSettings(queries=2, epochs=1, batch_size=32, eval_every=2, monitor_images=40, compose_repeats=2)
FULL = BaselineSettings()


def settings(quick: bool = False, **overrides) -> BaselineSettings:
    """The full or quick preset, with every override that is not None applied."""
    return with_overrides(QUICK if quick else FULL, overrides)


def run(pool_dir: str | Path, quick: bool = False, dataset: str | None = None, run_dir: str | None = None,
        command: str | None = None, progress: Progress = quiet, **overrides) -> dict:
    """The benchmark on a pool directory; `overrides` replace fields of the (quick) settings. With
    `run_dir`, the CKD head learns from the teacher views `poe train` stored there."""
    s = settings(quick, **overrides)
    # Before any work: an unknown or absent device is a one-line error.
    s = dataclasses.replace(s, device=bench_device(s.device))
    pool = pool_mod.load(pool_dir)
    hw = hardware(s.device)
    started = time.time()
    train, test = load_data(pool, dataset, quick, s.seed, progress)
    views = None
    if run_dir and "ckd" in s.methods:
        views, _ = teacher_views(pool, train, 1, run_dir, s.seed, progress, s.device)
    result = run_baselines(pool, train, test, s, views, progress)
    return stamp(result, quick=quick, hw=hw, command=command, started=started)
