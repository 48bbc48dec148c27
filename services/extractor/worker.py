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
    from poe_services.extractor.stages import write_atomic as write

    write(path, data)


class Extraction:
    """One job's stages (`stages.py`) one after another in this process, reporting over the pipe."""

    def __init__(self, spec: JobSpec, run: Path, device: str, report: Reporter):
        self.spec, self.run, self.device, self.report = spec, run, device, report
        self.units_total = 0
        self.units_done = 0

    def _progress_fn(self, phase: str, base_units: int, expert: int = 0, experts: int = 0, task: str = ""):
        def cb(p: dict) -> None:
            steps = int(p["steps"])
            done = base_units + (int(p["epoch"]) - 1) * steps + int(p["step"])
            self.units_done = done
            self.report.progress(force=int(p["step"]) >= steps, phase=phase, expert=expert, experts=experts,
                                 task=task, epoch=p["epoch"], epochs=p["epochs"], step=p["step"], steps=steps,
                                 loss=float(p["loss"]), units_done=done, units_total=self.units_total)
        return cb

    def run_all(self) -> None:
        from poe.engine.train import TeacherViews
        from poe_services.extractor import stages

        spec, run, device = self.spec, self.run, self.device
        self.report.send(event="phase", phase="prepare")
        prepared = stages.prepare(spec)
        self.units_total = prepared.units_total

        # Teacher views: the oracle's logits on fixed views of the training set (once).
        views = stages.load_views(run)
        if views is None:
            self.report.send(event="phase", phase="teacher", units_total=self.units_total)
            oracle, bf16 = stages.load_oracle(spec, stages.read_oracle(spec, run), device)
            images = stages.view_images(prepared.train, spec.views)
            views = TeacherViews(images, stages.teacher_logits(oracle, images, device, bf16))
            del oracle
            stages.save_views(run, views)

        # The library: the base pool's, or the front of a student trained by KD.
        if spec.base is not None:
            library = stages.load_base_library(spec, run)
        else:
            student_cfg = stages.student_config(spec, prepared.train)
            if not stages.student_done(run):
                self.report.send(event="phase", phase="library", units_total=self.units_total)
            student = stages.train_student(run, views, prepared.test, student_cfg, spec, device,
                                           progress=self._progress_fn("library", 0))
            library, report = stages.save_library(run, student, spec)
            self.report.send(event="library", **report)
        self.units_done = prepared.library_units

        # Experts, one at a time (CKD on the frozen library's cached features).
        features = None
        tasks = prepared.tasks
        for k, task in enumerate(tasks, 1):
            if not stages.expert_done(run, task):
                base_units = prepared.expert_base_units(k - 1)
                self.report.progress(force=True, phase="experts", expert=k, experts=len(tasks), task=task, epoch=0,
                                     epochs=spec.expert_schedule.epochs, step=0, steps=prepared.expert_steps,
                                     loss=0.0, units_done=base_units, units_total=self.units_total)
                if features is None:
                    features = stages.library_features(library, views.images, device)
                data, meta = stages.train_expert(run, library, spec, task, list(prepared.hierarchy.tasks[task]),
                                                 views, features, prepared.test, device,
                                                 self._progress_fn("experts", base_units, k, len(tasks), task))
                stages.save_expert(run, task, data, meta)
            self.report.send(event="expert", **stages.expert_report(run, task, k, len(tasks)))


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
