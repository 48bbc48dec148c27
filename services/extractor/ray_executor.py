"""The executor: an extraction job's stages as Ray tasks.

The extractor process is the Ray driver: it connects to the cluster at POE_RAY_ADDRESS, or starts a
local Ray with this machine's cores (on loopback) when the first job needs it. For each running job
its driver thread (`driver.py`) places the inputs in the run directory, then `RayRun` submits the
stages of `stages.py` as Ray tasks, follows them, and hands their reports (phase, progress,
library, expert) to the driver, which registers the library and experts and publishes the pool.

The stages on Ray (`POE_RAY_WORKERS` = W, 0: the cluster's CPUs over `POE_RAY_CPUS_PER_TASK`):

- Teacher views: the driver makes the view images (cheap), W tasks compute the oracle's logits of
  contiguous shards, which the driver joins in order: the same logits as one pass (stages.shards).
- Library (KD): one task, resumable from its epoch checkpoints; or, with library workers > 1
  (POE_RAY_LIBRARY_WORKERS or the job's library_workers), data-parallel on Ray Train
  (`ray_train.py`).
- Library features: W shard tasks, joined into one object that every expert task on a node reads
  from Ray's object store without a copy.
- Experts: one task per primitive task, at most W at once.

No disk is shared: tasks get their inputs from the object store and return results as bytes
(safetensors); the driver writes them into the run directory (for resume) and registers them in
the registry. Each job has a `JobChannel` actor through which its tasks report progress, send
their epoch checkpoints and training-log lines to the driver, and fetch the last checkpoint when
they start, so a task that is retried or resumed loses at most the epoch in progress.

- A worker process that dies (OOM kill, SIGKILL, a lost node) is retried by Ray, up to
  `POE_EXTRACTOR_MAX_ATTEMPTS` attempts per task; an exception in a task fails the job at once.
- Cancel and extractor shutdown stop every task (`ray.cancel(force=True)`); a shutdown leaves the
  job RUNNING and the next extractor resumes it: finished stages and experts are read from the
  run directory, unfinished ones resume from the checkpoints kept there.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from poe.engine.config import Settings
from poe.engine.errors import PoeError

# This module is imported by every Ray worker process that runs one of its tasks or the job's
# channel actor: it imports nothing heavy (torch, gRPC) at its top, so the actor starts in a second.
if TYPE_CHECKING:
    import numpy as np
    import torch

    from poe_services.extractor.spec import JobSpec

log = logging.getLogger(__name__)

# Ray turns 127.0.0.1 into the machine's reachable address unless it runs as a single-node cluster;
# with this variable (read by every Ray process it starts) a local Ray binds and talks on loopback only.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
POLL = 0.2  # seconds between looks at the tasks, the channel and cancel
REPORT_INTERVAL = 0.2  # seconds between a task's progress reports (the last step of an epoch always)
Emit = Callable[[dict], None]


def job_failed(message: str) -> PoeError:
    from poe_services.extractor.jobs import JobFailed

    return JobFailed(message)


class Stopped(Exception):  # noqa: N818 - control flow, not an error
    """The job was cancelled or the extractor is stopping; its tasks were cancelled."""


def start_local_ray(num_cpus: int, runtime_env: dict | None = None) -> None:
    """A one-node Ray on this machine, on loopback only, without the dashboard."""
    os.environ[LOOPBACK_ENV] = "0"
    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # in this process too, when ray was imported earlier
    ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=False, runtime_env=runtime_env)


def usable_cores() -> int:
    try:
        return int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))
    except (ValueError, AttributeError):
        return os.cpu_count() or 1


class RayCluster:
    """The extractor's connection to Ray, made when the first job needs it: POE_RAY_ADDRESS, else a
    local Ray with this machine's cores (shut down with the extractor). A Ray this process started
    before (a host or a test) is used as it is."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._owned = False

    def connect(self) -> None:
        with self._lock:
            import ray

            if ray.is_initialized():
                return
            address = self.settings.ray_address
            runtime_env = json.loads(self.settings.ray_runtime_env) if self.settings.ray_runtime_env else None
            try:
                if address:
                    ray.init(address=address, runtime_env=runtime_env)
                else:
                    start_local_ray(usable_cores(), runtime_env)
                    self._owned = True
            except Exception as e:
                where = f"the Ray cluster at {address}" if address else "a local Ray"
                raise job_failed(f"cannot start or reach {where}: {type(e).__name__}: {e}") from None
            log.info("extractor: Ray %s (%s)", "connected" if address else "started",
                     ", ".join(f"{k} {v:g}" for k, v in sorted(ray.cluster_resources().items())
                               if k in ("CPU", "GPU")))

    def workers(self, resources) -> int:
        """Tasks per stage: the job's or POE_RAY_WORKERS, else as many as the cluster's CPUs hold."""
        if resources.workers:
            return resources.workers
        import ray

        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        return max(1, int(cpus // max(resources.cpus_per_task, 0.01)))

    def close(self) -> None:
        with self._lock:
            if self._owned:
                import ray

                ray.shutdown()
                self._owned = False


# -- the job's channel (a Ray actor) ---------------------------------------------------------------

class JobChannel:
    """One job's mailbox between its tasks and the driver: progress reports, training-log lines and
    the last epoch checkpoint of every stage (seeded by the driver from the run directory)."""

    def __init__(self, checkpoints: dict[str, bytes]):
        self._events: list[dict] = []
        self._checkpoints = dict(checkpoints)

    def report(self, event: dict) -> None:
        self._events.append(event)

    def checkpoint(self, stage: str, data: bytes | None, log_lines: list[str]) -> None:
        if data is not None:
            self._checkpoints[stage] = data
        self._events.append({"event": "checkpoint", "stage": stage, "data": data, "log": log_lines})

    def latest(self, stage: str) -> bytes | None:
        return self._checkpoints.get(stage)

    def drain(self) -> list[dict]:
        events, self._events = self._events, []
        return events


class TaskRelay:
    """Inside a task: its progress reports (throttled) and checkpoints (with the new log lines), sent
    to the job's channel; the stage's last checkpoint is restored into `workdir` first."""

    def __init__(self, channel, stage: str, workdir: Path, **labels):
        import ray

        self.channel, self.stage, self.workdir, self.labels = channel, stage, workdir, labels
        self._last = 0.0
        self._log_offset = 0
        data = ray.get(channel.latest.remote(stage))
        if data is not None:
            (workdir / f"{stage}.ckpt").write_bytes(data)
        channel.report.remote({"event": "started", "stage": stage, "pid": os.getpid(),
                               "node": ray.get_runtime_context().get_node_id(), "resumed": data is not None,
                               **labels})

    def progress(self, p: dict) -> None:
        now = time.monotonic()
        if now - self._last >= REPORT_INTERVAL or int(p["step"]) >= int(p["steps"]):
            self._last = now
            self.channel.report.remote({"event": "progress", "stage": self.stage, **self.labels,
                                        **{k: p[k] for k in ("epoch", "epochs", "step", "steps")},
                                        "loss": float(p["loss"])})

    def _new_log_lines(self) -> list[str]:
        path = self.workdir / "train.log"
        if not path.exists():
            return []
        with open(path, "rb") as f:
            f.seek(self._log_offset)
            data = f.read()
        self._log_offset += len(data)
        return data.decode().splitlines()

    def checkpoint(self, path: Path) -> None:
        import ray

        # Waited for: the driver has it before the task's result, so it never overwrites a later state.
        ray.get(self.channel.checkpoint.remote(self.stage, path.read_bytes(), self._new_log_lines()))

    def flush(self) -> None:
        import ray

        lines = self._new_log_lines()
        if lines:
            ray.get(self.channel.checkpoint.remote(self.stage, None, lines))


# -- the tasks (plain functions, wrapped by ray.remote when submitted) -----------------------------

def warm_worker() -> int:
    """A task that makes a Ray worker process import what the stage tasks import (torch, the engine)
    and take a first optimizer step (torch._dynamo), so that the first real task does not pay for it;
    returns its pid."""
    import torch

    from poe_services.extractor import stages  # noqa: F401

    layer = torch.nn.Linear(2, 1)
    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    return os.getpid()


def _setup(threads: int) -> None:
    import torch

    os.environ["POE_NO_PROGRESS"] = "1"
    torch.set_num_threads(max(1, threads))


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over an array from the object store, without a copy (such arrays are read-only,
    and nothing here writes to them)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _spec(spec_dict: dict) -> JobSpec:
    from poe_services.extractor.spec import JobSpec

    return JobSpec.from_dict(spec_dict)


def teacher_shard(spec_dict: dict, device: str, threads: int, oracle: bytes, images: np.ndarray,
                  start: int, stop: int) -> np.ndarray:
    """The oracle's logits of images[start:stop]."""
    from poe_services.extractor import stages

    _setup(threads)
    spec = _spec(spec_dict)
    module, bf16 = stages.load_oracle(spec, oracle, device)
    return stages.teacher_logits(module, _tensor(images[start:stop]), device, bf16).numpy()


def library_task(spec_dict: dict, device: str, threads: int, channel, student_config: dict,
                 images: np.ndarray, logits: np.ndarray, test) -> tuple[bytes, dict]:
    """KD of the student: (student.safetensors bytes, student.json)."""
    from poe.engine.pool import wrn_config_from_dict
    from poe.engine.train import TeacherViews
    from poe_services.extractor import stages

    _setup(threads)
    spec = _spec(spec_dict)
    with tempfile.TemporaryDirectory(prefix="poe-ray-library-") as tmp:
        workdir = Path(tmp)
        relay = TaskRelay(channel, "library", workdir)
        stages.train_student(workdir, TeacherViews(_tensor(images), _tensor(logits)), test,
                             wrn_config_from_dict(student_config), spec, device, progress=relay.progress,
                             on_checkpoint=relay.checkpoint)
        relay.flush()
        return stages.student_files(workdir)


def features_shard(library_config: dict, library: bytes, device: str, threads: int, images: np.ndarray,
                   start: int, stop: int) -> np.ndarray:
    """The library's fp16 features of images[start:stop]."""
    from poe.engine.pool import wrn_config_from_dict
    from poe_services.extractor import stages

    _setup(threads)
    module = stages.library_from_bytes(wrn_config_from_dict(library_config), library)
    return stages.library_features(module, _tensor(images[start:stop]), device).numpy()


def join_shards(*parts: np.ndarray) -> np.ndarray:
    import numpy as np

    return np.concatenate(parts)


def expert_task(spec_dict: dict, device: str, threads: int, channel, task: str, class_ids: list[int],
                library_config: dict, library: bytes, images: np.ndarray, logits: np.ndarray,
                features: np.ndarray, test) -> tuple[bytes, dict]:
    """CKD of the expert of `task` and its evaluation: (safetensors bytes, metadata)."""
    from poe.engine.pool import wrn_config_from_dict
    from poe.engine.train import TeacherViews
    from poe_services.extractor import stages

    _setup(threads)
    spec = _spec(spec_dict)
    module = stages.library_from_bytes(wrn_config_from_dict(library_config), library)
    stage = f"expert-{task}"
    with tempfile.TemporaryDirectory(prefix="poe-ray-expert-") as tmp:
        workdir = Path(tmp)
        relay = TaskRelay(channel, stage, workdir, task=task)
        result = stages.train_expert(workdir, module, spec, task, class_ids,
                                     TeacherViews(_tensor(images), _tensor(logits)), _tensor(features), test,
                                     device, progress=relay.progress, on_checkpoint=relay.checkpoint)
        relay.flush()
        return result


@functools.cache
def _remote(fn: Callable):
    import ray

    return ray.remote(fn)


# -- the driver --------------------------------------------------------------------------------------

class RayRun:
    """One job's stages on Ray, driven from the calling thread. `emit(msg)` gets the reports a local
    worker would send (`event`: phase, progress, library, expert); `stopped()` is polled, and when
    it turns true every task is cancelled and Stopped raised. `timings` holds each stage's seconds."""

    def __init__(self, spec: JobSpec, run: Path, cluster: RayCluster, settings: Settings, emit: Emit,
                 stopped: Callable[[], bool] = lambda: False):
        self.spec, self.run, self.cluster, self.settings = spec, run, cluster, settings
        self.emit, self.stopped = emit, stopped
        self.spec_dict = spec.to_dict()
        self.resources = self.job_resources(spec, settings)
        self.device = self.task_device(spec, settings)
        self.threads = max(1, int(self.resources.cpus_per_task))
        self.timings: dict[str, float] = {}
        self.pids: dict[str, int] = {}  # stage -> pid of the worker process that runs it now
        self._inflight: dict[Any, str] = {}  # object ref -> stage
        self._done_units: dict[str, int] = {}
        self._prepared = None
        self._ddp = None  # the library's data-parallel run while it trains
        self.channel = None

    @staticmethod
    def job_resources(spec: JobSpec, settings: Settings):
        """The job's Ray resources, the extractor's settings where the job leaves them at 0 (workers
        may stay 0: as many as the cluster's CPUs hold)."""
        from dataclasses import replace

        r = spec.resources
        return replace(r, workers=r.workers or settings.ray_workers,
                       cpus_per_task=r.cpus_per_task or settings.ray_cpus_per_task,
                       gpus_per_task=r.gpus_per_task or settings.ray_gpus_per_task,
                       library_workers=r.library_workers or settings.ray_library_workers or 1)

    @staticmethod
    def task_device(spec: JobSpec, settings: Settings) -> str:
        """The device the tasks train on: a GPU only where Ray gives them one."""
        gpus = RayRun.job_resources(spec, settings).gpus_per_task > 0
        if spec.device.startswith("cuda") and not gpus:
            raise job_failed(f"device {spec.device}: Ray tasks get no GPU (set POE_RAY_GPUS_PER_TASK or the "
                             "job's ray_gpus_per_task)")
        if spec.device == "auto":
            return "cuda" if gpus else "cpu"
        return spec.device

    # -- submitting and following tasks --------------------------------------------------------------

    def _options(self, stage: str, gpu: bool = True) -> dict:
        return {"num_cpus": self.resources.cpus_per_task,
                "num_gpus": self.resources.gpus_per_task if gpu else 0,
                "max_retries": max(0, self.settings.extractor_max_attempts - 1), "retry_exceptions": False,
                "name": f"poe-{stage}"}

    def _submit(self, fn: Callable, stage: str, *args, gpu: bool = True):
        ref = _remote(fn).options(**self._options(stage, gpu)).remote(*args)
        self._inflight[ref] = stage
        return ref

    def _next_ready(self, refs: list) -> list:
        """Wait (polling cancel and the channel) until some of `refs` finish; returns those."""
        import ray

        while True:
            if self.stopped():
                self.cancel()
                raise Stopped()
            ready, _ = ray.wait(refs, num_returns=1, timeout=POLL)
            self._pump()
            if ready:
                return ready

    def _result(self, ref):
        """A finished task's result; its failure becomes JobFailed (the task's own message for a
        PoeError, the exception's type and message otherwise, with the traceback in error.log)."""
        import ray
        from ray import exceptions as rex

        stage = self._inflight.pop(ref)
        self.pids.pop(stage, None)
        try:
            return ray.get(ref)
        except rex.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, PoeError):
                raise job_failed(str(cause)) from None
            log.error("extractor: Ray task %s failed:\n%s", stage, e)
            with contextlib.suppress(OSError):
                (self.run / "error.log").write_text(str(e))
            what = f"{type(cause).__name__}: {cause}" if cause is not None else str(e).splitlines()[0]
            raise job_failed(f"{stage}: {what}") from None
        except (rex.WorkerCrashedError, rex.NodeDiedError, rex.OutOfMemoryError, rex.ObjectLostError,
                rex.OwnerDiedError) as e:
            attempts = max(1, self.settings.extractor_max_attempts)
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise job_failed(f"{stage}: the Ray worker died {attempts} time(s) ({type(e).__name__}: {first})") from None
        except rex.RayError as e:
            raise job_failed(f"{stage}: Ray: {type(e).__name__}: {str(e).strip()[:300]}") from None

    def _gather(self, refs: list) -> list:
        """The results of `refs`, in their order."""
        results = {}
        pending = list(refs)
        while pending:
            for ref in self._next_ready(pending):
                pending.remove(ref)
                results[ref] = self._result(ref)
        return [results[r] for r in refs]

    def cancel(self) -> None:
        """Stop every task of the job now (their worker processes are killed) and its channel."""
        import ray

        if self._ddp is not None:  # Ray Train's own abort frees its workers' placement group too
            ddp, self._ddp = self._ddp, None
            with contextlib.suppress(Exception):
                ddp.cancel()
            self._inflight.pop(ddp.ref, None)
            ddp.close()
        refs = list(self._inflight)
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=5)
        self._inflight.clear()
        self.pids.clear()
        if self.channel is not None:
            with contextlib.suppress(Exception):
                ray.kill(self.channel)
            self.channel = None

    # -- what the tasks report ---------------------------------------------------------------------

    def _pump(self) -> None:
        import ray

        if self.channel is None:
            return
        running = set(self._inflight.values())
        try:
            events = ray.get(self.channel.drain.remote())
        except ray.exceptions.RayError as e:  # its worker process died: progress and checkpoints are lost
            raise job_failed(f"the job's Ray channel failed ({type(e).__name__}: {str(e).strip()[:200]})") from None
        for event in events:
            kind = event.get("event")
            if kind in ("started", "progress") and event["stage"] not in running:
                continue  # a late report of a task that has finished (or was cancelled)
            if kind == "started":
                self.pids[event["stage"]] = int(event["pid"])
            elif kind == "checkpoint":
                if event["data"] is not None:
                    from poe_services.extractor.stages import write_atomic

                    write_atomic(self.run / f"{event['stage']}.ckpt", event["data"])
                if event["log"]:
                    with open(self.run / "train.log", "a") as f:
                        f.write("".join(line + "\n" for line in event["log"]))
            elif kind == "progress":
                self._progress(event)

    def _progress(self, p: dict) -> None:
        prepared, stage = self._prepared, p["stage"]
        self._done_units[stage] = (int(p["epoch"]) - 1) * int(p["steps"]) + int(p["step"])
        done = sum(self._done_units.values())
        msg = {"event": "progress", "epoch": p["epoch"], "epochs": p["epochs"], "step": p["step"],
               "steps": p["steps"], "loss": p["loss"], "units_done": done, "units_total": prepared.units_total}
        if stage == "library":
            msg.update(phase="library", expert=0, experts=0, task="")
        else:
            msg.update(phase="experts", expert=prepared.tasks.index(p["task"]) + 1, experts=len(prepared.tasks),
                       task=p["task"])
        self.emit(msg)

    # -- the job -----------------------------------------------------------------------------------

    def run_all(self) -> None:
        """Every stage; the library and the experts are reported as they finish. Raises JobFailed or
        Stopped; finished results stay in the run directory either way."""
        import ray

        from poe_services.extractor import stages

        self.cluster.connect()
        spec, run = self.spec, self.run
        workers = self.cluster.workers(self.resources)
        prepared = self._prepared = stages.prepare(spec)
        checkpoints = {p.stem: p.read_bytes() for p in run.glob("*.ckpt")}
        self.channel = _remote(JobChannel).options(num_cpus=0).remote(checkpoints)
        try:
            count, images, logits = self._teacher_views(prepared, workers)
            test = ray.put(prepared.test)
            library_config, library_bytes = self._library(prepared, images, logits, test)
            self._done_units = {"library": prepared.library_units}
            todo = [t for t in prepared.tasks if not stages.expert_done(run, t)]
            for k, task in enumerate(prepared.tasks, 1):
                if task not in todo:
                    self._done_units[f"expert-{task}"] = prepared.expert_units
                    self.emit({"event": "expert", **stages.expert_report(run, task, k, len(prepared.tasks))})
            if todo:
                features = self._features(library_config, library_bytes, count, images, workers)
                self._experts(prepared, todo, library_config, library_bytes, images, logits, features, test,
                              workers)
        finally:
            self.cancel()  # nothing is left running, whatever happened
            if self.timings:
                log.info("extractor: %s: Ray stages (%d worker(s)): %s", run.name, workers,
                         ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items()))

    def _teacher_views(self, prepared, workers: int):
        """(number of views, object refs of their images and of the oracle's logits): computed in
        shards, or read back from the run directory."""
        import ray

        from poe.engine.train import TeacherViews
        from poe_services.extractor import stages

        views = stages.load_views(self.run)
        if views is None:
            t0 = time.monotonic()
            self.emit({"event": "phase", "phase": "teacher", "units_total": prepared.units_total})
            images = stages.view_images(prepared.train, self.spec.views)
            images_ref, oracle = ray.put(images.numpy()), ray.put(stages.read_oracle(self.spec, self.run))
            parts = [self._submit(teacher_shard, f"teacher-{i}", self.spec_dict, self.device, self.threads, oracle,
                                  images_ref, a, b)
                     for i, (a, b) in enumerate(stages.shards(len(images), workers, stages.TEACHER_BATCH))]
            import torch

            logits = torch.cat([_tensor(x) for x in self._gather(parts)])
            views = TeacherViews(images, logits)
            stages.save_views(self.run, views)
            self.timings["teacher"] = time.monotonic() - t0
            return len(views), images_ref, ray.put(logits.numpy())
        return len(views), ray.put(views.images.numpy()), ray.put(views.logits.numpy())

    def _library(self, prepared, images, logits, test) -> tuple[dict, bytes]:
        """(config, safetensors bytes) of the library: the base pool's, or trained here (once)."""
        from poe.engine.pool import config_to_dict, library_state_from_student, tensors_to_bytes
        from poe_services.extractor import stages

        spec, run = self.spec, self.run
        if spec.base is not None:
            stages.load_base_library(spec, run)  # checks its sha256 and config once, here
            return json.loads((run / "base_library.json").read_text())["config"], \
                (run / "base_library.safetensors").read_bytes()
        if not stages.student_done(run):
            t0 = time.monotonic()
            self.emit({"event": "phase", "phase": "library", "units_total": prepared.units_total})
            cfg = stages.student_config(spec, prepared.train)
            if self.resources.library_workers > 1:
                data, meta = self._library_ddp(config_to_dict(cfg), images, logits, test)
            else:
                ref = self._submit(library_task, "library", self.spec_dict, self.device, self.threads, self.channel,
                                   config_to_dict(cfg), images, logits, test)
                data, meta = self._gather([ref])[0]
            stages.save_student(run, data, meta)
            self.timings["library"] = time.monotonic() - t0
        student = stages.load_student(run)
        _library, report = stages.save_library(run, student, spec)
        self.emit({"event": "library", **report})
        return config_to_dict(student.cfg), tensors_to_bytes(library_state_from_student(student))

    def _library_ddp(self, student_config: dict, images, logits, test) -> tuple[bytes, dict]:
        """The student's KD data-parallel on Ray Train (`ray_train.py`), followed like a task."""
        from poe_services.extractor.ray_train import LibraryDDP

        r = self.resources
        self._ddp = LibraryDDP(self.spec_dict, self.device, self.threads, self.channel, student_config, images,
                               logits, test, workers=r.library_workers, cpus_per_worker=r.cpus_per_task,
                               gpus_per_worker=r.gpus_per_task,
                               max_failures=max(0, self.settings.extractor_max_attempts - 1))
        ref = self._ddp.start()
        self._inflight[ref] = "library"
        try:
            result = self._gather([ref])[0]
            if result is None:  # Ray Train aborted the run without this driver asking
                raise job_failed("library: the data-parallel run was aborted")
            return result
        finally:
            if self._ddp is not None:
                self._ddp.close()
                self._ddp = None

    def _features(self, library_config: dict, library: bytes, count: int, images, workers: int):
        """An object ref of the library's features of every view (shards joined in the object store)."""
        import ray

        from poe_services.extractor import stages

        t0 = time.monotonic()
        library_ref = ray.put(library)
        parts = [self._submit(features_shard, f"features-{i}", library_config, library_ref, self.device,
                              self.threads, images, a, b)
                 for i, (a, b) in enumerate(stages.shards(count, workers, stages.FEATURE_BATCH))]
        joined = self._submit(join_shards, "features", *parts, gpu=False)
        self._gather([joined])
        for ref in parts:  # finished before the join; nothing to wait for
            self._inflight.pop(ref, None)
        self.timings["features"] = time.monotonic() - t0
        return joined

    def _experts(self, prepared, todo: list[str], library_config: dict, library: bytes, images, logits,
                 features, test, workers: int) -> None:
        """One task per expert, at most `workers` at once; each is saved and reported as it finishes."""
        import ray

        from poe_services.extractor import stages

        t0 = time.monotonic()
        library_ref = ray.put(library)
        waiting = list(todo)
        running: dict[Any, str] = {}
        while waiting or running:
            while waiting and len(running) < workers:
                task = waiting.pop(0)
                ref = self._submit(expert_task, f"expert-{task}", self.spec_dict, self.device, self.threads,
                                   self.channel, task, list(prepared.hierarchy.tasks[task]), library_config,
                                   library_ref, images, logits, features, test)
                running[ref] = task
                self.emit({"event": "progress", "phase": "experts", "expert": prepared.tasks.index(task) + 1,
                           "experts": len(prepared.tasks), "task": task, "epoch": 0,
                           "epochs": self.spec.expert_schedule.epochs, "step": 0, "steps": prepared.expert_steps,
                           "loss": 0.0, "units_done": sum(self._done_units.values()),
                           "units_total": prepared.units_total})
            for ref in self._next_ready(list(running)):
                task = running.pop(ref)
                data, meta = self._result(ref)
                stages.save_expert(self.run, task, data, meta)
                self._done_units[f"expert-{task}"] = prepared.expert_units
                k = prepared.tasks.index(task) + 1
                self.emit({"event": "expert", **stages.expert_report(self.run, task, k, len(prepared.tasks))})
        self.timings["experts"] = time.monotonic() - t0


