"""The stages of an extraction job as plain functions, run as Ray tasks by `ray_executor.py`.

Inputs and outputs are tensors, modules, bytes and JSON-able dicts, so they travel through Ray's
object store. The functions that read or write a run directory (on the extractor's machine, which
drives the job) say so in their name (`save_*`, `load_*`, `*_done`) or take it as `run`; `workdir`
is a task's scratch directory for checkpoints and the training log.

1. `prepare`: the data set, the hierarchy and the amount of work.
2. Teacher views: fixed views of the training images (`view_images`) and the oracle's logits for
   them (`teacher_logits`). Logits are computed in batches of TEACHER_BATCH images, so a shard that
   starts on a multiple of it sees exactly the batches, and gives exactly the logits, of one pass.
3. The library: KD of a student (`train_student`) whose front is the library (`save_library`), or
   the base pool's library (`load_base_library`).
4. The library's features of every view (`library_features`, batches of FEATURE_BATCH).
5. One CKD expert per primitive task with its evaluation on the test images of its classes
   (`train_expert`, `evaluate_expert`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from poe.engine import hierarchy as hierarchy_mod
from poe.engine import pipeline
from poe.engine.data import Dataset, to_float
from poe.engine.errors import DataLoss
from poe.engine.hierarchy import Hierarchy
from poe.engine.nets import ExpertConfig, Library, WideResNet, WRNConfig, count_params
from poe.engine.pool import (
    config_to_dict,
    library_state_from_student,
    tensors_from_bytes,
    tensors_to_bytes,
    wrn_config_from_dict,
)
from poe.engine.train import ProgressFn, TeacherViews, predict_logits, teacher_view_images, train_experts
from poe_services.extractor import oracles
from poe_services.extractor.plan import load_data, task_seed
from poe_services.extractor.spec import JobSpec, RegistryOracle, TorchScriptOracle

TEACHER_BATCH = 500  # images per oracle forward pass
FEATURE_BATCH = 1000  # images per library forward pass
VIEWS_FILE = "teacher_views.safetensors"
LIBRARY_FILE = "library.safetensors"
CheckpointFn = Callable[[Path], None]


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- 1. prepare ----------------------------------------------------------------------------------

@dataclass
class Prepared:
    """The job's data and its amount of work, in training steps ("units"; progress counts them)."""

    train: Dataset
    test: Dataset | None
    hierarchy: Hierarchy
    expert_steps: int  # steps per expert epoch
    library_units: int  # 0 with a base pool's library
    expert_units: int  # per expert
    tasks: list[str]

    @property
    def units_total(self) -> int:
        return self.library_units + self.expert_units * len(self.tasks)


