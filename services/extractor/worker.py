"""The training half of an extraction job, in a worker process (multiprocessing, spawn context).

The worker only computes: it reads the job spec (`spec.JobSpec`, as JSON) and the inputs the extractor placed in the run
directory, trains, writes results into the run directory and reports to the extractor over a pipe
(JSON messages, never pickles). The extractor does every registry call. Run directory::

    oracle.safetensors + oracle.json   a registered oracle, downloaded by the extractor
    oracle.torchscript                 or a TorchScript oracle from the oracle directory, copied when
                                       the job started (loaded only when its sha256 is the spec's)
    base_library.safetensors + .json   incremental jobs: the base pool's library
    teacher_views.safetensors          fixed views of the training set and the oracle's logits
    library.ckpt, student.*            the student (KD), its checkpoint; library.safetensors
    expert-<task>.ckpt                 per-expert checkpoints (CKD)
    experts/<task>.safetensors + .json finished experts
    train.log                          one JSON line per epoch and stage

Every stage is skipped when its result exists and resumes from its last epoch checkpoint, so a
worker that is killed (or an extractor that restarts) loses at most one epoch. Messages:
`phase`, `progress`, `library`, `expert` (one per finished expert, in order), then `trained`, or
`error` with a message.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from poe_services.extractor.spec import JobSpec

WORKER_EVENTS = ("phase", "progress", "library", "expert", "trained", "error")


class Reporter:
    def __init__(self, conn, min_interval: float = 0.2):
        self.conn = conn
        self.min_interval = min_interval
        self._last = 0.0

    def send(self, **msg) -> None:
        self.conn.send_bytes(json.dumps(msg).encode())

    def progress(self, force: bool = False, **msg) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.min_interval:
            self._last = now
            self.send(event="progress", **msg)


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Extraction:
    def __init__(self, spec: JobSpec, run: Path, device: str, report: Reporter):
        self.spec, self.run, self.device, self.report = spec, run, device, report
        self.units_total = 0
        self.units_done = 0

    # -- helpers -------------------------------------------------------------------------------

    def _oracle(self):
        """(module, whether it is weights of a known architecture, which train in bf16)."""
        import hashlib

        from poe.engine.errors import DataLoss
        from poe_services.extractor import oracles
        from poe_services.extractor.files import MAX_TORCHSCRIPT_BYTES, read_regular
        from poe_services.extractor.spec import TorchScriptOracle

        o = self.spec.oracle
        if isinstance(o, TorchScriptOracle):
            data = read_regular(self.run / o.file, "oracle", MAX_TORCHSCRIPT_BYTES)
            if hashlib.sha256(data).hexdigest() != o.sha256:
                raise DataLoss(f"the TorchScript oracle in {self.run} is not the file checked when the job started "
                               "(sha256 differs); not loaded")
            return oracles.load_torchscript(data, o.file, "oracle", self.device), False
        cfg = oracles.oracle_config(o.config, "oracle")
        data = (self.run / "oracle.safetensors").read_bytes()
        return oracles.load_weights(cfg, data, "the registered oracle", "oracle"), True

    def _progress_fn(self, phase: str, base_units: int, expert: int = 0, experts: int = 0, task: str = ""):
        def cb(p: dict) -> None:
            steps = int(p["steps"])
            done = base_units + (int(p["epoch"]) - 1) * steps + int(p["step"])
            self.units_done = done
            self.report.progress(force=int(p["step"]) >= steps, phase=phase, expert=expert, experts=experts,
                                 task=task, epoch=p["epoch"], epochs=p["epochs"], step=p["step"], steps=steps,
                                 loss=float(p["loss"]), units_done=done, units_total=self.units_total)
        return cb

    # -- the job -------------------------------------------------------------------------------

    def run_all(self) -> None:
        from poe.engine import hierarchy as hierarchy_mod
        from poe.engine import pipeline
        from poe.engine.nets import ExpertConfig, Library, WRNConfig, count_params
        from poe.engine.pool import config_to_dict, library_state_from_student, tensors_from_bytes, tensors_to_bytes
        from poe.engine.train import TeacherViews, train_experts
        from poe_services.extractor import oracles
        from poe_services.extractor.plan import load_data, task_seed
        from poe_services.extractor.spec import RegistryOracle

        spec, run = self.spec, self.run
        self.report.send(event="phase", phase="prepare")
        train, test = load_data(spec.dataset, spec.subset, spec.seed)
        hier = hierarchy_mod.from_dict(spec.hierarchy)
        tasks = spec.tasks
        steps = (len(train) * spec.views) // spec.expert_schedule.batch_size
        lib_units = 0
        if spec.library_schedule is not None:
            ls = spec.library_schedule
            lib_units = ls.epochs * ((len(train) * spec.views) // ls.batch_size)
        exp_units = spec.expert_schedule.epochs * steps
        self.units_total = lib_units + exp_units * len(tasks)

        # Teacher views: the oracle's logits on fixed views of the training set (once).
        views_file = run / "teacher_views.safetensors"
        if not views_file.exists():
            self.report.send(event="phase", phase="teacher", units_total=self.units_total)
            oracle, is_wrn = self._oracle()
            views = pipeline.teacher_stage(run, oracle, train, spec.views, self.device, bf16=is_wrn)
            del oracle
        else:
            t = tensors_from_bytes(views_file.read_bytes(), what=str(views_file))
            views = TeacherViews(t["images"], t["logits"])

        # The library: the base pool's, or the front of a student trained by KD.
        if spec.base is not None:
            cfg = oracles.wrn_config(json.loads((run / "base_library.json").read_text())["config"], "base library")
            library = Library(cfg)
            library.load_state_dict(tensors_from_bytes((run / "base_library.safetensors").read_bytes(),
                                                       spec.base.library_sha256, "base library"))
            library.eval()
        else:
            s = spec.student
            c = train.input_shape[0]
            settings = oracles.oracle_config(spec.oracle.config, "oracle").settings \
                if isinstance(spec.oracle, RegistryOracle) else {}
            if "mean" in settings and "std" in settings:  # the oracle's own normalisation
                mean, std = tuple(settings["mean"]), tuple(settings["std"])
            else:
                x = train.images.float().div(255)
                mean = tuple(round(float(v), 4) for v in x.mean(dim=(0, 2, 3)))
                std = tuple(round(max(float(v), 1e-3), 4) for v in x.std(dim=(0, 2, 3)))
            student_cfg = WRNConfig(s.depth, s.width, c, len(train.classes), s.stem_stride, mean=mean, std=std)
            if not (run / "student.safetensors").exists():
                self.report.send(event="phase", phase="library", units_total=self.units_total)
            student = pipeline.library_stage(run, views, test, student_cfg, spec.library_schedule,
                                             self.device, progress=self._progress_fn("library", 0), progress_every=1)
            meta = json.loads((run / "student.json").read_text())
            library = student.library.eval()
            data = tensors_to_bytes(library_state_from_student(student))
            write_atomic(run / "library.safetensors", data)
            metrics = {k: meta[k] for k in ("test_acc",) if meta.get(k) is not None}
            self.report.send(event="library", file="library.safetensors", config=config_to_dict(student_cfg),
                             params=count_params(library), metrics={"student_" + k: v for k, v in metrics.items()},
                             loss={"kind": "kd", "temperature": spec.ckd.temperature})
        self.units_done = lib_units

        # Experts, one at a time (CKD on the frozen library's cached features).
        ecfg = spec.expert
        features = None
        for k, task in enumerate(tasks, 1):
            ids = list(hier.tasks[task])
            out = run / "experts" / f"{task}.safetensors"
            meta_file = out.with_suffix(".json")
            base_units = lib_units + (k - 1) * exp_units
            if not (out.exists() and meta_file.exists()):
                self.report.progress(force=True, phase="experts", expert=k, experts=len(tasks), task=task, epoch=0,
                                     epochs=spec.expert_schedule.epochs, step=0, steps=steps, loss=0.0,
                                     units_done=base_units, units_total=self.units_total)
                if features is None:
                    features = _features(library, views, self.device)
                cfg = ExpertConfig(library.out_channels, ecfg.width, ecfg.blocks, len(ids))
                sched = dataclasses.replace(spec.expert_schedule, seed=task_seed(spec.seed, task))
                head = train_experts(library, {task: ids}, cfg, views, None, sched, run, self.device, spec.ckd,
                                     self._progress_fn("experts", base_units, k, len(tasks), task),
                                     stage=f"expert-{task}", progress_every=1, features=features)[task]
                metrics = _val_metrics(library, head, ids, test, self.device)
                state = {key: v.detach().cpu() for key, v in head.state_dict().items()}
                params = sum(p.numel() for p in head.parameters())
                meta = {"task": task, "class_ids": ids, "config": config_to_dict(cfg), "params": params,
                        "metrics": metrics, "loss": dataclasses.asdict(spec.ckd)}
                write_atomic(out, tensors_to_bytes(state))
                meta_file.write_text(json.dumps(meta, indent=2) + "\n")
            meta = json.loads(meta_file.read_text())
            self.report.send(event="expert", index=k, experts=len(tasks), file=f"experts/{task}.safetensors", **meta)


def _features(library, views, device: str):
    """The frozen library's features of every view, fp16 on the CPU (as poe.engine.train caches them)."""
    import torch

    from poe.engine.data import to_float

    with torch.no_grad():
        return torch.cat([library.to(device)(to_float(views.images[i:i + 1000]).to(device)).to("cpu", torch.float16)
                          for i in range(0, len(views), 1000)])