class RayExecutor:
    """Runs jobs' stages on Ray for the job driver (one RayRun per running job)."""

    def __init__(self, settings: Settings):
        if not settings.ray_cpus_per_task > 0:  # Ray would run any number of CPU-less tasks at once
            from poe.engine.errors import InvalidArgument

            raise InvalidArgument(f"POE_RAY_CPUS_PER_TASK: expected a number > 0, got {settings.ray_cpus_per_task:g}")
        self.settings = settings
        self.cluster = RayCluster(settings)
        self._runs: dict[str, RayRun] = {}
        self._lock = threading.Lock()

    def train(self, job, emit: Emit, stopped: Callable[[], bool]) -> str:
        """"trained" once every stage finished (reports went to `emit`), "stopped" when `stopped()`
        turned true; raises JobFailed."""
        run = RayRun(job.spec, job.run, self.cluster, self.settings, emit, stopped)
        with self._lock:
            self._runs[job.id] = run
        try:
            run.run_all()
            return "trained"
        except Stopped:
            return "stopped"
        finally:
            with self._lock:
                self._runs.pop(job.id, None)

    def task_pids(self, job_id: str) -> dict[str, int]:
        """stage -> pid of the Ray worker process running it, for the job's tasks running now."""
        with self._lock:
            run = self._runs.get(job_id)
            return dict(run.pids) if run is not None else {}

    def close(self) -> None:
        self.cluster.close()
