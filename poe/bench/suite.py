"""The paper's measurements on our data: `poe bench baselines | cross-expert | inference`.

- **baselines**: for queries of 1..5 primitive tasks, accuracy and size of the oracle restricted to
  the query's classes, of PoE (train-free, `poe.engine.compose`) and of three models trained for the query
  (PAPER.md, "Baselines"), and the time each needs to be built:

  - *Scratch*: the library's architecture, freshly initialised, plus a head of width w*n (w = the
    pool's expert width, 16 in the paper and the shipped pool; n = number of primitive tasks),
    trained end to end with cross-entropy on the training images of the query's classes;
  - *Transfer*: the same head on the pool's frozen library, cross-entropy on the same images;
  - *CKD head*: the same head on the frozen library, trained with CKD (L_soft + 0.3 L_scale) against
    the oracle's logits sliced to the query's classes, on the whole training set (CKD's definition:
    the expert also sees images outside its classes).

  Time to build: PoE's compose time (plan + build of the in-memory model; median of repeats) against
  the wall time a baseline needs until its accuracy on a *monitor slice* (a seeded slice of the
  query's test images) first reaches PoE's accuracy on the same slice, evaluated every
  `eval_every` steps with the clock stopped during evaluation. Every figure in the accuracy table
  is on all test images of the query's classes, after the whole training budget.

  What each baseline is charged: its training steps, plus the frozen library's forward pass over its
  training images (measured once over the training set and charged pro rata). Not charged: the
  oracle's logits on the training set that the CKD head needs (computed once, as PoE's preprocessing
  already does), and all evaluation. Both favour the baselines, so the speed-up is a lower bound.

- **cross-expert**: the paper's error analysis. For every query of 2..5 primitive tasks, the share of
  the composed model's errors whose predicted class belongs to another primitive task than the true
  class, for expert sets trained with L_soft only, L_scale only and both (the pool's own experts).

- **inference**: images/s of composed models (fused and reference execution, TorchScript as
  shipped) and of the oracle on the CPU, at batch 1 and 256, after warm-up, median of repeated calls.

Every part returns a JSON-able dict with its settings, the hardware, per-query rows and a summary,
renders a Markdown section, and `update_docs` writes that section between its markers in
docs/BENCHMARKS.md. `--quick` presets run every part on tiny subsets (tests/bench runs them).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import platform
import random
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from poe.engine import pool as pool_mod
from poe.engine.compose import build, compose, plan, plan_params
from poe.engine.config import resolve_device
from poe.engine.data import Dataset, load_dataset, to_float
from poe.engine.errors import InvalidArgument
from poe.engine.evaluate import logits_of, restricted_accuracy
from poe.engine.export import quiet_jit
from poe.engine.losses import ckd_loss
from poe.engine.nets import ExpertConfig, Head, Library, count_flops, count_params
from poe.engine.pool import Expert, Pool
from poe.engine.train import CKDSettings, Schedule, TeacherViews, fit, make_teacher_views, train_experts

Progress = Callable[[str], None]
PARTS = ("baselines", "cross-expert", "inference")
METHODS = ("scratch", "transfer", "ckd")
METHOD_NAMES = {"scratch": "Scratch", "transfer": "Transfer", "ckd": "CKD head"}


# -- settings ------------------------------------------------------------------------------------

_DEVICE_NAME = re.compile(r"cpu|auto|cuda(:\d+)?")


def check_device_name(name: str) -> None:
    """`--device` takes cpu, cuda, cuda:N or auto."""
    if not isinstance(name, str) or not _DEVICE_NAME.fullmatch(name):
        raise InvalidArgument(f"unknown device {name!r} (use cpu, cuda, cuda:N or auto)")


def bench_device(name: str) -> str:
    """The device to train on: `auto` resolved (CUDA when available, else the CPU); InvalidArgument
    when the device named is not there."""
    check_device_name(name)
    device = resolve_device(name)  # auto -> cuda or cpu; cuda without CUDA -> InvalidArgument
    if device.startswith("cuda:") and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise InvalidArgument(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA "
                              "device(s) are available")
    return device


def _is_cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


def _now(device: str = "cpu") -> float:
    """perf_counter, after waiting for the work queued on a CUDA device (its kernels run asynchronously)."""
    if _is_cuda(device):
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass(frozen=True)
class DataSettings:
    train_per_class: int = 0  # 0: the whole split
    test_per_class: int = 0


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
        check_device_name(self.device)
        if min(self.epochs, self.batch_size, self.views, self.max_tasks) < 1 or self.queries < 0 or self.lr <= 0:
            raise InvalidArgument("epochs, batch size, views and max tasks must be >= 1, queries >= 0, lr > 0")
        if self.max_tasks < 2:
            raise InvalidArgument("cross-expert errors need queries of at least 2 primitive tasks (max tasks >= 2)")


@dataclass(frozen=True)
class InferenceSettings:
    sizes: tuple[int, ...] = (1, 2, 3, 4, 5)  # one query per number of primitive tasks
    batch_sizes: tuple[int, ...] = (1, 256)
    warmup: int = 5
    repeats: int = 20
    min_seconds: float = 1.0  # keep timing until at least this long (and `repeats` calls)
    threads: int = 0  # torch threads; 0: torch's default
    eager: bool = False  # time the eager modules instead of TorchScript (what `poe compose` ships)
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.sizes or not self.batch_sizes or min(self.batch_sizes) < 1:
            raise InvalidArgument("inference needs query sizes and batch sizes >= 1")
        if self.warmup < 0 or self.repeats < 1 or self.min_seconds < 0 or self.threads < 0:
            raise InvalidArgument("warmup, min seconds and threads must be >= 0, repeats >= 1")


QUICK_DATA = DataSettings(train_per_class=40, test_per_class=20)
QUICK = {
    "baselines": BaselineSettings(queries=2, epochs=1, batch_size=32, eval_every=2, monitor_images=40,
                                  compose_repeats=2),
    "cross-expert": CrossExpertSettings(epochs=1, batch_size=64, views=2),
    "inference": InferenceSettings(sizes=(1, 5), warmup=2, repeats=3, min_seconds=0.0),
}
FULL = {"baselines": BaselineSettings(), "cross-expert": CrossExpertSettings(), "inference": InferenceSettings()}


def settings_for(part: str, quick: bool, **overrides) -> BaselineSettings | CrossExpertSettings | InferenceSettings:
    """The full or quick preset of a part, with every override that is not None applied."""
    if part not in PARTS:
        raise InvalidArgument(f"unknown benchmark {part!r} (known: {', '.join(PARTS)})")
    base = (QUICK if quick else FULL)[part]
    known = {f.name for f in dataclasses.fields(base)}
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None and k in known})


# -- shared helpers ------------------------------------------------------------------------------

def hardware(device: str = "cpu") -> dict:
    """What the figures were measured on: CPU model, cores, torch version and threads, and the GPU
    when `device` is a CUDA device."""
    model = None
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines()
                      if line.startswith("Model name")), None)
    except (OSError, subprocess.SubprocessError):
        pass
    if model is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                         if line.startswith("model name"))
        except (OSError, StopIteration):
            model = platform.processor() or "unknown"
    info = {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "device": device}
    if _is_cuda(device):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
                                text=True, timeout=10, cwd=Path(__file__).parent).stdout.strip()
        if commit:
            info["commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def hardware_line(hw: dict) -> str:
    return (f"{hw['cpu']}, {hw['cores']} cores"
            + (f", GPU {hw['gpu']} (CUDA {hw.get('cuda')})" if hw.get("gpu") else "")
            + f", torch {hw['torch']} ({hw['torch_threads']} thread(s)), "
            f"Python {hw['python']}" + (f", commit {hw['commit']}" if hw.get("commit") else ""))


def device_label(device: str | None, hw: dict | None = None) -> str:
    """'the CPU', or the GPU's name and device for a CUDA device."""
    if not device or device == "cpu":
        return "the CPU"
    gpu = (hw or {}).get("gpu")
    return f"the GPU {gpu} ({device})" if gpu else f"the GPU ({device})"


