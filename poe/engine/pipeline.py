"""The offline pipeline in a run directory: oracle -> teacher views -> library -> experts -> pool.

Every stage writes its result to the run directory and is skipped when that result exists, and
every stage resumes from its per-epoch checkpoint, so `poe train all` can be stopped and started
again at any point. Files in a run directory::

    train.log                    one JSON line per epoch and stage
    oracle.ckpt / oracle.safetensors + oracle.json
    teacher_views.safetensors    fixed augmented views of the training set and the oracle's logits
    library.ckpt / student.safetensors + student.json
    experts.ckpt / experts.safetensors + experts.json
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from poe.engine import hierarchy as hierarchy_mod
from poe.engine.data import Dataset
from poe.engine.errors import FailedPrecondition, InvalidArgument
from poe.engine.hierarchy import Hierarchy
from poe.engine.nets import ExpertConfig, WideResNet, WRNConfig, count_params
from poe.engine.pool import Expert, Pool, config_to_dict, library_state_from_student, wrn_config_from_dict
from poe.engine.train import (
    CKDSettings,
    ProgressFn,
    Schedule,
    TeacherViews,
    accuracy,
    make_teacher_views,
    predict_logits,
    train_experts,
    train_library,
    train_oracle,
)


def _save_module(run: Path, stem: str, state: dict, meta: dict) -> None:
    tmp = run / f"{stem}.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, run / f"{stem}.safetensors")
    (run / f"{stem}.json").write_text(json.dumps(meta, indent=2) + "\n")


def _done(run: Path, stem: str) -> bool:
    return (run / f"{stem}.safetensors").exists() and (run / f"{stem}.json").exists()


def _load_meta(run: Path, stem: str) -> tuple[dict, dict]:
    if not _done(run, stem):
        raise FailedPrecondition(f"{run}: stage '{stem}' has not finished; run `poe train {stem}` first")
    return load_file(str(run / f"{stem}.safetensors")), json.loads((run / f"{stem}.json").read_text())


@dataclass
class OracleSpec:
    depth: int = 16
    width: int = 4
    stem_stride: int = 1
    schedule: Schedule = field(default_factory=lambda: Schedule(epochs=15, batch_size=128, lr=0.1))


def oracle_stage(run: Path, train: Dataset, test: Dataset | None, spec: OracleSpec, device: str = "cpu",
                 progress: ProgressFn | None = None) -> WideResNet:
    if _done(run, "oracle"):
        state, meta = _load_meta(run, "oracle")
        m = WideResNet(wrn_config_from_dict(meta["config"]))
        m.load_state_dict(state)
        return m.eval()
    c, h, w = train.input_shape
    mean = tuple(round(float(v), 4) for v in train.images.float().div(255).mean(dim=(0, 2, 3)))
    std = tuple(round(float(v), 4) for v in train.images.float().div(255).std(dim=(0, 2, 3)))
    cfg = WRNConfig(spec.depth, spec.width, c, len(train.classes), spec.stem_stride, mean=mean, std=std)
    model = train_oracle(cfg, train, test, spec.schedule, run, device, progress=progress)
    meta = {"config": config_to_dict(cfg), "params": count_params(model), "dataset": train.name,
            "classes": list(train.classes), "input_shape": [c, h, w], "schedule": spec.schedule.__dict__}
    if test is not None:
        meta["test_acc"] = accuracy(predict_logits(model, test.images, device), test.labels)
    _save_module(run, "oracle", {k: v.float() for k, v in model.state_dict().items()}, meta)
    return model


def teacher_stage(run: Path, oracle: WideResNet, train: Dataset, views: int = 4, device: str = "cpu",
                  bf16: bool = True) -> TeacherViews:
    path = run / "teacher_views.safetensors"
    if path.exists():
        t = load_file(str(path))
        return TeacherViews(t["images"], t["logits"])
    tv = make_teacher_views(oracle, train, views, device=device, bf16=bf16 and device == "cpu")
    tmp = path.with_suffix(".tmp")
    save_file({"images": tv.images, "logits": tv.logits}, str(tmp))
    os.replace(tmp, path)
    return tv


def library_stage(run: Path, views: TeacherViews, test: Dataset | None, student_cfg: WRNConfig,
                  schedule: Schedule, device: str = "cpu", progress: ProgressFn | None = None,
                  progress_every: int = 20, on_checkpoint: Callable[[Path], None] | None = None,
                  shard: tuple[int, int] | None = None) -> WideResNet:
    """The KD student: read from `run`, or trained and written there. `shard=(rank, world)`: one rank
    of a data-parallel run (see `train_library`); only rank 0 writes the student's files."""
    if _done(run, "student"):
        state, meta = _load_meta(run, "student")
        m = WideResNet(wrn_config_from_dict(meta["config"]))
        m.load_state_dict(state)
        return m.eval()
    student = train_library(student_cfg, views, test, schedule, run, device, progress=progress,
                            progress_every=progress_every, on_checkpoint=on_checkpoint, shard=shard)
    if shard is not None and shard[0] != 0:
        return student
    meta = {"config": config_to_dict(student_cfg), "params": count_params(student),
            "library_params": count_params(student.library), "schedule": schedule.__dict__}
    if test is not None:
        meta["test_acc"] = accuracy(predict_logits(student, test.images, device), test.labels)
    _save_module(run, "student", student.state_dict(), meta)
    return student


