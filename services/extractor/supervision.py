"""Running one job: a supervisor thread and its worker process (or its Ray tasks).

The supervisor locks the run directory (POE_HOME/extractions/<job id>; another process may still
be stopping a worker of the job), marks the job RUNNING, places the worker's inputs there
(downloads from the registry), starts a worker process (spawn) and handles its messages: progress,
the library and each expert as they finish (`recording.Recorder` writes them to the registry),
then `trained`, after which the pool version is published. A worker that dies is started again
and resumes from the run directory's checkpoints, up to `POE_EXTRACTOR_MAX_ATTEMPTS` deaths
(counted in attempts.json, so an extractor restart does not reset them). A worker stopped by a
cancel or by the extractor's shutdown is not a death.

With POE_EXTRACTOR_EXECUTOR=ray the worker process is replaced by the job's Ray tasks
(`ray_executor.RayExecutor`), which report the same messages; everything else stays the same.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import threading
import time
from pathlib import Path

from poe.client.registry import RegistryClient
from poe.engine.config import Settings, resolve_device
from poe.engine.errors import PoeError
from poe_services.extractor import worker
from poe_services.extractor.jobs import Job, JobBoard, JobFailed
from poe_services.extractor.ray_executor import RayExecutor, RayRun
from poe_services.extractor.recording import Recorder
from poe_services.extractor.spec import RegistryOracle, TorchScriptOracle

log = logging.getLogger(__name__)

ATTEMPTS_FILE = "attempts.json"
ERROR_LOG = "error.log"  # a worker's traceback (worker.py); stale once a later attempt succeeded
# Files a succeeded job no longer needs (its results are in the registry).
BULKY = ("teacher_views.safetensors", "oracle.safetensors", "oracle.torchscript", "base_library.safetensors")


def exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def default_threads(max_jobs: int) -> int:
    """Cores for one worker: OMP_NUM_THREADS when set (containers set it to their CPU limit; the
    core count there is the host's), else the cores this process may run on, shared by the jobs."""
    try:
        cores = int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))
    except (ValueError, AttributeError):
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, max_jobs))


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _read_json(path: Path, default: dict) -> dict:
    try:
        return {**default, **json.loads(path.read_text())}
    except (OSError, ValueError):
        return dict(default)


def stop_worker(job: Job, grace: float = 5.0) -> None:
    """SIGTERM, SIGKILL after `grace` s."""
    proc = job.process
    if proc is None:
        return
    if proc.is_alive():
        proc.terminate()
        proc.join(grace)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    job.process = None


def clean_run_dir(job: Job, outcome: str | None) -> None:
    """A cancelled job's run directory goes; a succeeded one keeps its logs and results only (not
    the error.log of an attempt that died before a resumed one succeeded). A failed job's stays
    whole for a post-mortem; a stopped one's for its resumption."""
    if outcome == "cancelled":
        shutil.rmtree(job.run, ignore_errors=True)
    elif outcome == "succeeded":
        for name in (*BULKY, ERROR_LOG):
            with contextlib.suppress(OSError):
                (job.run / name).unlink()
        for ckpt in job.run.glob("*.ckpt"):
            with contextlib.suppress(OSError):
                ckpt.unlink()