def select_queries(pool: Pool, sizes: range | tuple[int, ...], count: int = 0, seed: int = 0) -> list[tuple[str, ...]]:
    """Queries (tuples of primitive tasks, hierarchy order) with a number of tasks in `sizes`.

    count 0 (or at least the number of candidates): all of them. Otherwise a seeded sample spread
    evenly over the sizes (round robin over the sizes, a seeded shuffle within each).
    """
    import itertools

    tasks = list(pool.experts)
    groups = {n: list(itertools.combinations(tasks, n)) for n in sizes if 1 <= n <= len(tasks)}
    every = [q for n in sorted(groups) for q in groups[n]]
    if count <= 0 or count >= len(every):
        return every
    rng = random.Random(seed)
    for n in sorted(groups):
        rng.shuffle(groups[n])
    picked: list[tuple[str, ...]] = []
    while len(picked) < count:
        for n in sorted(groups):
            if groups[n] and len(picked) < count:
                picked.append(groups[n].pop())
    order = {q: i for i, q in enumerate(every)}
    return sorted(picked, key=order.__getitem__)


def query_class_ids(pool: Pool, tasks: tuple[str, ...]) -> list[int]:
    return sorted(c for t in tasks for c in pool.hierarchy.tasks[t])


def load_data(pool: Pool, dataset: str | None, data: DataSettings, seed: int = 0) -> tuple[Dataset, Dataset]:
    spec = dataset or pool.info.get("dataset") or pool.hierarchy.dataset
    train, test = load_dataset(spec, "train"), load_dataset(spec, "test")
    if len(train.classes) != len(pool.hierarchy.classes):
        raise InvalidArgument(f"data set {spec} has {len(train.classes)} classes, pool {pool.ref} "
                              f"{len(pool.hierarchy.classes)}")
    if data.train_per_class:
        train = train.stratified(data.train_per_class, seed)
    if data.test_per_class:
        test = test.stratified(data.test_per_class, seed)
    return train, test


