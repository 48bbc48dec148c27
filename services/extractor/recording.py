"""Everything the extractor writes to the registry about a job, and the progress text.

- The job record: state changes (retried while the registry is UNAVAILABLE) and progress (best
  effort, at most every `POE_EXTRACTOR_PROGRESS_INTERVAL` s and on every phase or expert change;
  the in-memory progress that Watch streams follows every worker report).
- Results as the worker reports them: the library and each expert are registered at once
  (content-addressed and idempotent, so a resumed job registers the same records again).
- The pool version: one atomic PublishPool after the last expert, under the job's lock, so a job
  cancelled before its publish never publishes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from poe.client.registry import RegistryClient
from poe.engine.config import Settings
from poe.engine.errors import FailedPrecondition, PoeError, Unavailable
from poe.v1 import common_pb2 as c
from poe_services.extractor.jobs import Job, JobBoard, JobFailed
from poe_services.extractor.spec import ReusedExpert

log = logging.getLogger(__name__)

PHASE_TEXT = {"queued": "queued", "prepare": "preparing: loading the data set and the oracle",
              "teacher": "teacher: the oracle labels the fixed views of the training set",
              "publish": "publishing the pool version"}


def describe(p: dict) -> str:
    """The job's message for a progress report: phase, expert k of n, epoch, step, loss."""
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
    return PHASE_TEXT.get(phase, phase)