def experts_stage(run: Path, student: WideResNet, views: TeacherViews, test: Dataset | None,
                  hier: Hierarchy, expert_width: int, schedule: Schedule, device: str = "cpu",
                  ckd: CKDSettings = CKDSettings(), progress: ProgressFn | None = None,
                  stem: str = "experts") -> dict[str, Expert]:
    cfg_base = ExpertConfig(student.library.out_channels, expert_width, student.cfg.blocks_per_group, 1)
    if not _done(run, stem):
        tasks = {t: list(ids) for t, ids in hier.tasks.items()}
        t0 = time.time()
        heads = train_experts(student.library, tasks, cfg_base, views, test, schedule, run, device, ckd,
                              progress, stage=stem)
        state = {f"{t}/{k}": v for t, h in heads.items() for k, v in h.state_dict().items()}
        metrics = {}
        if test is not None:
            metrics = _expert_accuracy(student, heads, tasks, test, device)
        meta = {"tasks": tasks, "width": expert_width, "blocks": cfg_base.blocks, "in_channels": cfg_base.in_channels,
                "loss": ckd.__dict__, "schedule": schedule.__dict__, "metrics": metrics,
                "seconds": round(time.time() - t0, 1)}
        _save_module(run, stem, state, meta)
    state, meta = _load_meta(run, stem)
    experts = {}
    for t, ids in meta["tasks"].items():
        sub = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(t + "/")}
        cfg = ExpertConfig(meta["in_channels"], meta["width"], meta["blocks"], len(ids))
        experts[t] = Expert(t, tuple(ids), cfg, sub, meta["metrics"].get(t, {}), meta["loss"])
    return experts


@torch.no_grad()
def _expert_accuracy(student, heads, tasks, test: Dataset, device) -> dict:
    """Each expert's accuracy on the test images of its own classes (its 'validation accuracy')."""
    lib = student.library.eval().to(device)
    from poe.engine.data import to_float

    out = {}
    for t, head in heads.items():
        ids = torch.tensor(tasks[t])
        mask = torch.isin(test.labels, ids)
        x = to_float(test.images[mask]).to(device)
        logits = torch.cat([head(lib(x[i:i + 1000])).cpu() for i in range(0, x.shape[0], 1000)])
        pred = ids[logits.argmax(1)]
        out[t] = {"val_acc": round(float((pred == test.labels[mask]).float().mean()), 4), "val_images": int(mask.sum())}
    return out


def assemble_pool(run: Path, name: str, version: str, hier: Hierarchy, experts: dict[str, Expert],
                  student: WideResNet, oracle: WideResNet | None, info: dict) -> Pool:
    missing = [t for t in hier.tasks if t not in experts]
    if missing:
        raise InvalidArgument(f"no experts trained for: {', '.join(missing)}")
    return Pool(name, version, hier, student.cfg, library_state_from_student(student), experts,
                oracle.cfg if oracle is not None else None,
                {k: v.float() for k, v in oracle.state_dict().items()} if oracle is not None else None, info)


def load_hierarchy(ref: str) -> Hierarchy:
    """A built-in hierarchy name or a path to a YAML/JSON file."""
    if Path(ref).suffix in (".yaml", ".yml", ".json") or os.sep in ref:
        return hierarchy_mod.load(ref)
    return hierarchy_mod.builtin(ref)