def teacher_views(pool: Pool, train: Dataset, views: int, run_dir: str | Path | None = None, seed: int = 0,
                  progress: Progress = lambda m: None, device: str = "cpu") -> tuple[TeacherViews, str]:
    """The oracle's logits on fixed views of the training images (view 0: the images themselves).

    Taken from `run_dir/teacher_views.safetensors` (what `poe train` made for the pool) when that
    file holds views of exactly these training images; otherwise computed with the pool's oracle.
    """
    if run_dir:
        path = Path(run_dir) / "teacher_views.safetensors"
        if path.is_file():
            t = load_file(str(path))
            n = len(train)
            if (t["images"].shape[0] % n == 0 and t["images"].shape[1:] == train.images.shape[1:]
                    and torch.equal(t["images"][:n], train.images)):
                progress(f"teacher views from {path} ({t['images'].shape[0] // n} views)")
                return TeacherViews(t["images"], t["logits"]), str(path)
            progress(f"{path} holds views of other training images; computing them with the oracle")
    progress(f"oracle logits for {views} view(s) of {len(train)} training images"
             + (f" on {device}" if device != "cpu" else ""))
    return make_teacher_views(pool.oracle(), train, views, seed=seed, device=device, bf16=True), "computed"


@torch.no_grad()
def library_features(library: Library, images: torch.Tensor, batch_size: int = 1000,
                     device: str = "cpu") -> torch.Tensor:
    """The frozen library's feature maps for uint8 images, stored as fp16 (halves the memory).

    The library and the features are on `device` (the library must be there already); the images
    may be on the CPU (each batch is copied there as uint8)."""
    library.eval()
    return torch.cat([library(to_float(images[i:i + batch_size].to(device))).half()
                      for i in range(0, images.shape[0], batch_size)])


@torch.no_grad()
def head_logits(head: nn.Module, features: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """The head's logits for features (on the head's device), float32 on the CPU."""
    head.eval()
    return torch.cat([head(features[i:i + batch_size].float()).cpu()
                      for i in range(0, features.shape[0], batch_size)])


def device_logits(model: nn.Module, images: torch.Tensor, device: str = "cpu",
                  batch_size: int = 1000) -> torch.Tensor:
    """`poe.engine.evaluate.logits_of` for a model on `device` (images there or on the CPU): logits on the CPU."""
    if device == "cpu":
        return logits_of(model, images, batch_size)
    with torch.no_grad():
        return torch.cat([model(to_float(images[i:i + batch_size].to(device))).float().cpu()
                          for i in range(0, images.shape[0], batch_size)])


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.fmean(values), 6) if values else None


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 6) if values else None


@contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- baselines: accuracy, size, time to build ----------------------------------------------------

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
                    progress: Progress = lambda m: None) -> dict:
    """Train with `poe.engine.train.fit`, evaluating on the monitor slice every `eval_every` steps.

    The clock (which starts with the setup time) runs only during training steps; on a CUDA device
    it waits for the queued kernels before every reading. Returns the time at which the monitor
    accuracy first reached `target` (None if never), the best monitor accuracy, the whole curve and
    the final accuracy on every test image of the query's classes.
    """
    batch = max(1, min(s.batch_size, t.num_examples))
    schedule = Schedule(epochs=s.epochs, batch_size=batch, lr=s.lr, warmup_epochs=0.1 * s.epochs, seed=s.seed)
    device = s.device
    clock = {"train": t.setup_s, "since": _now(device), "steps": 0}
    curve: list[list[float]] = []
    reached: list[float] = []

    def evaluate() -> None:
        clock["train"] += _now(device) - clock["since"]
        for m in t.modules.values():
            m.eval()
        acc = float((t.monitor_logits().argmax(1) == monitor_labels).float().mean())
        for m in t.modules.values():
            m.train()
        curve.append([clock["steps"], round(clock["train"], 4), round(acc, 5)])
        if not reached and acc >= target:
            reached.append(clock["train"])
        clock["since"] = _now(device)

    def should_stop() -> bool:
        clock["steps"] += 1
        if clock["steps"] % s.eval_every == 0:
            evaluate()
        if s.stop_at_target and reached:
            return True
        spent = clock["train"] + _now(device) - clock["since"]
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
    t0 = _now(device)
    if method == "scratch":
        model = nn.Sequential(Library(pool.library_config), Head(feat_ch, width, blocks, len(ids)))
        images, labels = train.images[mask], lut[train.labels[mask]]
        if device != "cpu":
            model = model.to(device)
            images, labels = images.to(device), labels.to(device)
        made = _now(device) - t0

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
    made = _now(device) - t0
    full = nn.Sequential(pool.library(), head)
    params, flops = count_params(full), count_flops(full, input_shape)  # on the CPU, before the move
    if device != "cpu":
        t0 = _now(device)
        head = head.to(device)
        made += _now(device) - t0
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
    _now(s.device)


def run_baselines(pool: Pool, train: Dataset, test: Dataset, s: BaselineSettings,
                  views: TeacherViews | None = None, progress: Progress = lambda m: None) -> dict:
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
    t0 = _now(device)
    train_feats = library_features(library, train.images, device=device)
    feats_s = _now(device) - t0
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
               "oracle_accuracy": _mean([r["oracle"]["accuracy"] for r in rs]),
               "oracle_params": rs[0]["oracle"]["params"], "oracle_flops": rs[0]["oracle"]["flops"],
               "poe_accuracy": _mean([r["poe"]["accuracy"] for r in rs]),
               "poe_params": _mean([r["poe"]["params"] for r in rs]),
               "poe_flops": _mean([r["poe"]["flops"] for r in rs]),
               "poe_compose_s": _median([r["poe"]["compose_s"] for r in rs])}
        for m in methods:
            out[m] = {"accuracy": _mean([r[m]["accuracy"] for r in rs]),
                      "best_monitor_accuracy": _mean([r[m]["best_monitor_accuracy"] for r in rs]),
                      "params": _mean([r[m]["params"] for r in rs]), "flops": _mean([r[m]["flops"] for r in rs]),
                      "reached": sum(r[m]["reached"] for r in rs),
                      "time_to_target_s": _median([r[m]["time_to_target_s"] for r in rs]),
                      "train_s": _median([r[m]["train_s"] for r in rs])}
        # A query of one class is left out of the speed-up: every model, even an untrained one, is
        # right on all its images, so "time to PoE's accuracy" measures nothing there.
        timed = [r for r in rs if len(r["classes"]) > 1]
        speedups = [r["speedup_vs_fastest"] for r in timed if r["speedup_vs_fastest"] is not None]
        out["speedup_vs_fastest"] = {"queries": len(speedups), "median": _median(speedups),
                                     "min": min(speedups) if speedups else None,
                                     "one_class_queries_left_out": len(rs) - len(timed)}
        if "scratch" in methods:
            deltas = [r["poe"]["accuracy"] - r["scratch"]["accuracy"] for r in rs]
            out["poe_minus_scratch_pt"] = {"mean": round(100 * statistics.fmean(deltas), 3),
                                           "min": round(100 * min(deltas), 3)}
        return out

    by_n = {str(n): block([r for r in rows if r["n"] == n]) for n in sorted({r["n"] for r in rows})}
    return {"by_n": by_n, "all": block(rows) if rows else {}}