class Supervisor:
    """Runs jobs from `board`, one thread each; gives up on everything once `closing` is set."""

    def __init__(self, settings: Settings, registry: RegistryClient, board: JobBoard, recorder: Recorder,
                 closing: threading.Event):
        self.settings = settings
        self.registry = registry
        self.board = board
        self.recorder = recorder
        self._closing = closing
        self._ctx = mp.get_context("spawn")
        self.ray = RayExecutor(settings) if settings.extractor_executor == "ray" else None

    def close(self) -> None:
        """Release the executor (a local Ray started by this extractor stops)."""
        if self.ray is not None:
            self.ray.close()

    def start(self, job: Job) -> threading.Thread:
        thread = threading.Thread(target=self._supervise, args=(job,), name=f"extract-{job.id[:12]}", daemon=True)
        thread.start()
        return thread

    def _stopped(self, job: Job) -> bool:
        return job.cancelled or self._closing.is_set()

    def _supervise(self, job: Job) -> None:
        outcome = None
        lock_fd = None
        try:
            lock_fd = self._lock_run(job)
            if lock_fd is None:
                return
            self.recorder.record(job, critical=True, state="running", stage="prepare", message="preparing")
            self.recorder.progress(job, "phase", {"phase": "prepare"})
            self._materialise(job)
            if self._run_stages(job) == "trained" and self.recorder.publish(job):
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
            if outcome == "succeeded" and job.process is not None:
                job.process.join(timeout=30)  # a worker that reported `trained` ends by itself
            stop_worker(job)
            if lock_fd is not None:
                os.close(lock_fd)
            if job.cancelled:
                outcome = "cancelled"
            clean_run_dir(job, outcome)
            self.board.finish(job, outcome)

    def _lock_run(self, job: Job) -> int | None:
        """An exclusive lock on the run directory (another process may still be stopping a worker
        of this job); None when the job was cancelled or the extractor closes meanwhile."""
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
        """Place the worker's inputs in the run directory (downloads from the registry)."""
        spec, run, retry = job.spec, job.run, self.recorder.retry
        views_done = (run / "teacher_views.safetensors").exists()
        o = spec.oracle
        if isinstance(o, RegistryOracle) and not views_done and not (run / "oracle.safetensors").exists():
            rec = retry(lambda: self.registry.get_oracle(o.id))
            data = retry(lambda: self.registry.download(rec.blob.sha256))
            worker.write_atomic(run / "oracle.safetensors", data)
            _write_json(run / "oracle.json", {"config": json.loads(rec.config_json or "{}"), "id": rec.id})
        if isinstance(o, TorchScriptOracle) and not views_done and not (run / o.file).exists():
            raise JobFailed(f"the TorchScript oracle copied into {run} when the job started is gone; start a new job")
        base = spec.base
        if base is not None:
            job.library_id = base.library_id
            if not (run / "base_library.safetensors").exists():
                data = retry(lambda: self.registry.download(base.library_sha256))
                worker.write_atomic(run / "base_library.safetensors", data)
                _write_json(run / "base_library.json", {"config": base.library_config, "id": base.library_id})

    def _run_stages(self, job: Job) -> str:
        """"trained" once every stage's result is in, "stopped" when the job was stopped."""
        if self.ray is None:
            return self._train(job)
        with job.lock:
            job.attempt, job.device = 1, RayRun.task_device(job.spec, self.settings)
            job.started, job.rate_origin = time.monotonic(), None
        return self.ray.train(job, lambda msg: self._handle(job, dict(msg)), lambda: self._stopped(job))

    def _train(self, job: Job) -> str:
        """Run workers until one reports `trained` (returns "trained"), the job is stopped
        ("stopped"), the worker reports an error or dies too often (JobFailed)."""
        counts_file = job.run / ATTEMPTS_FILE
        limit = max(1, self.settings.extractor_max_attempts)
        threads = self.settings.extractor_threads or default_threads(self.settings.extractor_max_jobs)
        spec_json = json.dumps(job.spec.to_dict())
        while True:
            if self._stopped(job):
                return "stopped"
            counts = _read_json(counts_file, {"spawns": 0, "deaths": 0, "last_exit": ""})
            if counts["deaths"] >= limit:
                raise JobFailed(f"the worker died {counts['deaths']} times (last: {counts['last_exit']}); "
                                "giving up (the run directory keeps its checkpoints)")
            try:
                device = resolve_device(job.spec.device)
            except PoeError as e:
                raise JobFailed(f"device: {e}") from None
            counts["spawns"] += 1
            _write_json(counts_file, counts)
            receiver, sender = self._ctx.Pipe(duplex=False)
            proc = self._ctx.Process(target=worker.main, name=f"poe-extract-{job.id[:12]}", daemon=True,
                                     args=(job.id, spec_json, str(job.run), device, threads, sender))
            with job.lock:
                if self._stopped(job):
                    return "stopped"
                proc.start()
                job.process = proc
                job.attempt, job.device, job.started, job.rate_origin = counts["spawns"], device, time.monotonic(), None
            sender.close()
            log.info("extractor: job %s: worker %d started (attempt %d, %s, %d thread(s))", job.id, proc.pid,
                     job.attempt, device, threads)
            try:
                result = self._pump(job, receiver)
            finally:
                receiver.close()
            if result == "trained":  # the worker is exiting; publishing need not wait for it
                return "trained"
            proc.join(timeout=5)
            if self._stopped(job):
                return "stopped"
            if proc.is_alive():  # closed its pipe but lives on: stop it before resuming
                stop_worker(job)
            counts["deaths"] += 1
            counts["last_exit"] = exit_reason(proc.exitcode)
            _write_json(counts_file, counts)
            job.process = None
            log.warning("extractor: job %s: worker %s (%s); resuming from the run directory's checkpoints",
                        job.id, proc.pid, counts["last_exit"])
            self.recorder.progress(job, "phase", {"phase": job.progress.get("phase", "prepare"),
                                                  "note": f"worker {counts['last_exit']}; resuming"})

    def _pump(self, job: Job, conn) -> str | None:
        """Handle the worker's messages until it reports `trained` or its pipe closes (None)."""
        while True:
            try:
                raw = conn.recv_bytes()
            except (EOFError, OSError):
                return None
            if self._handle(job, json.loads(raw)) == "trained":
                return "trained"

    def _handle(self, job: Job, msg: dict) -> str | None:
        """One report of the worker (or of the Ray executor); returns "trained" for the last."""
        event = msg.pop("event", "")
        if event in ("phase", "progress"):
            self.recorder.progress(job, event, msg)
        elif event == "library":
            self.recorder.register_library(job, msg)
        elif event == "expert":
            self.recorder.register_expert(job, msg)
        elif event == "trained":
            return "trained"
        elif event == "error":
            raise JobFailed(msg.get("message") or "the worker failed")
        return None
