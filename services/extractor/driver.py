"""Driving one job: from its run directory's inputs to a published pool, with its stages on Ray.

The job board (`jobs.JobBoard`) calls `JobDriver.run(job)` on one of its threads. The driver locks
the run directory (POE_HOME/extractions/<job id>; another extractor process may still be stopping
the job), marks the job RUNNING, places the stages' inputs there (downloads from the registry), and
hands the job to `ray_executor.RayExecutor`, which runs the stages as Ray tasks and reports what
they produce: progress, the library and each expert as they finish (`recording.Recorder` writes
them to the registry at once). When every stage is done the pool version is published.

Retrying a task whose worker process died, stopping every task on cancel or shutdown, and resuming
from the run directory's checkpoints are the executor's (and Ray's); a job the extractor stops on
shutdown stays RUNNING and the next extractor resumes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

from poe.client.registry import RegistryClient
from poe.engine.config import Settings
from poe.engine.errors import PoeError
from poe_services.extractor.jobs import Job, JobBoard, JobFailed
from poe_services.extractor.ray_executor import RayExecutor, RayRun
from poe_services.extractor.recording import Recorder
from poe_services.extractor.spec import RegistryOracle, TorchScriptOracle
from poe_services.extractor.stages import write_atomic

log = logging.getLogger(__name__)

ERROR_LOG = "error.log"  # a failed task's traceback (ray_executor); stale once a resumed run succeeded
# Files a succeeded job no longer needs (its results are in the registry).
BULKY = ("teacher_views.safetensors", "oracle.safetensors", "oracle.torchscript", "base_library.safetensors")


def _write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data).encode())


def clean_run_dir(job: Job, outcome: str | None) -> None:
    """A cancelled job's run directory goes; a succeeded one keeps its logs and results only (not
    the error.log of a run that failed before a resumed one succeeded). A failed job's stays whole
    for a post-mortem; a stopped one's for its resumption."""
    if outcome == "cancelled":
        shutil.rmtree(job.run, ignore_errors=True)
    elif outcome == "succeeded":
        for name in (*BULKY, ERROR_LOG):
            with contextlib.suppress(OSError):
                (job.run / name).unlink()
        for ckpt in job.run.glob("*.ckpt"):
            with contextlib.suppress(OSError):
                ckpt.unlink()


class JobDriver:
    """Runs the jobs the board starts; gives up on everything once `closing` is set."""

    def __init__(self, settings: Settings, registry: RegistryClient, board: JobBoard, recorder: Recorder,
                 closing: threading.Event):
        self.settings = settings
        self.registry = registry
        self.board = board
        self.recorder = recorder
        self._closing = closing
        self.executor = RayExecutor(settings)

    def close(self) -> None:
        """Release the executor (a local Ray started by this extractor stops)."""
        self.executor.close()

    def _stopped(self, job: Job) -> bool:
        return job.cancelled or self._closing.is_set()

    def run(self, job: Job) -> None:
        """The whole job, on the calling thread; the board learns the outcome at the end."""
        outcome = None
        lock_fd = None
        try:
            if self._stopped(job):
                return
            lock_fd = self._lock_run(job)
            if lock_fd is None:
                return
            self.recorder.record(job, critical=True, state="running", stage="prepare", message="preparing")
            self.recorder.progress(job, "phase", {"phase": "prepare"})
            self._materialise(job)
            if self._train(job) == "trained" and self.recorder.publish(job):
                outcome = "succeeded"
        except Exception as e:
            if not self._stopped(job):
                if isinstance(e, PoeError):
                    message = str(e)
                else:
                    log.exception("extractor: job %s: unexpected error", job.id)
                    message = f"internal error: {type(e).__name__}: {e}"
                self.recorder.fail(job, message)
                outcome = "failed"
        finally:
            if lock_fd is not None:
                os.close(lock_fd)
            if job.cancelled:
                outcome = "cancelled"
            clean_run_dir(job, outcome)
            self.board.finish(job, outcome)

    def _lock_run(self, job: Job) -> int | None:
        """An exclusive lock on the run directory (another process may still be stopping this
        job's tasks); None when the job was cancelled or the extractor closes meanwhile."""
        job.run.mkdir(parents=True, exist_ok=True)
        fd = os.open(job.run / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if not waited:
                    log.info("extractor: job %s: waiting for another process to release %s", job.id, job.run)
                    waited = True
                if job.cancelled or self._closing.wait(0.2):
                    os.close(fd)
                    return None

    def _materialise(self, job: Job) -> None:
        """Place the stages' inputs in the run directory (downloads from the registry)."""
        spec, run, retry = job.spec, job.run, self.recorder.retry
        views_done = (run / "teacher_views.safetensors").exists()
        o = spec.oracle
        if isinstance(o, RegistryOracle) and not views_done and not (run / "oracle.safetensors").exists():
            rec = retry(lambda: self.registry.get_oracle(o.id))
            data = retry(lambda: self.registry.download(rec.blob.sha256))
            write_atomic(run / "oracle.safetensors", data)
            _write_json(run / "oracle.json", {"config": json.loads(rec.config_json or "{}"), "id": rec.id})
        if isinstance(o, TorchScriptOracle) and not views_done and not (run / o.file).exists():
            raise JobFailed(f"the TorchScript oracle copied into {run} when the job started is gone; start a new job")
        base = spec.base
        if base is not None:
            job.library_id = base.library_id
            if not (run / "base_library.safetensors").exists():
                data = retry(lambda: self.registry.download(base.library_sha256))
                write_atomic(run / "base_library.safetensors", data)
                _write_json(run / "base_library.json", {"config": base.library_config, "id": base.library_id})

    def _train(self, job: Job) -> str:
        """"trained" once every stage's result is in, "stopped" when the job was stopped."""
        with job.lock:
            job.attempt, job.device = 1, RayRun.task_device(job.spec, self.settings)
            job.started, job.rate_origin = time.monotonic(), None
        return self.executor.train(job, lambda msg: self._handle(job, dict(msg)), lambda: self._stopped(job))

    def _handle(self, job: Job, msg: dict) -> None:
        """One report of the executor."""
        event = msg.pop("event", "")
        if event in ("phase", "progress"):
            self.recorder.progress(job, event, msg)
        elif event == "library":
            self.recorder.register_library(job, msg)
        elif event == "expert":
            self.recorder.register_expert(job, msg)
