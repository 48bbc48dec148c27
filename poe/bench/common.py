"""What the training benchmarks (baselines, cross-expert) and inference share: devices and clocks,
settings presets, the data, query selection, teacher views and the frozen library's features."""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file
from torch import nn

from poe.engine.config import resolve_device
from poe.engine.data import Dataset, load_dataset, to_float
from poe.engine.errors import InvalidArgument
from poe.engine.nets import Library
from poe.engine.pool import Pool
from poe.engine.train import TeacherViews, make_teacher_views

Progress = Callable[[str], None]
SettingsT = TypeVar("SettingsT")


def quiet(message: str) -> None:
    """The default progress callback: says nothing."""


# -- devices and clocks --------------------------------------------------------------------------

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


def is_cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


def now(device: str = "cpu") -> float:
    """perf_counter, after waiting for the work queued on a CUDA device (its kernels run asynchronously)."""
    if is_cuda(device):
        torch.cuda.synchronize(device)
    return time.perf_counter()


# -- settings and data ---------------------------------------------------------------------------

def with_overrides(preset: SettingsT, overrides: dict) -> SettingsT:
    """A settings preset with every override that is not None applied (validated again by the
    settings' own checks; an unknown field is a TypeError)."""
    return dataclasses.replace(preset, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class DataSettings:
    train_per_class: int = 0  # 0: the whole split
    test_per_class: int = 0


QUICK_DATA = DataSettings(train_per_class=40, test_per_class=20)


def load_data(pool: Pool, dataset: str | None, quick: bool, seed: int = 0,
              progress: Progress = quiet) -> tuple[Dataset, Dataset]:
    """The pool's data set (or `dataset`), training and test split; tiny stratified subsets when quick."""
    progress(f"loading {'a small subset of ' if quick else ''}the data set")
    data = QUICK_DATA if quick else DataSettings()
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


def select_queries(pool: Pool, sizes: range | tuple[int, ...], count: int = 0, seed: int = 0) -> list[tuple[str, ...]]:
    """Queries (tuples of primitive tasks, hierarchy order) with a number of tasks in `sizes`.

    count 0 (or at least the number of candidates): all of them. Otherwise a seeded sample spread
    evenly over the sizes (round robin over the sizes, a seeded shuffle within each).
    """
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


# -- the oracle's logits and the frozen library's features ---------------------------------------

def teacher_views(pool: Pool, train: Dataset, views: int, run_dir: str | Path | None = None, seed: int = 0,
                  progress: Progress = quiet, device: str = "cpu") -> tuple[TeacherViews, str]:
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


# -- summaries -----------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values`, nearest rank."""
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def latency_summary(seconds: list[float]) -> dict:
    """n, p50, p99 and mean in milliseconds of latencies in seconds."""
    ms = [s * 1e3 for s in seconds]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 0.5), 3), "p99_ms": round(percentile(ms, 0.99), 3),
            "mean_ms": round(statistics.fmean(ms), 3)}


def mean(values: list[float | None]) -> float | None:
    """The mean of the values that are not None, rounded; None when there are none."""
    present = [v for v in values if v is not None]
    return round(statistics.fmean(present), 6) if present else None


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 6) if present else None
