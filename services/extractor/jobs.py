"""The extractor's jobs in memory: the Job record, the queue, cancel, and what Get/Watch/List read.

At most `POE_EXTRACTOR_MAX_JOBS` jobs are driven at once (a thread pool's threads, each driving
one job's Ray tasks); the others wait in the pool's queue (PENDING). A job
that runs here is read with this extractor's live progress; any other job is read from the
registry. One lock (`JobBoard.lock`) guards the board and every job's live fields; `changed` is
notified on every change, which is what Watch streams wait on.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from pathlib import Path

from poe.client.errors import translate_rpc_errors
from poe.client.registry import RegistryClient
from poe.contract import TERMINAL_STATES, state_name
from poe.engine.errors import FailedPrecondition, PoeError, field_error
from poe.v1 import common_pb2 as c
from poe.v1 import extractor_pb2 as pb
from poe.v1 import registry_pb2 as r
from poe_services import metrics
from poe_services.extractor.spec import JobSpec

log = logging.getLogger(__name__)
REMEMBERED_READS = 1024  # jobs whose last registry read Watch streams share


class JobFailed(PoeError):
    """The job cannot succeed; the message is recorded as the job's error."""


@dataclass
class Job:
    id: str
    spec: JobSpec
    run: Path  # POE_HOME/extractions/<job id>
    record: c.ExtractionJob  # the registry's copy, as last written or read
    progress: dict = field(default_factory=lambda: {"phase": "queued"})
    message: str = "queued"
    fraction: float = 0.0
    eta: float | None = None
    cancelled: bool = False
    finished: bool = False
    attempt: int = 0
    device: str = ""
    started: float = 0.0
    rate_origin: tuple[int, float] | None = None  # (units done, when) the ETA is measured from
    library_id: int | None = None
    expert_ids: dict[str, int] = field(default_factory=dict)
    last_write: float = 0.0
    last_written: tuple = ()
    lock: threading.RLock = field(default_factory=threading.RLock)  # cancel and publish exclude each other

    @property
    def ref(self) -> str:
        return self.spec.ref