class Recorder:
    """Registry writes of the jobs on `board`; gives up retrying once `closing` is set."""

    def __init__(self, settings: Settings, registry: RegistryClient, board: JobBoard, closing: threading.Event):
        self.settings = settings
        self.registry = registry
        self.board = board
        self._closing = closing

    # -- calls -------------------------------------------------------------------------------------

    def retry(self, call: Callable, budget: float = 60.0):
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

    def record(self, job: Job, critical: bool = False, **fields) -> None:
        """Update the job's registry record; progress updates are best effort."""
        def call() -> c.ExtractionJob:
            return self.registry.update_job(job.id, **fields)

        try:
            rec = self.retry(call) if critical else call()
        except FailedPrecondition as e:
            if critical:
                raise
            # The registry refuses to change a finished job: it was cancelled elsewhere (through
            # another extractor, or the registry's own API). Stop it as a cancel here would.
            log.info("extractor: job %s was finished elsewhere (%s); stopping it", job.id, e)
            with job.lock:
                job.cancelled = True
            self.board.notify()
            return
        except PoeError as e:
            if critical:
                raise
            log.debug("extractor: job %s: progress not recorded: %s", job.id, e)
            return
        with self.board.lock:
            job.record = rec

    # -- progress ----------------------------------------------------------------------------------

    def progress(self, job: Job, event: str, msg: dict) -> None:
        """A `phase` or `progress` report: the live progress, fraction and ETA at once, the registry
        when the phase or expert changed or the progress interval has passed."""
        now = time.monotonic()
        with self.board.lock:
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
            job.message = describe(p) + (f" ({msg['note']})" if msg.get("note") else "")
            self.board.changed.notify_all()
            self.board.update_gauges()
            key = (p.get("phase"), p.get("expert"))
            due = key != job.last_written or now - job.last_write >= self.settings.extractor_progress_interval
            if due:
                job.last_written, job.last_write = key, now
        if due:
            self.record(job, progress=round(job.fraction, 4), stage=p.get("phase", ""), message=job.message)

    # -- results -----------------------------------------------------------------------------------

    def register_library(self, job: Job, msg: dict) -> None:
        spec = job.spec
        data = (job.run / msg["file"]).read_bytes()
        lib, created = self.retry(lambda: self.registry.register_library(
            f"{job.ref}/library", spec.hierarchy_dataset, msg["config"], data, oracle_id=spec.registered_oracle_id,
            params=int(msg.get("params", 0)), metrics=msg.get("metrics") or {}, loss=msg.get("loss") or {}))
        job.library_id = lib.id
        log.info("extractor: job %s: library %s %s", job.id, lib.id, "registered" if created else "(known)")

    def register_expert(self, job: Job, msg: dict) -> None:
        if job.library_id is None:
            raise JobFailed("the worker reported an expert before its library")
        data = (job.run / msg["file"]).read_bytes()
        metrics_ = msg.get("metrics") or {}
        acc = metrics_.get("val_acc")
        x, created = self.retry(lambda: self.registry.register_expert(
            job.library_id, job.spec.hierarchy_version, msg["task"], msg["class_ids"], msg["config"], data,
            params=int(msg.get("params", 0)), val_accuracy=float(acc) if acc is not None else None,
            metrics=metrics_, loss=msg.get("loss") or {}))
        job.expert_ids[msg["task"]] = x.id
        log.info("extractor: job %s: expert %d of %d (%s) -> expert %s%s", job.id, msg.get("index", 0),
                 msg.get("experts", 0), msg["task"], x.id, "" if created else " (known)")

    def _reused_expert(self, job: Job, task: str, x: ReusedExpert) -> int:
        """A base pool's expert for the job's hierarchy: itself, or registered again (same bytes)
        under the job's hierarchy version when the base pool used another version."""
        version = job.spec.hierarchy_version
        if int(x.hierarchy_version) == version:
            return int(x.id)
        data = self.retry(lambda: self.registry.download(x.sha256))
        e, _ = self.retry(lambda: self.registry.register_expert(
            job.library_id, version, task, x.class_ids, x.config, data, params=int(x.params),
            val_accuracy=x.val_accuracy, metrics=x.metrics or {}, loss=x.loss or {}))
        return e.id

    def publish(self, job: Job) -> bool:
        """PublishPool and SUCCEEDED; False when the job was cancelled first."""
        spec = job.spec
        self.progress(job, "phase", {"phase": "publish"})
        with job.lock:
            if job.cancelled:
                return False
            missing = [t for t in spec.tasks if t not in job.expert_ids]
            if missing or job.library_id is None:
                raise JobFailed(f"the worker finished without registering: {', '.join(missing) or 'the library'}")
            ids = dict(job.expert_ids)
            base = spec.base
            for task, x in (base.reuse if base else {}).items():
                ids[task] = self._reused_expert(job, task, x)
            order = [t for t in spec.hierarchy["tasks"] if t in ids]
            stored = spec.to_dict()  # the pool's info quotes the spec as stored with the job
            info = {"dataset": spec.hierarchy_dataset, "input_shape": spec.input_shape,
                    "extraction": {"job": job.id, "data": spec.dataset, "subset": spec.subset,
                                   "train_images": spec.train_images, "views": spec.views,
                                   "library_schedule": stored["library_schedule"],
                                   "expert_schedule": stored["expert_schedule"], "ckd": stored["ckd"],
                                   "trained": spec.tasks, "base_pool": base.pool if base else None,
                                   "reused": sorted(base.reuse) if base else [],
                                   "oracle": {k: v for k, v in stored["oracle"].items() if k != "config"}}}
            pv, created = self.retry(lambda: self.registry.publish_pool(
                spec.pool.name, spec.pool.version, job.library_id, [ids[t] for t in order], info=info,
                description=f"extraction job {job.id}", aliases=spec.pool.aliases))
            ref = f"{pv.name}@{pv.version}"
            rec = self.retry(lambda: self.registry.update_job(
                job.id, state="succeeded", progress=1.0, stage="done", message=f"published {ref}", pool=ref))
            with self.board.lock:
                job.record, job.finished, job.fraction, job.eta = rec, True, 1.0, 0.0
                job.progress = {"phase": "done"}
                job.message = f"published {ref}"
                self.board.changed.notify_all()
        log.info("extractor: job %s: %s %s with %d experts", job.id, "published" if created else "found published",
                 ref, len(order))
        return True

    def fail(self, job: Job, message: str) -> None:
        """FAILED with `message` as the job's error (kept in memory when the registry cannot be reached)."""
        log.warning("extractor: job %s failed: %s", job.id, message)
        phase = job.progress.get("phase", "")
        try:
            rec = self.retry(lambda: self.registry.update_job(job.id, state="failed", error=message, stage=phase,
                                                              message=f"failed: {message[:300]}"))
        except PoeError as e:
            log.error("extractor: job %s: could not record the failure in the registry: %s", job.id, e)
            rec = c.ExtractionJob()
            rec.CopyFrom(job.record)
            rec.state, rec.error = c.EXTRACTION_STATE_FAILED, message
        with self.board.lock:
            job.record, job.finished = rec, True
            job.progress, job.message = {"phase": "failed"}, f"failed: {message[:300]}"
            self.board.changed.notify_all()