def _val_metrics(library, head, ids: list[int], test, device: str) -> dict:
    """The expert's accuracy on the test images of its own classes (when the data set has a test split)."""
    import torch

    from poe.engine.data import to_float

    if test is None:
        return {}
    ids_t = torch.tensor(ids)
    mask = torch.isin(test.labels, ids_t)
    if not int(mask.sum()):
        return {}
    x = test.images[mask]
    head = head.eval().to(device)
    with torch.no_grad():
        logits = torch.cat([head(library(to_float(x[i:i + 1000]).to(device))).cpu() for i in range(0, len(x), 1000)])
    acc = float((ids_t[logits.argmax(1)] == test.labels[mask]).float().mean())
    return {"val_acc": round(acc, 4), "val_images": int(mask.sum())}


def main(job_id: str, spec_json: str, run_dir: str, device: str, threads: int, conn) -> None:
    """Entry point of the worker process."""
    # The extractor decides when a worker stops (SIGTERM); a Ctrl-C in the terminal is for it too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["POE_NO_PROGRESS"] = "1"
    report = Reporter(conn)
    code = 0
    try:
        import torch

        torch.set_num_threads(max(1, threads))
        from poe_services.extractor.spec import JobSpec

        spec = JobSpec.from_dict(json.loads(spec_json))
        Extraction(spec, Path(run_dir), device, report).run_all()
        report.send(event="trained")
    except Exception as e:  # everything is reported, then the process ends
        from poe.engine.errors import PoeError

        code = 1
        if isinstance(e, PoeError):
            message = str(e)
        else:
            message = f"{type(e).__name__}: {e}"
            detail = traceback.format_exc()
            print(f"extraction job {job_id}: worker failed\n{detail}", file=sys.stderr, flush=True)
            try:
                (Path(run_dir) / "error.log").write_text(detail)
            except OSError:
                pass
        try:
            report.send(event="error", message=message)
        except OSError:
            pass
    finally:
        try:
            conn.close()
        except OSError:
            pass
    sys.exit(code)
