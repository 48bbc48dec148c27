"""The extractor as a running service: the job queue, worker processes, registry records, health.

Life of a job (docs/EXTRACTOR.md):

1. StartExtraction: `plan.Planner` checks the request and resolves it into a job spec; the job is
   recorded PENDING in the registry and queued here.
2. At most `POE_EXTRACTOR_MAX_JOBS` jobs run at once. A supervisor thread per running job marks
   it RUNNING, places the inputs in the run directory (POE_HOME/extractions/<job id>), starts a
   worker process (spawn) and follows its messages: progress (kept in memory for Watch, written
   to the registry every `POE_EXTRACTOR_PROGRESS_INTERVAL` s), the library and each expert as
   they finish (registered in the registry at once).
3. When the worker has trained everything, the supervisor publishes the pool version (one atomic
   PublishPool) and marks the job SUCCEEDED. Cancel and publish exclude each other (the job's
   lock), so a cancelled job never publishes.
4. A worker that dies is started again and resumes from the run directory's checkpoints (up to
   `POE_EXTRACTOR_MAX_ATTEMPTS` deaths). On shutdown workers are stopped and their jobs stay
   RUNNING; the next extractor on the same registry resumes RUNNING and PENDING jobs.

One extractor per registry: the jobs a registry lists as RUNNING are taken to be this extractor's
to resume. A lock file in each run directory keeps two processes off the same job.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import multiprocessing as mp
import os
import shutil
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2

from poe.client.errors import translate_rpc_errors
from poe.client.registry import RegistryClient
from poe.engine.config import Settings, resolve_device
from poe.engine.errors import AlreadyExists, FailedPrecondition, NotFound, PoeError, Unavailable
from poe.v1 import common_pb2 as c
from poe.v1 import extractor_pb2 as pb
from poe.v1 import registry_pb2 as r
from poe_services import metrics
from poe_services.extractor import worker
from poe_services.extractor.plan import FORMAT, Planner, check_job_id, request_dict

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Extractor"].full_name  # "poe.v1.Extractor"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TERMINAL = (c.EXTRACTION_STATE_SUCCEEDED, c.EXTRACTION_STATE_FAILED, c.EXTRACTION_STATE_CANCELLED)
STATE_NAMES = {c.EXTRACTION_STATE_PENDING: "pending", c.EXTRACTION_STATE_RUNNING: "running",
               c.EXTRACTION_STATE_SUCCEEDED: "succeeded", c.EXTRACTION_STATE_FAILED: "failed",
               c.EXTRACTION_STATE_CANCELLED: "cancelled"}
# Files a succeeded job no longer needs (its results are in the registry).
BULKY = ("teacher_views.safetensors", "oracle.safetensors", "oracle.torchscript", "base_library.safetensors")


class JobFailed(PoeError):
    """The job cannot succeed; the message is recorded as the job's error."""


@dataclass
class Job:
    id: str
    spec: dict
    run: Path
    record: c.ExtractionJob
    progress: dict = field(default_factory=lambda: {"phase": "queued"})
    message: str = "queued"
    fraction: float = 0.0
    eta: float | None = None
    cancelled: bool = False
    finished: bool = False
    process: mp.process.BaseProcess | None = None
    thread: threading.Thread | None = None
    attempt: int = 0
    device: str = ""
    started: float = 0.0
    rate_origin: tuple[int, float] | None = None
    library_id: int | None = None
    expert_ids: dict[str, int] = field(default_factory=dict)
    last_exit: str = ""
    last_write: float = 0.0
    last_written: tuple = ()
    lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def ref(self) -> str:
        return f"{self.spec['pool']['name']}@{self.spec['pool']['version']}"


def _describe(p: dict) -> str:
    phase = p.get("phase", "")
    where = ""
    if p.get("epochs"):
        where = f"epoch {p.get('epoch', 0)}/{p['epochs']}"
        if p.get("steps"):
            where += f", step {p.get('step', 0)}/{p['steps']}"
        if p.get("step"):
            where += f", loss {float(p.get('loss', 0.0)):.4f}"
    if phase == "experts":
        return f"expert {p.get('expert', 0)} of {p.get('experts', 0)} ({p.get('task', '')})" + \
            (f": {where}" if where else "")
    if phase == "library":
        return "library (KD)" + (f": {where}" if where else "")
    return {"queued": "queued", "prepare": "preparing: loading the data set and the oracle",
            "teacher": "teacher: the oracle labels the fixed views of the training set",
            "publish": "publishing the pool version"}.get(phase, phase)


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _default_threads(max_jobs: int) -> int:
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


