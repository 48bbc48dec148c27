"""Training for the offline half of PoE: oracle, library (KD) and experts (CKD).

All three stages share `fit`: seeded, resumable from a checkpoint after every epoch, with a
progress bar and one JSON log line per epoch. The data order of epoch e depends only on
(seed, e), so a run resumed from a checkpoint sees exactly the batches it would have seen.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from poe.engine.data import Dataset, augment, to_float
from poe.engine.losses import ckd_loss, kd_loss
from poe.engine.nets import ExpertConfig, Head, Library, WideResNet, WRNConfig, make_expert


@dataclass
class Schedule:
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    seed: int = 0

    def lr_at(self, step: int, steps_per_epoch: int) -> float:
        """Linear warm-up, then cosine decay to zero."""
        warm = int(self.warmup_epochs * steps_per_epoch)
        total = self.epochs * steps_per_epoch
        if step < warm:
            return self.lr * (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return self.lr * 0.5 * (1 + math.cos(math.pi * progress))


ProgressFn = Callable[[dict], None]


def _log_line(log: Path | None, record: dict) -> None:
    line = json.dumps(record, sort_keys=True)
    print(line, file=sys.stderr, flush=True)
    if log is not None:
        with open(log, "a") as f:
            f.write(line + "\n")


def fit(
    stage: str,
    modules: dict[str, nn.Module],
    train_step: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    num_examples: int,
    schedule: Schedule,
    checkpoint: Path | None = None,
    evaluate: Callable[[], dict] | None = None,
    log: Path | None = None,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress_every: int = 20,
    on_checkpoint: Callable[[Path], None] | None = None,
    shard: tuple[int, int] | None = None,
) -> None:
    """Train `modules` with SGD for `schedule.epochs` epochs.

    `train_step(indices, generator)` computes the loss of one batch of example indices.
    Resumes from `checkpoint` when it exists; writes it atomically after every epoch, then calls
    `on_checkpoint(checkpoint)` (a remote worker sends it to the machine that keeps its run).
    `progress` is called every `progress_every` steps (and for the first step of each epoch).

    `shard=(rank, world)`: one of `world` data-parallel processes (torch.distributed initialised,
    the gradients averaged by the caller's DistributedDataParallel). Every rank draws the same
    order and takes its slice of each global batch, so a global batch holds the examples of the
    single-process run. Every rank resumes from `checkpoint`; only rank 0 logs, reports progress
    and writes checkpoints.
    """
    from tqdm import tqdm

    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=schedule.lr, momentum=schedule.momentum,
                          weight_decay=schedule.weight_decay, nesterov=True)
    steps_per_epoch = num_examples // schedule.batch_size
    rank, world = shard or (0, 1)
    lead = rank == 0
    start_epoch = 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        for name, m in modules.items():
            m.load_state_dict(state["modules"][name])
        opt.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
        if lead:
            _log_line(log, {"stage": stage, "event": "resumed", "epoch": start_epoch})
    for epoch in range(start_epoch, schedule.epochs):
        for m in modules.values():
            m.train()
        g = torch.Generator().manual_seed(schedule.seed * 100_003 + epoch)
        order = torch.randperm(num_examples, generator=g)
        t0, total, count = time.time(), 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"{stage} {epoch + 1}/{schedule.epochs}",
                   file=sys.stderr, mininterval=2.0, leave=False,
                   disable=os.environ.get("POE_NO_PROGRESS") == "1" or not lead)
        for i in bar:
            step = epoch * steps_per_epoch + i
            for group in opt.param_groups:
                group["lr"] = schedule.lr_at(step, steps_per_epoch)
            idx = order[i * schedule.batch_size:(i + 1) * schedule.batch_size]
            if shard is None:
                loss = train_step(idx, g)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            else:
                local = torch.tensor_split(idx, world)[rank]
                loss = train_step(local, g)
                opt.zero_grad(set_to_none=True)
                # DDP averages the ranks' gradients; weighting by the slice's size makes that the
                # gradient of the global batch's mean loss when the slices differ in size.
                weight = len(local) * world / len(idx)
                (loss if weight == 1.0 else loss * weight).backward()
            opt.step()
            total += float(loss.detach())
            count += 1
            if i % 20 == 0:
                bar.set_postfix(loss=f"{total / count:.4f}")
            if i % max(1, progress_every) == 0:
                if progress and lead:
                    progress({"stage": stage, "epoch": epoch + 1, "epochs": schedule.epochs,
                              "step": i + 1, "steps": steps_per_epoch, "loss": total / count})
            if should_stop and should_stop():
                return
        bar.close()
        if shard is not None and world > 1:
            total, count = _sum_over_ranks(total, count, params[0].device)
        if not lead:
            continue
        record = {"stage": stage, "epoch": epoch + 1, "epochs": schedule.epochs,
                  "loss": round(total / max(1, count), 5), "seconds": round(time.time() - t0, 1)}
        if evaluate is not None:
            record.update(evaluate())
        _log_line(log, record)
        if checkpoint is not None:
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"modules": {n: m.state_dict() for n, m in modules.items()},
                        "optimizer": opt.state_dict(), "epoch": epoch + 1}, tmp)
            os.replace(tmp, checkpoint)
            if on_checkpoint is not None:
                on_checkpoint(checkpoint)


def _sum_over_ranks(total: float, count: int, device: torch.device) -> tuple[float, int]:
    """The epoch's loss sum and step count over every data-parallel rank (for its log line)."""
    import torch.distributed as dist

    t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t[0]), int(t[1])