class JobBoard:
    """Jobs this extractor knows, queued and running. `run(job)` drives a job to its end on one of
    the pool's threads and calls `finish` when it is done."""

    def __init__(self, registry: RegistryClient, max_jobs: int, run: Callable[[Job], None],
                 stopping: threading.Event, closing: threading.Event):
        self.registry = registry
        self.max_jobs = max(1, max_jobs)
        self._run = run
        self._stopping = stopping  # begin_shutdown: Watch streams end
        self._closing = closing  # close: no job starts any more
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self._jobs: dict[str, Job] = {}
        self._futures: dict[str, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=self.max_jobs, thread_name_prefix="extract")
        # job id -> (monotonic time, record) of the last registry read of a job that does not run
        # here: the Watch streams on one job share one read per poll instead of one each.
        self._read: OrderedDict[str, tuple[float, c.ExtractionJob]] = OrderedDict()

    # -- the queue ---------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            return self._jobs.get(job_id)

    def targets(self) -> dict[str, str]:
        """"name@version" -> job id of every job this extractor has not finished."""
        with self.lock:
            return {j.ref: j.id for j in self._jobs.values()}

    def running(self) -> list[Job]:
        with self.lock:
            return [self._jobs[j] for j, f in self._futures.items() if f.running() and j in self._jobs]

    def enqueue(self, job: Job) -> bool:
        """Queue `job`; it starts as soon as fewer than max_jobs run. False when the id is known
        already or the extractor closes."""
        with self.lock:
            if job.id in self._jobs or self._closing.is_set():
                return False
            self._jobs[job.id] = job
            self._read.pop(job.id, None)  # read before it ran here: never served again
            self._futures[job.id] = self._pool.submit(self._drive, job)
            self.update_gauges()
            return True

    def _drive(self, job: Job) -> None:
        """On a pool thread: the job starts (it counts as running from now on)."""
        self.update_gauges()
        self._run(job)

    def finish(self, job: Job, outcome: str | None) -> None:
        """The job's driver is done (outcome "succeeded", "failed", "cancelled", or None when the
        extractor stopped it); the next queued job may start."""
        with self.lock:
            if self._jobs.get(job.id) is job:
                del self._jobs[job.id]
                self._futures.pop(job.id, None)
                self._read.pop(job.id, None)
            if outcome:
                metrics.EXTRACTION_JOBS_FINISHED.labels(outcome).inc()
            job.finished = True
            self.changed.notify_all()
            self.update_gauges()

    def close(self, timeout: float) -> None:
        """Drop the queued jobs (they stay PENDING in the registry for the next extractor) and wait
        up to `timeout` s for the running ones to stop (`closing` is set: their drivers stop)."""
        with self.lock:
            running = [f for f in self._futures.values() if not f.cancel()]
        self._pool.shutdown(wait=False, cancel_futures=True)
        wait_futures(running, timeout=timeout)

    def notify(self) -> None:
        """Wake every Watch (a job changed, a client went away, the extractor shuts down)."""
        with self.changed:
            self.changed.notify_all()

    # -- cancel ------------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> c.ExtractionJob:
        """CANCELLED in the registry first, then the job's tasks are stopped (its driver removes the
        run directory); a queued job simply leaves the queue."""
        job = self.get(job_id)
        if job is None:
            rec = self.registry.get_job(job_id)
            if rec.state in TERMINAL_STATES:
                raise FailedPrecondition(f"job {job_id} is already {state_name(rec.state)}")
            # Unfinished but not run by this extractor (not resumed yet): only the record changes.
            return self.registry.update_job(job_id, state="cancelled", message="cancelled")
        with job.lock:
            if job.finished or job.record.state in TERMINAL_STATES:
                state = state_name(job.record.state) if job.record.state in TERMINAL_STATES else "finished"
                raise FailedPrecondition(f"job {job_id} is already {state}")
            rec = self.registry.update_job(job_id, state="cancelled", stage=job.progress.get("phase", ""),
                                           message="cancelled")
            job.cancelled = True  # a running job's driver stops its tasks and removes the run directory
        log.info("extractor: job %s cancelled", job_id)
        queued = False
        with self.lock:
            job.record, job.progress, job.message = rec, {"phase": "cancelled"}, "cancelled"
            future = self._futures.get(job_id)
            if future is not None and future.cancel():  # never started: nothing else will clean up after it
                self._futures.pop(job_id, None)
                self._jobs.pop(job_id, None)
                self._read.pop(job_id, None)
                metrics.EXTRACTION_JOBS_FINISHED.labels("cancelled").inc()
                queued = True
            self.changed.notify_all()
            self.update_gauges()
        if queued:
            shutil.rmtree(job.run, ignore_errors=True)
        return rec

    # -- reading -----------------------------------------------------------------------------------

    def _progress_pb(self, job: Job) -> pb.ExtractionProgress:
        p = job.progress
        out = pb.ExtractionProgress(
            phase=p.get("phase", ""), expert=int(p.get("expert", 0)), experts=int(p.get("experts", 0)),
            task=p.get("task", ""), epoch=int(p.get("epoch", 0)), epochs=int(p.get("epochs", 0)),
            step=int(p.get("step", 0)), steps=int(p.get("steps", 0)), loss=float(p.get("loss", 0.0)),
            fraction=job.fraction, attempt=job.attempt, device=job.device, live=True,
            elapsed_seconds=round(time.monotonic() - job.started, 1) if job.started else 0.0)
        if job.eta is not None and not job.finished:
            out.eta_seconds = round(job.eta, 1)
        return out

    def live_record(self, job: Job) -> c.ExtractionJob:
        """The job's registry record with this extractor's live progress (until it is terminal)."""
        rec = c.ExtractionJob()
        rec.CopyFrom(job.record)
        if rec.state not in TERMINAL_STATES:
            rec.progress, rec.stage, rec.message = round(job.fraction, 4), job.progress.get("phase", ""), job.message
        return rec

    def snapshot(self, job_id: str, max_age: float = 0.0) -> tuple[c.ExtractionJob, pb.ExtractionProgress]:
        """The job's record (with this extractor's live progress when it runs here) and progress;
        `max_age`: a job that runs elsewhere may be the registry's record read that recently."""
        if not job_id:
            raise field_error("job_id", "required")
        with self.lock:
            job = self._jobs.get(job_id)
            if job is not None:
                return self.live_record(job), self._progress_pb(job)
            read = self._read.get(job_id)
        if read is not None and time.monotonic() - read[0] < max_age:
            rec = read[1]
        else:
            rec = self.registry.get_job(job_id)
            with self.lock:
                self._read[job_id] = (time.monotonic(), rec)
                self._read.move_to_end(job_id)
                while len(self._read) > REMEMBERED_READS:
                    self._read.popitem(last=False)
        phase = {c.EXTRACTION_STATE_SUCCEEDED: "done", c.EXTRACTION_STATE_FAILED: "failed",
                 c.EXTRACTION_STATE_CANCELLED: "cancelled"}.get(rec.state, rec.stage or "queued")
        return rec, pb.ExtractionProgress(phase=phase, fraction=rec.progress, live=False)

    def watch(self, job_id: str, is_active: Callable[[], bool] = lambda: True,
              poll: float = 1.0) -> Iterator[tuple[c.ExtractionJob, pb.ExtractionProgress]]:
        """Snapshots on every change until the job is terminal (or the extractor shuts down)."""
        last = None
        while True:
            rec, progress = self.snapshot(job_id, max_age=poll)
            key_progress = pb.ExtractionProgress()
            key_progress.CopyFrom(progress)
            key_progress.ClearField("elapsed_seconds")
            key_progress.ClearField("eta_seconds")
            key = (rec.state, rec.progress, rec.stage, rec.message, rec.error, rec.pool,
                   key_progress.SerializeToString(deterministic=True))
            if key != last:
                last = key
                yield rec, progress
            if rec.state in TERMINAL_STATES or self._stopping.is_set() or not is_active():
                return
            with self.changed:
                self.changed.wait(timeout=poll)

    def list_jobs(self, state: int = 0, page_size: int = 0, page_token: str = "") -> tuple[list, str]:
        with translate_rpc_errors(f"registry at {self.registry.target}"):
            resp = self.registry.stub.ListExtractionJobs(r.ListExtractionJobsRequest(
                state=state, page_size=page_size, page_token=page_token), timeout=self.registry.timeout,
                metadata=self.registry.metadata)
        jobs = []
        with self.lock:
            for rec in resp.jobs:
                job = self._jobs.get(rec.id)
                jobs.append(self.live_record(job) if job is not None else rec)
        return jobs, resp.next_page_token

    def update_gauges(self) -> None:
        with self.lock:
            running = self.running()
            metrics.EXTRACTION_JOBS.labels("queued").set(len(self._jobs) - len(running))
            metrics.EXTRACTION_JOBS.labels("running").set(len(running))
            metrics.EXTRACTION_PROGRESS.set(sum(j.fraction for j in running) / len(running) if running else 0.0)
