"""The extractor as a running service: wires the job board, the job driver and registry records
together, resumes unfinished jobs, reports health.

Life of a job (docs/EXTRACTOR.md):

1. StartExtraction: `plan.Planner` checks the request and resolves it into a `spec.JobSpec`; the
   job is recorded PENDING in the registry and queued (`jobs.JobBoard`).
2. At most `POE_EXTRACTOR_MAX_JOBS` jobs are driven at once. `driver.JobDriver` runs a job's
   stages as Ray tasks (`ray_executor`) and hands what they report to `recording.Recorder`:
   progress (kept in memory for Watch, written to the registry every
   `POE_EXTRACTOR_PROGRESS_INTERVAL` s), the library and each expert as they finish (registered
   at once).
3. When every stage is done, the pool version is published (one atomic PublishPool) and the job
   marked SUCCEEDED. Cancel and publish exclude each other (the job's lock), so a cancelled job
   never publishes.
4. Ray runs a task whose worker process died again (up to `POE_EXTRACTOR_MAX_ATTEMPTS` attempts),
   from the stage's last epoch checkpoint. On shutdown every task is stopped and the jobs stay
   RUNNING; the next extractor on the same registry resumes RUNNING and PENDING jobs.

Several extractors may serve one registry, each with its own POE_EXTRACTOR_ID and POE_HOME: a job
records the id of the extractor that started it, and an extractor resumes only its own unfinished
jobs. A job cancelled through another extractor is noticed at the next progress write (the
registry refuses to change a finished job), and its tasks stop. A lock file in each run directory
keeps two processes off the same job.

A stored job is input like a request: before it is resumed its spec is read strictly and checked
with `plan.check_spec` (bounds, allowed paths, TorchScript only from the oracle directory), and its
run directory, derived from the job id alone, must be a direct child of the runs root. A job that
fails any of this is marked FAILED ("cannot resume: ...") and counted, never run; it never keeps
the extractor NOT_SERVING nor stops the other jobs from resuming.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2

from poe.client.registry import RegistryClient
from poe.engine import limits
from poe.engine.config import Settings
from poe.engine.errors import AlreadyExists, InvalidArgument, NotFound, PoeError, Unavailable, field_error
from poe.engine.names import JOB_ID
from poe.v1 import common_pb2 as c
from poe.v1 import extractor_pb2 as pb
from poe.v1 import registry_pb2 as r
from poe_services import metrics
from poe_services.auth import OWNER_KEY
from poe_services.extractor.driver import JobDriver
from poe_services.extractor.jobs import Job, JobBoard
from poe_services.extractor.plan import Planner, check_job_id, check_spec, request_dict
from poe_services.extractor.recording import Recorder
from poe_services.extractor.spec import EXTRACTOR_KEY, FORMAT, JobSpec

if TYPE_CHECKING:
    from poe_services.host import HealthReporter

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Extractor"].full_name  # "poe.v1.Extractor"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Probe answers that mean the registry cannot be used: unreachable, overloaded, the wrong address,
# or it refuses this extractor's token.
REGISTRY_DOWN = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                           grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAUTHENTICATED,
                           grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.CANCELLED,
                           grpc.StatusCode.UNKNOWN})


class ExtractorRuntime:
    """Job queue, job driver and health of one extractor. `registry` is a RegistryClient (kept
    open by its owner), or the address of the registry (default settings.registry_addr)."""

    def __init__(self, settings: Settings, registry: RegistryClient | str | None = None):
        self.settings = settings
        if isinstance(registry, RegistryClient):
            self.registry, self._own_registry = registry, False
        else:
            self.registry, self._own_registry = RegistryClient(registry or settings.registry_addr, timeout=30.0,
                                                               token=settings.service_token, config=settings), True
        self.runs_dir = settings.home / "extractions"
        self.planner = Planner(settings, self.registry)
        self._stop = threading.Event()  # begin_shutdown: no new jobs, NOT_SERVING
        self._closing = threading.Event()  # close: the jobs' tasks are being stopped
        self.jobs = JobBoard(self.registry, settings.extractor_max_jobs, lambda job: self.driver.run(job),
                             self._stop, self._closing)
        self.recorder = Recorder(settings, self.registry, self.jobs, self._closing)
        self.driver = JobDriver(settings, self.registry, self.jobs, self.recorder, self._closing)
        self._start_lock = threading.Lock()  # one start at a time: idempotent job ids, staging directories
        self._wake = threading.Event()
        self.recovered = threading.Event()
        self._recover_again = False  # the last listing of unfinished jobs failed with the registry up
        self.health: HealthReporter | None = None
        self._monitor: threading.Thread | None = None
        self._status = None
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------

    def attach(self, server: grpc.Server, health: HealthReporter, /) -> None:
        """Add the Extractor servicer to `server`, report "poe.v1.Extractor" through `health`, and
        begin resuming unfinished jobs as soon as the registry answers."""
        from poe_services.extractor.servicer import add_to_server

        add_to_server(self, server)
        self.health = health
        self._set_health(False)
        self._monitor = threading.Thread(target=self._watch_registry, name="extractor-health", daemon=True)
        self._monitor.start()

    def start(self) -> None:
        """Called once the server runs: probe the registry now instead of at the next interval."""
        self._wake.set()

    def begin_shutdown(self) -> None:
        """NOT_SERVING, refuse new jobs, end Watch streams (clients watch again elsewhere)."""
        self._stop.set()
        self._wake.set()
        self._set_health(False)
        self.jobs.notify()

    def close(self) -> None:
        """begin_shutdown(), then stop the jobs' tasks (the jobs stay RUNNING in the registry and are
        resumed by the next extractor) and release the registry connection."""
        self.begin_shutdown()
        with self.jobs.lock:
            if self._closed:
                return
            self._closed = True
            self._closing.set()
        self.jobs.close(timeout=20)
        self.driver.close()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
        if self._own_registry:
            self.registry.close()
        self.jobs.update_gauges()

    # -- health and recovery ---------------------------------------------------------------------

    def _set_health(self, ok: bool) -> None:
        status = SERVING if ok and not self._stop.is_set() else NOT_SERVING
        if status != self._status:
            self._status = status
            log.info("extractor: %s", "SERVING" if status == SERVING else "NOT_SERVING")
        if self.health is not None:
            self.health.set(SERVICE_NAME, status)

    def _probe(self) -> bool:
        """Whether the registry answers this extractor. An error about the answer itself (a record
        it cannot serve) still means it answers: that is for recovery to report, not for health."""
        try:
            self.registry.stub.ListExtractionJobs(r.ListExtractionJobsRequest(page_size=1), timeout=5,
                                                  metadata=self.registry.metadata)
            return True
        except grpc.RpcError as e:
            log.debug("extractor: registry probe failed: %s", e)
            return e.code() not in REGISTRY_DOWN

    def _watch_registry(self) -> None:
        delay = 0.1
        while not self._stop.is_set():
            ok = self._probe()
            if ok and (not self.recovered.is_set() or self._recover_again):
                try:
                    self._recover()
                    self._recover_again = False
                    self.recovered.set()
                except Unavailable as e:  # the registry went away meanwhile: NOT_SERVING, try again
                    log.warning("extractor: cannot resume unfinished jobs yet: %s", e)
                    ok = False
                except Exception as e:  # the loop must survive anything: health depends on it
                    # The registry answers but cannot list its jobs: new jobs are served all the
                    # same, and the listing is tried again at every probe.
                    log.error("extractor: cannot list the unfinished jobs to resume (%s); serving new jobs and "
                              "trying again", e, exc_info=not isinstance(e, PoeError))
                    self._recover_again = True
                    self.recovered.set()
            self._set_health(ok and self.recovered.is_set())
            interval = self.settings.extractor_health_interval
            if not ok:
                interval, delay = min(delay, interval), min(delay * 2, interval)
            self._wake.wait(max(0.05, interval))
            self._wake.clear()

    def _recover(self) -> None:
        """Queue the registry's RUNNING jobs (first) and PENDING jobs (oldest first); fail those
        whose stored spec cannot be read or does not pass the checks."""
        with self._start_lock:  # no start in between: a new job is on the board before it is listed
            for stale in self.runs_dir.glob(".staging-*"):  # left by a start that died half-way
                shutil.rmtree(stale, ignore_errors=True)
            found = [j for state in ("running", "pending") for j in reversed(list(self.registry.list_jobs(state)))]
            resumed = 0
            for rec in found:
                if self.jobs.get(rec.id) is not None:
                    continue
                try:
                    job = self._resumable(rec)
                except InvalidArgument as e:  # it could never run: say so instead of leaving it unfinished
                    self._refuse(rec, str(e))
                    continue
                except Exception as e:  # a spec malformed in a way the checks did not foresee
                    log.exception("extractor: job %s: unexpected error while checking its stored spec",
                                  limits.quote(rec.id))
                    self._refuse(rec, f"job spec: cannot be checked ({type(e).__name__})")
                    continue
                if job is None:
                    continue
                if rec.state == c.EXTRACTION_STATE_RUNNING:
                    job.message = "queued: resuming after an extractor restart"
                if self.jobs.enqueue(job):
                    resumed += 1
        if resumed:
            log.info("extractor: resuming %d unfinished job(s)", resumed)

    def _resumable(self, rec: c.ExtractionJob) -> Job | None:
        """The job to resume from a registry record; None for a job of another format or of another
        extractor (left alone)."""
        try:
            stored = json.loads(rec.params_json or "{}")
        except (ValueError, RecursionError):
            raise InvalidArgument("job spec: not valid JSON") from None
        if not isinstance(stored, dict):
            raise InvalidArgument(f"job spec: expected an object, got {type(stored).__name__}")
        if stored.get("format") != FORMAT:
            log.info("extractor: job %s has no %s parameters; left alone", limits.quote(rec.id), FORMAT)
            return None
        if stored.get(EXTRACTOR_KEY, "") != self.settings.extractor_id:
            log.info("extractor: job %s belongs to extractor %s; left alone", limits.quote(rec.id),
                     limits.quote(stored.get(EXTRACTOR_KEY, "")))
            return None
        spec = JobSpec.from_dict({k: v for k, v in stored.items() if k not in (OWNER_KEY, EXTRACTOR_KEY)})
        try:
            check_spec(spec, self.planner.files)
        except InvalidArgument as e:
            raise InvalidArgument(f"job spec: {e}") from None
        return Job(rec.id, spec, self.run_dir(rec.id), rec)

    def _refuse(self, rec: c.ExtractionJob, reason: str) -> None:
        """Mark a stored job that cannot run FAILED (counted); an unreachable registry is retried."""
        error = f"cannot resume: {reason}"[:limits.MAX_JOB_ERROR_CHARS]
        log.warning("extractor: job %s cannot be resumed: %s", limits.quote(rec.id), reason)
        try:
            self.registry.update_job(rec.id, state="failed", error=error, message=f"failed: {error[:280]}")
        except Unavailable:
            raise
        except PoeError as e:
            log.error("extractor: job %s: could not mark it failed: %s", limits.quote(rec.id), e)
        metrics.EXTRACTION_JOBS_FINISHED.labels("failed").inc()

    def run_dir(self, job_id: str) -> Path:
        """A job's run directory: derived from its id alone, and a direct child of the runs root."""
        if not isinstance(job_id, str) or not JOB_ID.match(job_id):
            raise field_error("job_id", f"{limits.quote(job_id)} is not a job id (1-64 letters, digits, '.', '_' "
                                        "or '-', starting with a letter or digit)")
        root = Path(os.path.realpath(self.runs_dir))
        run = self.runs_dir / job_id
        if Path(os.path.realpath(run)).parent != root:  # e.g. a symlink left in the runs root
            raise field_error("job_id", f"the run directory of job {job_id} is not inside {root}")
        return run

    # -- starting ----------------------------------------------------------------------------------

    def start_job(self, params: pb.ExtractionParams, job_id: str = "", owner: str = "") -> c.ExtractionJob:
        if self._stop.is_set():
            raise Unavailable("the extractor is shutting down")
        check_job_id(job_id)
        with self._start_lock:
            if job_id:
                existing = self._same_job(job_id, params)
                if existing is not None:
                    return existing
            job_id = job_id or uuid.uuid4().hex
            staging = self.runs_dir / f".staging-{uuid.uuid4().hex}"
            try:
                spec = self.planner.plan(params, staging, self.jobs.targets())
                try:
                    # Who started it, beside the spec: CancelExtraction lets only them (or an admin) stop it.
                    # The extractor's id beside it: only an extractor of that id resumes the job.
                    rec = self.registry.create_job({**spec.to_dict(), OWNER_KEY: owner,
                                                    EXTRACTOR_KEY: self.settings.extractor_id},
                                                   oracle_id=spec.registered_oracle_id, job_id=job_id)
                except AlreadyExists:
                    existing = self._same_job(job_id, params)
                    if existing is None:
                        raise
                    return existing
                run = self.run_dir(job_id)
                if run.exists():
                    shutil.rmtree(run)  # left over by an earlier job of that id
                if staging.exists():
                    os.replace(staging, run)
                else:
                    run.mkdir(parents=True)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            job = Job(job_id, spec, run, rec)
            self.jobs.enqueue(job)
        log.info("extractor: job %s queued: %s, tasks %s", job_id, job.ref, ", ".join(spec.tasks))
        return self.jobs.live_record(job)

    def _same_job(self, job_id: str, params: pb.ExtractionParams) -> c.ExtractionJob | None:
        """The existing job `job_id` when it was started with these parameters (idempotent retry)."""
        try:
            rec, _ = self.snapshot(job_id)
        except NotFound:
            return None
        try:
            stored = json.loads(rec.params_json or "{}").get("request")
        except (ValueError, AttributeError):
            stored = None
        if stored != request_dict(params):
            raise AlreadyExists(f"job_id: job {job_id} already exists with different parameters")
        return rec

    # -- what the servicer calls -------------------------------------------------------------------

    def cancel(self, job_id: str) -> c.ExtractionJob:
        return self.jobs.cancel(job_id)

    def snapshot(self, job_id: str) -> tuple[c.ExtractionJob, pb.ExtractionProgress]:
        return self.jobs.snapshot(job_id)

    def watch(self, job_id: str, is_active: Callable[[], bool] = lambda: True,
              poll: float = 1.0) -> Iterator[tuple[c.ExtractionJob, pb.ExtractionProgress]]:
        return self.jobs.watch(job_id, is_active, poll)

    def poke(self) -> None:
        """Wake every Watch (a client went away)."""
        self.jobs.notify()

    def list_jobs(self, state: int = 0, page_size: int = 0, page_token: str = "") -> tuple[list, str]:
        return self.jobs.list_jobs(state, page_size, page_token)

    def task_pids(self, job_id: str) -> dict[str, int]:
        """stage -> pid of the Ray worker process running it, for the job's tasks running now (for
        operators and tests)."""
        return self.driver.executor.task_pids(job_id)