@functools.cache
def bf16_is_native(device_type: str) -> bool:
    """Whether `device_type` computes bf16 natively: a CUDA GPU with bf16, a CPU with AVX512-BF16 or
    AMX. Elsewhere bf16 is emulated (25 times slower than fp32 on an AVX2-only CPU), so autocast stays off."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def _autocast(device: str, enabled: bool):
    """bf16 autocast where the device computes bf16 natively (`bf16_is_native`), else fp32."""
    device_type = device.split(":")[0]
    if not enabled or not bf16_is_native(device_type):
        return nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


def _batch(images: torch.Tensor, idx: torch.Tensor, device: str, channels_last: bool = False) -> torch.Tensor:
    x = to_float(images[idx]).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, device: str = "cpu", batch_size: int = 500,
                   bf16: bool = False) -> torch.Tensor:
    """Logits of `model` (in eval mode) for uint8 `images`, float32 on the CPU."""
    model.eval().to(device)
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = to_float(images[i:i + batch_size]).to(device)
        with _autocast(device, bf16):
            out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean()) if labels.numel() else float("nan")


def train_oracle(
    cfg: WRNConfig, train: Dataset, test: Dataset | None, schedule: Schedule, out_dir: Path,
    device: str = "cpu", bf16: bool = True, progress: ProgressFn | None = None,
) -> WideResNet:
    """Cross-entropy with translation + flip augmentation; bf16 autocast (AMX on recent CPUs)."""
    torch.manual_seed(schedule.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = WideResNet(cfg).to(device)
    channels_last = device == "cpu"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    def step(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        x = augment(to_float(train.images[idx]), g).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, bf16):
            logits = model(x)
        return nn.functional.cross_entropy(logits.float(), train.labels[idx].to(device))

    def evaluate() -> dict:
        if test is None:
            return {}
        acc = accuracy(predict_logits(model, test.images, device, bf16=bf16), test.labels)
        return {"test_acc": round(acc, 4)}

    fit("oracle", {"oracle": model}, step, len(train), schedule, out_dir / "oracle.ckpt",
        evaluate, out_dir / "train.log", progress)
    return model.eval()


@dataclass
class TeacherViews:
    """Fixed augmented copies of the training images with the oracle's logits for each.

    Distillation needs the teacher's logits on exactly the images the student sees; computing
    them once for a few fixed views (identity, flip, random translations) replaces a teacher
    forward pass per step, which on CPU is most of the cost of KD.
    """

    images: torch.Tensor  # uint8 [V * N, C, H, W]
    logits: torch.Tensor  # float32 [V * N, num_classes]

    def __len__(self) -> int:
        return self.images.shape[0]


def teacher_view_images(train: Dataset, views: int = 4, seed: int = 0) -> torch.Tensor:
    """The fixed views of the training images: identity, flip, then seeded random translations and flips."""
    g = torch.Generator().manual_seed(seed)
    imgs = [train.images, train.images.flip(-1)]
    for _ in range(max(0, views - 2)):
        x = augment(to_float(train.images), g)
        imgs.append((x * 255).round().to(torch.uint8))
    return torch.cat(imgs[:views])


def make_teacher_views(oracle: nn.Module, train: Dataset, views: int = 4, seed: int = 0,
                       device: str = "cpu", bf16: bool = False) -> TeacherViews:
    images = teacher_view_images(train, views, seed)
    return TeacherViews(images, predict_logits(oracle, images, device, bf16=bf16))


def train_library(
    student_cfg: WRNConfig, views: TeacherViews, test: Dataset | None, schedule: Schedule,
    out_dir: Path, device: str = "cpu", temperature: float = 4.0, progress: ProgressFn | None = None,
    bf16: bool = True, progress_every: int = 20, on_checkpoint: Callable[[Path], None] | None = None,
    shard: tuple[int, int] | None = None,
) -> WideResNet:
    """Plain KD of a whole student; its front (stem + two groups) becomes the library.

    bf16 autocast (on by default) only speeds up the convolutions during training; the library is
    stored and run in fp32, and the experts are trained on its fp32 features.

    `shard=(rank, world)`: this process is one rank of a data-parallel run (torch.distributed
    initialised): the student is wrapped in DistributedDataParallel (BatchNorm per rank) and `fit`
    trains on the rank's slice of every batch; only rank 0 evaluates, logs and checkpoints."""
    torch.manual_seed(schedule.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    student = WideResNet(student_cfg).to(device)
    net: nn.Module = student
    lead = shard is None or shard[0] == 0
    if shard is not None and shard[1] > 1:
        # Only rank 0's BatchNorm running statistics are saved and evaluated: no buffer broadcasts.
        net = nn.parallel.DistributedDataParallel(student, broadcast_buffers=False)

    def step(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        x = _batch(views.images, idx, device)
        with _autocast(device, bf16):
            logits = net(x)
        return kd_loss(logits.float(), views.logits[idx].to(device), temperature)

    def evaluate() -> dict:
        if test is None:
            return {}
        return {"test_acc": round(accuracy(predict_logits(student, test.images, device), test.labels), 4)}

    fit("library", {"student": student}, step, len(views), schedule, out_dir / "library.ckpt",
        evaluate if lead else None, out_dir / "train.log" if lead else None, progress if lead else None,
        progress_every=progress_every, on_checkpoint=on_checkpoint if lead else None, shard=shard)
    return student.eval()


@dataclass(frozen=True)
class CKDSettings:
    temperature: float = 4.0
    soft_weight: float = 1.0
    scale_weight: float = 0.3


def train_experts(
    library: Library, tasks: dict[str, list[int]], expert_cfg: ExpertConfig, views: TeacherViews,
    test: Dataset | None, schedule: Schedule, out_dir: Path, device: str = "cpu",
    ckd: CKDSettings = CKDSettings(), progress: ProgressFn | None = None, stage: str = "experts",
    should_stop: Callable[[], bool] | None = None, cache_features: bool = True,
    progress_every: int = 20, features: torch.Tensor | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
) -> dict[str, Head]:
    """CKD of one expert per task on the whole training set; the library stays frozen in eval mode.

    Experts share nothing but the frozen library's features, so training several in one loop
    (one library pass per batch, the sum of their losses) gives each exactly the gradients it
    would get alone. `features`: the library's features of every view, computed beforehand (as
    the cache below would compute them), for callers that train experts one call at a time.
    """
    torch.manual_seed(schedule.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    library = library.to(device).eval()
    for p in library.parameters():
        p.requires_grad_(False)
    experts = {name: make_expert(ExpertConfig(expert_cfg.in_channels, expert_cfg.width,
                                              expert_cfg.blocks, len(cls))).to(device)
               for name, cls in tasks.items()}
    task_ids = {name: torch.tensor(cls, device=device) for name, cls in tasks.items()}

    # The library is frozen, so its features for the fixed views are computed once (fp32, stored
    # as fp16 to halve the memory: 3 GB for 4 views of Fashion-MNIST) instead of once per epoch.
    cached = features
    if cached is None and cache_features:
        with torch.no_grad():
            cached = torch.cat([library(_batch(views.images, torch.arange(i, min(i + 1000, len(views))), device))
                                .to("cpu", torch.float16) for i in range(0, len(views), 1000)])

    def step(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if cached is not None:
            feats = cached[idx].to(device, torch.float32)
        else:
            with torch.no_grad():
                feats = library(_batch(views.images, idx, device))
        teacher = views.logits[idx].to(device)
        return sum(ckd_loss(e(feats), teacher, task_ids[n], ckd.temperature, ckd.scale_weight, ckd.soft_weight)
                   for n, e in experts.items())

    def evaluate() -> dict:
        if test is None:
            return {}
        with torch.no_grad():
            feats = [library(to_float(test.images[i:i + 1000]).to(device)) for i in range(0, len(test), 1000)]
        res = {}
        for n, e in experts.items():
            e.eval()
            with torch.no_grad():
                logits = torch.cat([e(f).cpu() for f in feats])
            mask = torch.isin(test.labels, task_ids[n].cpu())
            pred = torch.tensor(tasks[n])[logits[mask].argmax(1)]
            res[f"acc_{n}"] = round(float((pred == test.labels[mask]).float().mean()), 4)
        return res

    fit(stage, {f"expert/{n}": e for n, e in experts.items()}, step, len(views), schedule,
        out_dir / f"{stage}.ckpt", evaluate, out_dir / "train.log", progress, should_stop,
        progress_every=progress_every, on_checkpoint=on_checkpoint)
    return {n: e.eval() for n, e in experts.items()}