class ExtractorRuntime:
    """Job queue, supervisors and health of one extractor. `registry` is a RegistryClient (kept
    open by its owner), or the address of the registry (default settings.registry_addr)."""

    def __init__(self, settings: Settings, registry: RegistryClient | str | None = None):
        self.settings = settings
        if isinstance(registry, RegistryClient):
            self.registry, self._own_registry = registry, False
        else:
            self.registry, self._own_registry = RegistryClient(registry or settings.registry_addr, timeout=30.0), True
        self.runs_dir = settings.home / "extractions"
        self.planner = Planner(settings, self.registry)
        self._ctx = mp.get_context("spawn")
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._start_lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._queue: deque[str] = deque()
        self._running: set[str] = set()
        self._counts: Counter[str] = Counter()
        self._stop = threading.Event()  # begin_shutdown: no new jobs, NOT_SERVING
        self._closing = threading.Event()  # close: workers are being stopped
        self._wake = threading.Event()
        self.recovered = threading.Event()
        self.health: health.HealthServicer | None = None
        self._services: tuple[str, ...] = ()
        self._monitor: threading.Thread | None = None
        self._status = None
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------

    def attach(self, server: grpc.Server, health_servicer: health.HealthServicer, *, overall: bool = False) -> None:
        """Add the Extractor servicer to `server`, report health through `health_servicer` (under
        "poe.v1.Extractor", and "" too when `overall`), and begin resuming unfinished jobs as soon
        as the registry answers."""
        from poe_services.extractor.servicer import add_to_server

        add_to_server(self, server)
        self.health = health_servicer
        self._services = (SERVICE_NAME, "") if overall else (SERVICE_NAME,)
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
        with self._changed:
            self._changed.notify_all()

    def close(self) -> None:
        """begin_shutdown(), then stop the workers (their jobs stay RUNNING in the registry and are
        resumed by the next extractor) and release the registry connection."""
        self.begin_shutdown()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._closing.set()
            running = [self._jobs[j] for j in self._running if j in self._jobs]
        for job in running:
            proc = job.process
            if proc is not None and proc.is_alive():
                proc.terminate()
        for job in running:
            if job.thread is not None:
                job.thread.join(timeout=20)
        if self._monitor is not None:
            self._monitor.join(timeout=5)
        if self._own_registry:
            self.registry.close()
        self._update_gauges()

    # -- health and recovery ---------------------------------------------------------------------

    def _set_health(self, ok: bool) -> None:
        status = SERVING if ok and not self._stop.is_set() else NOT_SERVING
        if status != self._status:
            self._status = status
            log.info("extractor: %s", "SERVING" if status == SERVING else "NOT_SERVING")
        if self.health is not None:
            for name in self._services:
                self.health.set(name, status)

    def _probe(self) -> bool:
        try:
            self.registry.stub.ListExtractionJobs(r.ListExtractionJobsRequest(page_size=1), timeout=5)
            return True
        except grpc.RpcError as e:
            log.debug("extractor: registry probe failed: %s", e)
            return False

    def _watch_registry(self) -> None:
        delay = 0.1
        while not self._stop.is_set():
            ok = self._probe()
            if ok and not self.recovered.is_set():
                try:
                    self._recover()
                    self.recovered.set()
                except Exception as e:  # the loop must survive anything: health depends on it
                    log.warning("extractor: cannot resume unfinished jobs yet: %s", e,
                                exc_info=not isinstance(e, PoeError))
                    ok = False
            self._set_health(ok and self.recovered.is_set())
            interval = self.settings.extractor_health_interval
            if not ok:
                interval, delay = min(delay, interval), min(delay * 2, interval)
            self._wake.wait(max(0.05, interval))
            self._wake.clear()

    def _recover(self) -> None:
        """Queue the registry's RUNNING jobs (first) and PENDING jobs (oldest first)."""
        with self._start_lock:  # staging directories left by a start that died half-way
            for stale in self.runs_dir.glob(".staging-*"):
                shutil.rmtree(stale, ignore_errors=True)
        found = [j for state in ("running", "pending") for j in reversed(list(self.registry.list_jobs(state)))]
        resumed = 0
        for rec in found:
            try:
                spec = json.loads(rec.params_json or "{}")
            except ValueError:
                spec = {}
            if spec.get("format") != FORMAT:
                log.info("extractor: job %s has no %s parameters; left alone", rec.id, FORMAT)
                continue
            with self._lock:
                if rec.id in self._jobs or self._closing.is_set():
                    continue
                job = Job(rec.id, spec, self.runs_dir / rec.id, rec)
                if rec.state == c.EXTRACTION_STATE_RUNNING:
                    job.message = "queued: resuming after an extractor restart"
                self._jobs[rec.id] = job
                self._queue.append(rec.id)
                resumed += 1
        if resumed:
            log.info("extractor: resuming %d unfinished job(s)", resumed)
        self._schedule()

    # -- starting ----------------------------------------------------------------------------------

    def start_job(self, params: pb.ExtractionParams, job_id: str = "") -> c.ExtractionJob:
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
                with self._lock:
                    busy = {j.ref: j.id for j in self._jobs.values()}
                spec = self.planner.plan(params, staging, busy)
                oracle_id = spec["oracle"].get("id") if spec["oracle"]["kind"] == "registry" else None
                try:
                    rec = self.registry.create_job(spec, oracle_id=oracle_id, job_id=job_id)
                except AlreadyExists:
                    existing = self._same_job(job_id, params)
                    if existing is None:
                        raise
                    return existing
                run = self.runs_dir / job_id
                if run.exists():
                    shutil.rmtree(run)  # left over by an earlier job of that id
                if staging.exists():
                    os.replace(staging, run)
                else:
                    run.mkdir(parents=True)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            job = Job(job_id, spec, run, rec)
            with self._lock:
                self._jobs[job_id] = job
                self._queue.append(job_id)
        log.info("extractor: job %s queued: %s, tasks %s", job_id, job.ref, ", ".join(spec["tasks"]))
        self._schedule()
        return self._live_record(job)

    def _same_job(self, job_id: str, params: pb.ExtractionParams) -> c.ExtractionJob | None:
        """The existing job `job_id` when it was started with these parameters (idempotent retry)."""
        try:
            rec, _ = self.snapshot(job_id)
        except NotFound:
            return None
        try:
            stored = json.loads(rec.params_json or "{}").get("request")
        except ValueError:
            stored = None
        if stored != request_dict(params):
            raise AlreadyExists(f"job_id: job {job_id} already exists with different parameters")
        return rec

    def _schedule(self) -> None:
        with self._lock:
            limit = max(1, self.settings.extractor_max_jobs)
            while self._queue and len(self._running) < limit and not self._closing.is_set():
                job = self._jobs.get(self._queue.popleft())
                if job is None or job.cancelled:
                    continue
                self._running.add(job.id)
                job.thread = threading.Thread(target=self._supervise, args=(job,), name=f"extract-{job.id[:12]}",
                                              daemon=True)
                job.thread.start()
            self._update_gauges()

    # -- a running job -----------------------------------------------------------------------------

    def _supervise(self, job: Job) -> None:
        outcome = None
        lock_fd = None
        try:
            lock_fd = self._lock_run(job)
            if lock_fd is None:
                return
            self._record(job, critical=True, state="running", stage="prepare", message="preparing")
            self._on_progress(job, "phase", {"phase": "prepare"})
            self._materialise(job)
            if self._train(job) == "trained" and self._publish(job):
                outcome = "succeeded"
        except Exception as e:
            if not (job.cancelled or self._closing.is_set()):
                if isinstance(e, PoeError):
                    message = str(e)
                else:
                    log.exception("extractor: job %s: unexpected error", job.id)
                    message = f"internal error: {type(e).__name__}: {e}"
                self._fail(job, message)
                outcome = "failed"
        finally:
            if outcome == "succeeded" and job.process is not None:
                job.process.join(timeout=30)  # a worker that reported `trained` ends by itself
            self._stop_worker(job)
            if lock_fd is not None:
                os.close(lock_fd)
            if job.cancelled:
                outcome = "cancelled"
            self._finish(job, outcome)

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
        spec, run = job.spec, job.run
        views_done = (run / "teacher_views.safetensors").exists()
        o = spec["oracle"]
        if o["kind"] == "registry" and not views_done and not (run / "oracle.safetensors").exists():
            rec = self._retry(lambda: self.registry.get_oracle(o["id"]))
            data = self._retry(lambda: self.registry.download(rec.blob.sha256))
            worker._write_atomic(run / "oracle.safetensors", data)
            _write_json(run / "oracle.json", {"config": json.loads(rec.config_json or "{}"), "id": rec.id})
        if o["kind"] == "torchscript" and not views_done and not (run / o["file"]).exists():
            raise JobFailed(f"the TorchScript oracle copied into {run} when the job started is gone; start a new job")
        base = spec["base"]
        if base is not None:
            job.library_id = base["library_id"]
            if not (run / "base_library.safetensors").exists():
                data = self._retry(lambda: self.registry.download(base["library_sha256"]))
                worker._write_atomic(run / "base_library.safetensors", data)
                _write_json(run / "base_library.json", {"config": base["library_config"], "id": base["library_id"]})

    def _train(self, job: Job) -> str:
        """Run workers until one reports `trained` (returns "trained"), the job is stopped
        ("stopped"), the worker reports an error or dies too often (JobFailed)."""
        counts_file = job.run / "attempts.json"
        limit = max(1, self.settings.extractor_max_attempts)
        threads = self.settings.extractor_threads or _default_threads(self.settings.extractor_max_jobs)
        while True:
            if job.cancelled or self._closing.is_set():
                return "stopped"
            counts = _read_json(counts_file, {"spawns": 0, "deaths": 0, "last_exit": ""})
            if counts["deaths"] >= limit:
                raise JobFailed(f"the worker died {counts['deaths']} times (last: {counts['last_exit']}); "
                                "giving up (the run directory keeps its checkpoints)")
            try:
                device = resolve_device(job.spec["device"])
            except PoeError as e:
                raise JobFailed(f"device: {e}") from None
            counts["spawns"] += 1
            _write_json(counts_file, counts)
            receiver, sender = self._ctx.Pipe(duplex=False)
            proc = self._ctx.Process(target=worker.main, name=f"poe-extract-{job.id[:12]}", daemon=True,
                                     args=(job.id, json.dumps(job.spec), str(job.run), device, threads, sender))
            with job.lock:
                if job.cancelled or self._closing.is_set():
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
            if job.cancelled or self._closing.is_set():
                return "stopped"
            if proc.is_alive():  # closed its pipe but lives on: stop it before resuming
                self._stop_worker(job)
            counts["deaths"] += 1
            counts["last_exit"] = _exit_reason(proc.exitcode)
            _write_json(counts_file, counts)
            job.process = None
            log.warning("extractor: job %s: worker %s (%s); resuming from the run directory's checkpoints",
                        job.id, proc.pid, counts["last_exit"])
            self._on_progress(job, "phase", {"phase": job.progress.get("phase", "prepare"),
                                             "note": f"worker {counts['last_exit']}; resuming"})

    def _pump(self, job: Job, conn) -> str | None:
        """Handle the worker's messages until it reports `trained` or its pipe closes (None)."""
        while True:
            try:
                raw = conn.recv_bytes()
            except (EOFError, OSError):
                return None
            msg = json.loads(raw)
            event = msg.pop("event", "")
            if event in ("phase", "progress"):
                self._on_progress(job, event, msg)
            elif event == "library":
                self._register_library(job, msg)
            elif event == "expert":
                self._register_expert(job, msg)
            elif event == "trained":
                return "trained"
            elif event == "error":
                raise JobFailed(msg.get("message") or "the worker failed")

    def _on_progress(self, job: Job, event: str, msg: dict) -> None:
        now = time.monotonic()
        with self._lock:
            p = {"phase": msg.get("phase", job.progress.get("phase", ""))} if event == "phase" else dict(msg)
            total, done = msg.get("units_total"), msg.get("units_done")
            if total is None and event == "progress":
                total = job.progress.get("units_total")
            if total:
                p["units_total"] = total
            if total and done is not None:
                job.fraction = min(1.0, done / total)
                p["units_done"] = done
                if job.rate_origin is None:
                    job.rate_origin = (done, now)
                else:
                    d0, t0 = job.rate_origin
                    if done > d0 and now - t0 >= 0.5:
                        job.eta = (total - done) * (now - t0) / (done - d0)
            job.progress = p
            job.message = _describe(p) + (f" ({msg['note']})" if msg.get("note") else "")
            self._changed.notify_all()
            self._update_gauges()
            key = (p.get("phase"), p.get("expert"))
            due = key != job.last_written or now - job.last_write >= self.settings.extractor_progress_interval
            if due:
                job.last_written, job.last_write = key, now
        if due:
            self._record(job, progress=round(job.fraction, 4), stage=p.get("phase", ""), message=job.message)

    def _register_library(self, job: Job, msg: dict) -> None:
        data = (job.run / msg["file"]).read_bytes()
        o = job.spec["oracle"]
        oracle_id = o["id"] if o["kind"] == "registry" else None
        lib, created = self._retry(lambda: self.registry.register_library(
            f"{job.ref}/library", job.spec["hierarchy"]["dataset"], msg["config"], data, oracle_id=oracle_id,
            params=int(msg.get("params", 0)), metrics=msg.get("metrics") or {}, loss=msg.get("loss") or {}))
        job.library_id = lib.id
        log.info("extractor: job %s: library %s %s", job.id, lib.id, "registered" if created else "(known)")

    def _register_expert(self, job: Job, msg: dict) -> None:
        if job.library_id is None:
            raise JobFailed("the worker reported an expert before its library")
        data = (job.run / msg["file"]).read_bytes()
        metrics_ = msg.get("metrics") or {}
        acc = metrics_.get("val_acc")
        x, created = self._retry(lambda: self.registry.register_expert(
            job.library_id, int(job.spec["hierarchy"]["version"]), msg["task"], msg["class_ids"], msg["config"], data,
            params=int(msg.get("params", 0)), val_accuracy=float(acc) if acc is not None else None,
            metrics=metrics_, loss=msg.get("loss") or {}))
        job.expert_ids[msg["task"]] = x.id
        log.info("extractor: job %s: expert %d of %d (%s) -> expert %s%s", job.id, msg.get("index", 0),
                 msg.get("experts", 0), msg["task"], x.id, "" if created else " (known)")

    def _reused_expert(self, job: Job, task: str, x: dict) -> int:
        """A base pool's expert for the job's hierarchy: itself, or registered again (same bytes)
        under the job's hierarchy version when the base pool used another version."""
        version = int(job.spec["hierarchy"]["version"])
        if int(x["hierarchy_version"]) == version:
            return int(x["id"])
        data = self._retry(lambda: self.registry.download(x["sha256"]))
        acc = x.get("val_accuracy")
        e, _ = self._retry(lambda: self.registry.register_expert(
            job.library_id, version, task, x["class_ids"], x["config"], data, params=int(x.get("params", 0)),
            val_accuracy=acc, metrics=x.get("metrics") or {}, loss=x.get("loss") or {}))
        return e.id

    def _publish(self, job: Job) -> bool:
        spec = job.spec
        self._on_progress(job, "phase", {"phase": "publish"})
        with job.lock:
            if job.cancelled:
                return False
            missing = [t for t in spec["tasks"] if t not in job.expert_ids]
            if missing or job.library_id is None:
                raise JobFailed(f"the worker finished without registering: {', '.join(missing) or 'the library'}")
            ids = dict(job.expert_ids)
            base = spec["base"]
            for task, x in (base["reuse"] if base else {}).items():
                ids[task] = self._reused_expert(job, task, x)
            order = [t for t in spec["hierarchy"]["tasks"] if t in ids]
            info = {"dataset": spec["hierarchy"]["dataset"], "input_shape": spec["input_shape"],
                    "extraction": {"job": job.id, "data": spec["dataset"], "subset": spec["subset"],
                                   "train_images": spec["train_images"], "views": spec["views"],
                                   "library_schedule": spec["library_schedule"],
                                   "expert_schedule": spec["expert_schedule"], "ckd": spec["ckd"],
                                   "trained": spec["tasks"], "base_pool": base["pool"] if base else None,
                                   "reused": sorted(base["reuse"]) if base else [],
                                   "oracle": {k: v for k, v in spec["oracle"].items() if k != "config"}}}
            pv, created = self._retry(lambda: self.registry.publish_pool(
                spec["pool"]["name"], spec["pool"]["version"], job.library_id, [ids[t] for t in order], info=info,
                description=f"extraction job {job.id}", aliases=spec["pool"]["aliases"]))
            ref = f"{pv.name}@{pv.version}"
            rec = self._retry(lambda: self.registry.update_job(
                job.id, state="succeeded", progress=1.0, stage="done", message=f"published {ref}", pool=ref))
            with self._lock:
                job.record, job.finished, job.fraction, job.eta = rec, True, 1.0, 0.0
                job.progress = {"phase": "done"}
                job.message = f"published {ref}"
                self._changed.notify_all()
        log.info("extractor: job %s: %s %s with %d experts", job.id, "published" if created else "found published",
                 ref, len(order))
        return True

    def _fail(self, job: Job, message: str) -> None:
        log.warning("extractor: job %s failed: %s", job.id, message)
        phase = job.progress.get("phase", "")
        try:
            rec = self._retry(lambda: self.registry.update_job(job.id, state="failed", error=message, stage=phase,
                                                               message=f"failed: {message[:300]}"))
        except PoeError as e:
            log.error("extractor: job %s: could not record the failure in the registry: %s", job.id, e)
            rec = c.ExtractionJob()
            rec.CopyFrom(job.record)
            rec.state, rec.error = c.EXTRACTION_STATE_FAILED, message
        with self._lock:
            job.record, job.finished = rec, True
            job.progress, job.message = {"phase": "failed"}, f"failed: {message[:300]}"
            self._changed.notify_all()

    def _finish(self, job: Job, outcome: str | None) -> None:
        with self._lock:
            self._running.discard(job.id)
            if self._jobs.get(job.id) is job:
                del self._jobs[job.id]
            if outcome:
                self._counts[outcome] += 1
            job.finished = True
            self._changed.notify_all()
        if outcome == "cancelled":
            shutil.rmtree(job.run, ignore_errors=True)
        elif outcome == "succeeded":
            for name in BULKY:
                with contextlib.suppress(OSError):
                    (job.run / name).unlink()
            for ckpt in job.run.glob("*.ckpt"):
                with contextlib.suppress(OSError):
                    ckpt.unlink()
        self._schedule()

    def _stop_worker(self, job: Job, grace: float = 5.0) -> None:
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

    # -- registry writes -------------------------------------------------------------------------

    def _retry(self, call: Callable, budget: float = 60.0):
        """`call()`, retried with backoff while the registry is UNAVAILABLE (up to `budget` s)."""
        deadline, delay = time.monotonic() + budget, 0.25
        while True:
            try:
                return call()
            except Unavailable:
                if time.monotonic() + delay > deadline or self._closing.is_set():
                    raise
                log.info("extractor: registry unavailable; retrying in %.1f s", delay)
                time.sleep(delay)
                delay = min(delay * 2, 8.0)

    def _record(self, job: Job, critical: bool = False, **fields) -> None:
        """Update the job's registry record; progress updates are best effort."""
        def call() -> c.ExtractionJob:
            return self.registry.update_job(job.id, **fields)

        try:
            rec = self._retry(call) if critical else call()
        except PoeError as e:
            if critical:
                raise
            log.debug("extractor: job %s: progress not recorded: %s", job.id, e)
            return
        with self._lock:
            job.record = rec

    # -- cancel ------------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> c.ExtractionJob:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            rec = self.registry.get_job(job_id)
            if rec.state in TERMINAL:
                raise FailedPrecondition(f"job {job_id} is already {STATE_NAMES[rec.state]}")
            # Unfinished but not run by this extractor (not resumed yet): only the record changes.
            return self.registry.update_job(job_id, state="cancelled", message="cancelled")
        with job.lock:
            if job.finished or job.record.state in TERMINAL:
                raise FailedPrecondition(f"job {job_id} is already {STATE_NAMES.get(job.record.state, 'finished')}")
            rec = self.registry.update_job(job_id, state="cancelled", stage=job.progress.get("phase", ""),
                                           message="cancelled")
            job.cancelled = True
            proc = job.process
        log.info("extractor: job %s cancelled", job_id)
        queued = False
        with self._lock:
            job.record, job.progress, job.message = rec, {"phase": "cancelled"}, "cancelled"
            if job_id in self._queue:  # never started: nothing else will clean up after it
                self._queue.remove(job_id)
                self._jobs.pop(job_id, None)
                self._counts["cancelled"] += 1
                queued = True
            self._changed.notify_all()
            self._update_gauges()
        if queued:
            shutil.rmtree(job.run, ignore_errors=True)
        if proc is not None and proc.is_alive():
            proc.terminate()  # the supervisor reaps it and removes the run directory
        return rec

    # -- reading ---------------------------------------------------------------------------------

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

    def _live_record(self, job: Job) -> c.ExtractionJob:
        rec = c.ExtractionJob()
        rec.CopyFrom(job.record)
        if rec.state not in TERMINAL:
            rec.progress, rec.stage, rec.message = round(job.fraction, 4), job.progress.get("phase", ""), job.message
        return rec

    def snapshot(self, job_id: str) -> tuple[c.ExtractionJob, pb.ExtractionProgress]:
        """The job's record (with this extractor's live progress when it runs here) and progress."""
        if not job_id:
            from poe.engine.errors import field_error

            raise field_error("job_id", "required")
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None:
                return self._live_record(job), self._progress_pb(job)
        rec = self.registry.get_job(job_id)
        phase = {c.EXTRACTION_STATE_SUCCEEDED: "done", c.EXTRACTION_STATE_FAILED: "failed",
                 c.EXTRACTION_STATE_CANCELLED: "cancelled"}.get(rec.state, rec.stage or "queued")
        return rec, pb.ExtractionProgress(phase=phase, fraction=rec.progress, live=False)

    def watch(self, job_id: str, is_active: Callable[[], bool] = lambda: True,
              poll: float = 1.0) -> Iterator[tuple[c.ExtractionJob, pb.ExtractionProgress]]:
        """Snapshots on every change until the job is terminal (or the extractor shuts down)."""
        last = None
        while True:
            rec, progress = self.snapshot(job_id)
            key_progress = pb.ExtractionProgress()
            key_progress.CopyFrom(progress)
            key_progress.ClearField("elapsed_seconds")
            key_progress.ClearField("eta_seconds")
            key = (rec.state, rec.progress, rec.stage, rec.message, rec.error, rec.pool,
                   key_progress.SerializeToString(deterministic=True))
            if key != last:
                last = key
                yield rec, progress
            if rec.state in TERMINAL or self._stop.is_set() or not is_active():
                return
            with self._changed:
                self._changed.wait(timeout=poll)

    def poke(self) -> None:
        """Wake every Watch (a client went away)."""
        with self._changed:
            self._changed.notify_all()

    def list_jobs(self, state: int = 0, page_size: int = 0, page_token: str = "") -> tuple[list, str]:
        with translate_rpc_errors(f"registry at {self.registry.target}"):
            resp = self.registry.stub.ListExtractionJobs(r.ListExtractionJobsRequest(
                state=state, page_size=page_size, page_token=page_token), timeout=self.registry.timeout)
        jobs = []
        with self._lock:
            for rec in resp.jobs:
                job = self._jobs.get(rec.id)
                jobs.append(self._live_record(job) if job is not None else rec)
        return jobs, resp.next_page_token

    def worker_pid(self, job_id: str) -> int | None:
        """The pid of the job's worker process while it runs here (for operators and tests)."""
        with self._lock:
            job = self._jobs.get(job_id)
            proc = job.process if job is not None else None
            return proc.pid if proc is not None and proc.is_alive() else None

    def _update_gauges(self) -> None:
        with self._lock:
            running = [self._jobs[j] for j in self._running if j in self._jobs]
            metrics.EXTRACTION_JOBS.labels("queued").set(len(self._queue))
            metrics.EXTRACTION_JOBS.labels("running").set(len(running))
            for state in ("succeeded", "failed", "cancelled"):
                metrics.EXTRACTION_JOBS.labels(state).set(self._counts[state])
            metrics.EXTRACTION_PROGRESS.set(sum(j.fraction for j in running) / len(running) if running else 0.0)