def _acc(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


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
    return f"never; best {_acc(b['best_monitor_accuracy'])} in {_secs(b['train_s'])}"


def _times(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f}x"


_TRAINED = {"baselines": "baselines trained on {}; PoE composed and evaluated on the CPU",
            "cross-expert": "ablation experts trained on {}; every expert set evaluated on the CPU"}


def _header(result: dict) -> list[str]:
    trained = _TRAINED.get(result.get("part", ""))
    where = ("; " + trained.format(device_label(result["settings"].get("device", "cpu"), result["hardware"]))
             if trained else "")
    lines = [f"Command: `{result.get('command', '(library call)')}`  ",
             f"Measured {result.get('date', '')} on {hardware_line(result['hardware'])}; pool `{result['pool']}`"
             f"{where}."]
    if result.get("quick"):
        lines.append("")
        lines.append("**Quick mode**: tiny subsets and budgets that check the harness; these figures say nothing "
                     "about the product.")
    return lines


def baselines_markdown(result: dict) -> str:
    s, summary = result["settings"], result["summary"]
    methods = [m for m in METHODS if m in s["methods"]]
    names = [METHOD_NAMES[m] for m in methods]
    lines = _header(result) + [
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
        lines.append(f"| {n} | {b['queries']} | {_acc(b['oracle_accuracy'])} | {_acc(b['poe_accuracy'])} | "
                     + " | ".join(_acc(b[m]["accuracy"]) for m in methods) + " |")
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
    lines += ["", "Against the targets (issue 3):", ""]
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
        lines.append(f"| {'+'.join(r['tasks'])} | {_acc(r['oracle']['accuracy'])} | {_acc(r['poe']['accuracy'])} | "
                     + " | ".join(f"{_acc(r[m]['accuracy'])} ({_reach(r[m])})" for m in methods)
                     + f" | {_secs(r['poe']['compose_s'])} | {_secs(r['fastest_baseline_s'])} |")
    lines += ["", "</details>"]
    return "\n".join(lines)


# -- cross-expert errors -------------------------------------------------------------------------

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
                     work_dir: Path, progress: Progress = lambda m: None) -> tuple[dict[str, Expert], float]:
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
    t0 = _now(s.device)
    heads = train_experts(pool.library(), tasks, ExpertConfig(first.in_channels, first.width, first.blocks, 1),
                          views, None, Schedule(s.epochs, batch, s.lr, seed=s.seed), out_dir, device=s.device,
                          ckd=ckd, stage=f"experts-{name}")
    seconds = _now(s.device) - t0
    loss = dataclasses.asdict(ckd)
    # The experts are evaluated on the CPU, as the product runs them: their weights come back there.
    return {t: Expert(t, tuple(tasks[t]), ExpertConfig(first.in_channels, first.width, first.blocks, len(tasks[t])),
                      {k: v.cpu() for k, v in heads[t].state_dict().items()}, {}, loss) for t in tasks}, seconds


def run_cross_expert(pool: Pool, train: Dataset, test: Dataset, s: CrossExpertSettings, work_dir: Path,
                     views: TeacherViews | None = None, views_source: str = "",
                     progress: Progress = lambda m: None) -> dict:
    """Cross-expert error share of composed models for the three expert sets.

    The ablation experts train on `s.device`; every expert set is evaluated on the CPU, so that the
    pool's own experts give exactly the composed model's (CPU) predictions."""
    s = dataclasses.replace(s, device=bench_device(s.device))
    queries = select_queries(pool, range(2, s.max_tasks + 1), s.queries, s.seed)
    if not queries:
        raise InvalidArgument("cross-expert errors need queries of at least 2 primitive tasks")
    sets: dict[str, dict] = {}
    for name in VARIANTS:
        if name == "both" and not s.retrain_both:
            sets[name] = {"experts": pool.experts, "source": "pool",
                          "loss": next(iter(pool.experts.values())).loss, "train_s": None}
            continue
        if views is None:
            views, views_source = teacher_views(pool, train, s.views, seed=s.seed, progress=progress,
                                                device=s.device)
        experts, seconds = ablation_experts(pool, views, name, s, train, work_dir, progress)
        sets[name] = {"experts": experts, "source": "trained", "loss": dataclasses.asdict(VARIANTS[name][1]),
                      "train_s": round(seconds, 1)}

    progress(f"evaluating {len(queries)} queries x {len(sets)} expert sets on {len(test)} test images")
    feats = library_features(pool.library(), test.images)
    task_of = torch.empty(len(pool.hierarchy.classes), dtype=torch.long)
    for i, ids in enumerate(pool.hierarchy.tasks.values()):
        task_of[list(ids)] = i
    # One pass of every expert over the test images; a query's composed prediction is the argmax over
    # its experts' concatenated logits (what ReferenceExperts computes; tests check it against compose).
    logits = {name: {t: head_logits(e.module(), feats) for t, e in st["experts"].items()} for name, st in sets.items()}
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
                                  "mean_query_share": _mean([r[name]["cross_expert_share"] for r in rs]),
                                  "accuracy": _mean([r[name]["accuracy"] for r in rs])}
    return {"part": "cross-expert", "pool": pool.ref, "settings": dataclasses.asdict(s),
            "train_images": len(train), "test_images": len(test), "teacher_views": views_source or None,
            "views": len(views) // len(train) if views is not None else None,
            "expert_sets": {name: {k: v for k, v in st.items() if k != "experts"} | {"label": VARIANTS[name][0]}
                            for name, st in sets.items()},
            "queries": len(rows), "summary": {"by_n": by_n}, "rows": rows}