def prepare(spec: JobSpec) -> Prepared:
    train, test = load_data(spec.dataset, spec.subset, spec.seed)
    views = len(train) * spec.views
    library_units = 0
    if spec.library_schedule is not None:
        library_units = spec.library_schedule.epochs * (views // spec.library_schedule.batch_size)
    steps = views // spec.expert_schedule.batch_size
    return Prepared(train, test, hierarchy_mod.from_dict(spec.hierarchy), steps, library_units,
                    spec.expert_schedule.epochs * steps, list(spec.tasks))


# -- 2. teacher views ----------------------------------------------------------------------------

def read_oracle(spec: JobSpec, run: Path) -> bytes:
    """The oracle's bytes from the run directory: a registered oracle's safetensors (downloaded by the
    extractor), or the TorchScript copy, only when its sha256 is the one checked when the job started."""
    from poe_services.extractor.files import MAX_TORCHSCRIPT_BYTES, read_regular

    o = spec.oracle
    if isinstance(o, TorchScriptOracle):
        data = read_regular(run / o.file, "oracle", MAX_TORCHSCRIPT_BYTES)
        if hashlib.sha256(data).hexdigest() != o.sha256:
            raise DataLoss(f"the TorchScript oracle in {run} is not the file checked when the job started "
                           "(sha256 differs); not loaded")
        return data
    return (run / "oracle.safetensors").read_bytes()


def load_oracle(spec: JobSpec, data: bytes, device: str) -> tuple[nn.Module, bool]:
    """(the oracle module, whether it runs in bf16): weights of a known architecture do; a TorchScript
    oracle runs as it was written."""
    o = spec.oracle
    if isinstance(o, TorchScriptOracle):
        return oracles.load_torchscript(data, o.file, "oracle", device), False
    cfg = oracles.oracle_config(o.config, "oracle")
    return oracles.load_weights(cfg, data, "the registered oracle", "oracle"), True


def view_images(train: Dataset, views: int) -> torch.Tensor:
    """uint8 [views * N, C, H, W]: the images every later stage trains on."""
    return teacher_view_images(train, views)


def teacher_logits(oracle: nn.Module, images: torch.Tensor, device: str, bf16: bool) -> torch.Tensor:
    """The oracle's float32 logits for `images` (a whole set or a shard of it)."""
    return predict_logits(oracle, images, device, batch_size=TEACHER_BATCH, bf16=bf16 and device == "cpu")


def shards(count: int, parts: int, align: int) -> list[tuple[int, int]]:
    """`count` items cut into at most `parts` contiguous (start, stop) ranges, every start a multiple of
    `align` (so each shard sees the batches one pass over everything would)."""
    blocks = -(-count // align)
    parts = max(1, min(parts, blocks))
    bounds = [min(count, (blocks * i // parts) * align) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def save_views(run: Path, views: TeacherViews) -> None:
    from safetensors.torch import save_file

    tmp = run / "teacher_views.tmp"
    save_file({"images": views.images.contiguous(), "logits": views.logits.contiguous()}, str(tmp))
    os.replace(tmp, run / VIEWS_FILE)


def load_views(run: Path) -> TeacherViews | None:
    path = run / VIEWS_FILE
    if not path.exists():
        return None
    t = tensors_from_bytes(path.read_bytes(), what=str(path))
    return TeacherViews(t["images"], t["logits"])


# -- 3. the library ------------------------------------------------------------------------------

def student_config(spec: JobSpec, train: Dataset) -> WRNConfig:
    """The student's shape from the spec; its input normalisation is the oracle's own, else the data's."""
    s = spec.student
    settings = oracles.oracle_config(spec.oracle.config, "oracle").settings \
        if isinstance(spec.oracle, RegistryOracle) else {}
    if "mean" in settings and "std" in settings:
        mean, std = tuple(settings["mean"]), tuple(settings["std"])
    else:
        x = train.images.float().div(255)
        mean = tuple(round(float(v), 4) for v in x.mean(dim=(0, 2, 3)))
        std = tuple(round(max(float(v), 1e-3), 4) for v in x.std(dim=(0, 2, 3)))
    return WRNConfig(s.depth, s.width, train.input_shape[0], len(train.classes), s.stem_stride, mean=mean, std=std)


def student_done(run: Path) -> bool:
    return (run / "student.safetensors").exists() and (run / "student.json").exists()


def train_student(workdir: Path, views: TeacherViews, test: Dataset | None, cfg: WRNConfig, spec: JobSpec,
                  device: str, progress: ProgressFn | None = None,
                  on_checkpoint: CheckpointFn | None = None) -> WideResNet:
    """KD of the whole student from the teacher views; resumes from workdir/library.ckpt and leaves
    workdir/student.safetensors + student.json (skipped when they exist)."""
    return pipeline.library_stage(workdir, views, test, cfg, spec.library_schedule, device, progress=progress,
                                  progress_every=1, on_checkpoint=on_checkpoint)


def student_files(workdir: Path) -> tuple[bytes, dict]:
    """(student.safetensors bytes, student.json) of a trained student, as they travel to the run."""
    return (workdir / "student.safetensors").read_bytes(), json.loads((workdir / "student.json").read_text())


def save_student(run: Path, data: bytes, meta: dict) -> None:
    write_atomic(run / "student.safetensors", data)
    write_atomic(run / "student.json", (json.dumps(meta, indent=2) + "\n").encode())


def load_student(run: Path) -> WideResNet:
    meta = json.loads((run / "student.json").read_text())
    model = WideResNet(wrn_config_from_dict(meta["config"]))
    model.load_state_dict(tensors_from_bytes((run / "student.safetensors").read_bytes(), what="student"))
    return model.eval()


def save_library(run: Path, student: WideResNet, spec: JobSpec) -> tuple[Library, dict]:
    """Write the student's front as run/library.safetensors; returns the library (eval mode) and the
    worker's `library` report (config, parameters, the student's test accuracy, the KD loss)."""
    meta = json.loads((run / "student.json").read_text())
    library = student.library.eval()
    write_atomic(run / LIBRARY_FILE, tensors_to_bytes(library_state_from_student(student)))
    metrics = {k: meta[k] for k in ("test_acc",) if meta.get(k) is not None}
    return library, {"file": LIBRARY_FILE, "config": config_to_dict(student.cfg), "params": count_params(library),
                     "metrics": {"student_" + k: v for k, v in metrics.items()},
                     "loss": {"kind": "kd", "temperature": spec.ckd.temperature}}


def library_from_bytes(cfg: WRNConfig, data: bytes, expected_sha256: str | None = None,
                       what: str = "library") -> Library:
    library = Library(cfg)
    library.load_state_dict(tensors_from_bytes(data, expected_sha256, what))
    return library.eval()


def load_base_library(spec: JobSpec, run: Path) -> Library:
    """The base pool's library, downloaded into the run directory by the extractor (sha256 checked)."""
    cfg = oracles.wrn_config(json.loads((run / "base_library.json").read_text())["config"], "base library")
    return library_from_bytes(cfg, (run / "base_library.safetensors").read_bytes(), spec.base.library_sha256,
                              "base library")


# -- 4. library features -------------------------------------------------------------------------

def library_features(library: Library, images: torch.Tensor, device: str) -> torch.Tensor:
    """The frozen library's features of `images`, fp16 on the CPU (as poe.engine.train caches them)."""
    library = library.to(device).eval()
    with torch.no_grad():
        parts = [library(to_float(images[i:i + FEATURE_BATCH]).to(device)).to("cpu", torch.float16)
                 for i in range(0, images.shape[0], FEATURE_BATCH)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float16)


# -- 5. experts ----------------------------------------------------------------------------------

def expert_path(run: Path, task: str) -> Path:
    return run / "experts" / f"{task}.safetensors"


def expert_done(run: Path, task: str) -> bool:
    out = expert_path(run, task)
    return out.exists() and out.with_suffix(".json").exists()


def train_expert(workdir: Path, library: Library, spec: JobSpec, task: str, class_ids: list[int],
                 views: TeacherViews, features: torch.Tensor, test: Dataset | None, device: str,
                 progress: ProgressFn | None = None, on_checkpoint: CheckpointFn | None = None) -> tuple[bytes, dict]:
    """CKD of the expert of `task` on the library's cached `features`; resumes from
    workdir/expert-<task>.ckpt. Returns its safetensors bytes and its metadata (task, classes, config,
    parameters, test metrics, loss)."""
    cfg = ExpertConfig(library.out_channels, spec.expert.width, spec.expert.blocks, len(class_ids))
    schedule = dataclasses.replace(spec.expert_schedule, seed=task_seed(spec.seed, task))
    head = train_experts(library, {task: class_ids}, cfg, views, None, schedule, workdir, device, spec.ckd,
                         progress, stage=f"expert-{task}", progress_every=1, features=features,
                         on_checkpoint=on_checkpoint)[task]
    state = {key: v.detach().cpu() for key, v in head.state_dict().items()}
    meta = {"task": task, "class_ids": class_ids, "config": config_to_dict(cfg),
            "params": sum(p.numel() for p in head.parameters()),
            "metrics": evaluate_expert(library, head, class_ids, test, device), "loss": dataclasses.asdict(spec.ckd)}
    return tensors_to_bytes(state), meta


def evaluate_expert(library: Library, head: nn.Module, class_ids: list[int], test: Dataset | None,
                    device: str) -> dict:
    """The expert's accuracy on the test images of its own classes (when the data set has a test split)."""
    if test is None:
        return {}
    ids = torch.tensor(class_ids)
    mask = torch.isin(test.labels, ids)
    if not int(mask.sum()):
        return {}
    x = test.images[mask]
    head = head.eval().to(device)
    library = library.to(device).eval()
    with torch.no_grad():
        logits = torch.cat([head(library(to_float(x[i:i + FEATURE_BATCH]).to(device))).cpu()
                            for i in range(0, len(x), FEATURE_BATCH)])
    acc = float((ids[logits.argmax(1)] == test.labels[mask]).float().mean())
    return {"val_acc": round(acc, 4), "val_images": int(mask.sum())}


def save_expert(run: Path, task: str, data: bytes, meta: dict) -> None:
    out = expert_path(run, task)
    write_atomic(out, data)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")


def expert_report(run: Path, task: str, index: int, count: int) -> dict:
    """The worker's `expert` report of a finished expert (index is 1-based)."""
    meta = json.loads(expert_path(run, task).with_suffix(".json").read_text())
    return {"index": index, "experts": count, "file": f"experts/{task}.safetensors", **meta}