def cross_expert_markdown(result: dict) -> str:
    s, sets = result["settings"], result["expert_sets"]
    names = list(sets)
    trained = [n for n in names if sets[n]["source"] == "trained"]
    lines = _header(result) + [
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
            cells.append("–" if c["share"] is None else f"{100 * c['share']:.1f}% ({_acc(c['accuracy'])})")
        lines.append(f"| {n} | {b['queries']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- inference throughput ------------------------------------------------------------------------

@torch.inference_mode()
def time_calls(model: nn.Module, x: torch.Tensor, warmup: int, repeats: int, min_seconds: float) -> dict:
    """Median wall time of `model(x)` after `warmup` calls, over at least `repeats` calls and
    `min_seconds` of timing."""
    for _ in range(warmup):
        model(x)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max(1, repeats) or (time.perf_counter() - start < min_seconds and len(times) < 100_000):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    times.sort()
    median = statistics.median(times)
    return {"calls": len(times), "median_ms": round(median * 1e3, 4),
            "p90_ms": round(times[min(len(times) - 1, int(0.9 * len(times)))] * 1e3, 4),
            "images_per_s": round(x.shape[0] / median, 1)}


def _ratio_key(n: int, batch: int) -> str:
    return f"n{n}_b{batch}"


def run_inference(pool: Pool, s: InferenceSettings, progress: Progress = lambda m: None) -> dict:
    """Images/s of composed models (fused, reference) and of the oracle at each batch size."""
    queries = [select_queries(pool, (n,), 1, s.seed)[0] for n in sorted(set(s.sizes)) if 1 <= n <= len(pool.experts)]
    if not queries:
        raise InvalidArgument(f"no query sizes in 1..{len(pool.experts)}: {s.sizes}")
    g = torch.Generator().manual_seed(s.seed)
    inputs = {b: torch.rand(b, *pool.input_shape, generator=g) for b in s.batch_sizes}

    def prepare(model: nn.Module) -> nn.Module:
        if s.eager:
            return model.eval()
        with quiet_jit():
            return torch.jit.script(model).eval()

    rows = []
    with _threads(s.threads):
        threads = torch.get_num_threads()
        for tasks in queries:
            p = plan(pool, tasks=list(tasks))
            models = {e: build(pool, p, fused=e == "fused") for e in ("fused", "reference")}
            with torch.inference_mode():
                x = inputs[s.batch_sizes[0]]
                diff = float((models["fused"](x) - models["reference"](x)).abs().max())
            for execution, model in models.items():
                m = prepare(model)
                for b in s.batch_sizes:
                    progress(f"{'+'.join(tasks)} {execution} batch {b}")
                    rows.append({"model": execution, "tasks": list(tasks), "n": len(tasks), "batch": b,
                                 "params": plan_params(pool, p), "max_abs_diff_fused_reference": diff,
                                 **time_calls(m, inputs[b], s.warmup, s.repeats, s.min_seconds)})
        if pool.oracle_state is not None:
            oracle = prepare(pool.oracle())
            for b in s.batch_sizes:
                progress(f"oracle batch {b}")
                rows.append({"model": "oracle", "tasks": None, "n": None, "batch": b,
                             "params": count_params(pool.oracle()),
                             **time_calls(oracle, inputs[b], s.warmup, s.repeats, s.min_seconds)})

    def ips(model: str, n: int | None, b: int) -> float | None:
        return next((r["images_per_s"] for r in rows if r["model"] == model and r["n"] == n and r["batch"] == b), None)

    ratios = {}
    for tasks in queries:
        n = len(tasks)
        for b in s.batch_sizes:
            fused, ref, orc = ips("fused", n, b), ips("reference", n, b), ips("oracle", None, b)
            ratios[_ratio_key(n, b)] = {"fused_over_reference": round(fused / ref, 3),
                                        "fused_over_oracle": round(fused / orc, 3) if orc else None}
    return {"part": "inference", "pool": pool.ref, "settings": dataclasses.asdict(s), "torch_threads": threads,
            "mode": "eager" if s.eager else "torchscript", "rows": rows, "summary": ratios}


def inference_markdown(result: dict) -> str:
    s = result["settings"]
    batches = s["batch_sizes"]
    lines = _header(result) + [
        "",
        f"Images/s on the CPU ({result['mode']}, {result['torch_threads']} torch thread(s)), median of at least "
        f"{s['repeats']} calls after {s['warmup']} warm-up calls; random inputs. Composed models for one query "
        "per number of primitive tasks n; fused/ref: fused execution over reference.",
        "",
        "| model | n | params | " + " | ".join(f"batch {b}" for b in batches) + " | "
        + " | ".join(f"fused/ref (batch {b})" for b in batches) + " |",
        "|---|---|---|" + "---|" * (2 * len(batches)),
    ]
    seen = []
    for r in result["rows"]:
        key = (r["model"], r["n"])
        if key in seen:
            continue
        seen.append(key)
        cells = [next((f"{x['images_per_s']:,.0f}" for x in result["rows"]
                       if (x["model"], x["n"], x["batch"]) == (*key, b)), "–") for b in batches]
        ratio = [f"{result['summary'][_ratio_key(r['n'], b)]['fused_over_reference']:.2f}x"
                 if r["model"] == "fused" else "" for b in batches]
        label = r["model"] if r["model"] == "oracle" else f"{r['model']} ({'+'.join(r['tasks'])})"
        lines.append(f"| {label} | {r['n'] or '–'} | {r['params']:,} | " + " | ".join(cells) + " | "
                     + " | ".join(ratio) + " |")
    n_max = max((r["n"] for r in result["rows"] if r["n"]), default=None)
    if n_max is not None:
        got = [result["summary"][_ratio_key(n_max, b)]["fused_over_reference"] for b in batches]
        verdict = ("not measured" if n_max < 5 else "met" if min(got) >= 1.5 else "missed")
        lines += ["", f"Target: fused >= 1.5x reference for 5 experts. Measured for {n_max} experts: "
                      + ", ".join(f"{g:.2f}x at batch {b}" for g, b in zip(got, batches, strict=True))
                      + f" -> {verdict}."]
    return "\n".join(lines)


# -- docs/BENCHMARKS.md --------------------------------------------------------------------------

SECTION_TITLES = {
    "baselines": "Accuracy, size and time to build against trained baselines",
    "cross-expert": "Cross-expert errors: L_soft, L_scale and both",
    "inference": "Inference throughput on the CPU",
}
DOCS_INTRO = """# Benchmarks

Every figure on this page is written by the benchmark tools, never by hand: each section lies
between `<!-- bench:NAME:start -->` and `<!-- bench:NAME:end -->` markers and is replaced by
`poe bench NAME ... --update-docs`, together with the exact command and the hardware it ran on.
"""


def markers(section: str) -> tuple[str, str]:
    return f"<!-- bench:{section}:start -->", f"<!-- bench:{section}:end -->"


def update_docs(path: str | Path, section: str, body: str) -> Path:
    """Replace the text between the section's markers (appending the section when it is missing)."""
    path = Path(path)
    text = path.read_text() if path.exists() else DOCS_INTRO
    start, end = markers(section)
    i, j = text.find(start), text.find(end)
    if (i < 0) != (j < 0) or (i >= 0 and j < i) or text.count(start) > 1 or text.count(end) > 1:
        raise InvalidArgument(f"{path}: malformed markers for section {section!r} (need one {start} before one {end})")
    if i >= 0:
        text = text[:i + len(start)] + "\n" + body.strip() + "\n" + text[j:]
    else:
        title = SECTION_TITLES.get(section, section)
        text = text.rstrip("\n") + f"\n\n## {title}\n\n{start}\n{body.strip()}\n{end}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def markdown(result: dict) -> str:
    return {"baselines": baselines_markdown, "cross-expert": cross_expert_markdown,
            "inference": inference_markdown}[result["part"]](result)


# -- entry point (the CLI) -----------------------------------------------------------------------

def run(part: str, pool_dir: str | Path, quick: bool = False, dataset: str | None = None,
        run_dir: str | None = None, work_dir: str | None = None, command: str | None = None,
        progress: Progress = lambda m: None, **overrides) -> dict:
    """Run one part on a pool directory; `overrides` replace fields of the part's (quick) settings."""
    s = settings_for(part, quick, **overrides)
    device = "cpu"
    if part != "inference":  # before any work: an unknown or unavailable device is a one-line error
        device = bench_device(s.device)  # type: ignore[union-attr]
        s = dataclasses.replace(s, device=device)
    pool = pool_mod.load(pool_dir)
    seed = overrides.get("seed") or 0
    hw = hardware(device)
    started = time.time()
    if part == "inference":
        result = run_inference(pool, s, progress)  # type: ignore[arg-type]
        hw["torch_threads"] = result["torch_threads"]
    else:
        progress(f"loading {'a small subset of ' if quick else ''}the data set")
        train, test = load_data(pool, dataset, QUICK_DATA if quick else DataSettings(), seed)
        if part == "baselines":
            views = None
            if run_dir and "ckd" in s.methods:  # type: ignore[union-attr]
                views, _ = teacher_views(pool, train, 1, run_dir, seed, progress, device)
            result = run_baselines(pool, train, test, s, views, progress)  # type: ignore[arg-type]
        else:
            views, source = None, ""
            if run_dir:
                views, source = teacher_views(pool, train, s.views, run_dir, seed, progress,  # type: ignore[union-attr]
                                              device)
            work_dir = work_dir or (None if quick else "runs/bench-cross-expert")
            if work_dir:
                result = run_cross_expert(pool, train, test, s, Path(work_dir), views, source,  # type: ignore[arg-type]
                                          progress)
            else:
                with tempfile.TemporaryDirectory(prefix="poe-bench-xe-") as tmp:
                    result = run_cross_expert(pool, train, test, s, Path(tmp), views, source,  # type: ignore[arg-type]
                                              progress)
    result.update({"quick": quick, "hardware": hw, "command": command or f"poe bench {part}",
                   "date": time.strftime("%Y-%m-%d", time.localtime(started)),
                   "seconds": round(time.time() - started, 1)})
    return result
