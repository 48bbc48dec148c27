"""The library's KD, data-parallel on Ray Train (TorchTrainer, DistributedDataParallel).

The driver runs this instead of the one-process `library_task` when the library stage has more
than one worker. It returns what that task returns: (student.safetensors bytes, student.json).

- N workers (Ray Train actors), each with the resources of a Ray task; backend gloo on CPUs,
  NCCL when every worker has a whole GPU (ranks sharing a GPU use gloo, which NCCL refuses).
- Every rank draws the same shuffled order and trains on its slice of each global batch (see
  `poe.engine.train.fit`), so a global batch holds the examples of the one-process run; DDP
  averages the gradients. BatchNorm stays per rank (plain DDP): batch statistics of each rank's
  slice, rank 0's running statistics in the saved student.
- Rank 0 alone reports progress, sends the epoch checkpoints and training-log lines through the
  job's channel (`TaskRelay`) and returns the student's files.
- Resume: every rank starts from the channel's latest "library" checkpoint, so a run that failed
  or was stopped continues after its last finished epoch. Ray Train restarts the whole worker group
  up to `max_failures` times after a worker fails (a dead process or an exception alike).
- No disk is shared: the images, logits and test set come from Ray's object store (object refs in
  the loop's config); no Ray Train checkpoint is reported. The trainer's storage path is a local
  temporary directory for Ray Train's own bookkeeping.

`trainer.fit()` runs in a launcher task (no CPU of its own), so the driver follows the run like any
other task: `LibraryDDP.start()` returns the launcher's object ref. To stop it, the driver calls
`LibraryDDP.cancel()`, not `ray.cancel` on that ref: it asks the Ray Train controller to abort, which
kills the workers and removes their placement group (1 to 2 s once training runs). Where the abort
has not finished after CANCEL_GRACE seconds, the launcher, the controller, the workers and their
placement group are killed; a run whose workers are still starting aborts as soon as their start
returns, and a rank that starts after the cancel returns at once. A plain `ray.cancel(ref,
force=True)` would stop the training too (the controller and the workers share the launcher's
fate) but leave the workers' placement group holding their CPUs until the extractor exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from poe.engine.errors import PoeError
from poe_services.extractor.ray_executor import TaskRelay, _setup, _spec, _tensor

log = logging.getLogger(__name__)

STAGE = "library"
CANCEL_GRACE = 6.0  # seconds a cancel waits for Ray Train's abort before killing the run's actors


class RunControl:
    """A run's rendezvous (a Ray actor without CPUs): the stop flag, the Ray Train controller and the
    workers' actors and placement group, registered as they start, for `LibraryDDP.cancel`."""

    def __init__(self):
        self._stop = False
        self._controller = None
        self._workers: dict[int, tuple[int, Any]] = {}  # rank -> (pid, actor)
        self._placement_group = None

    def stop(self):
        """Sets the stop flag; returns the controller (None until it started)."""
        self._stop = True
        return self._controller

    def stopped(self) -> bool:
        return self._stop

    def set_controller(self, controller) -> bool:
        """Registers the controller; returns whether the run was stopped meanwhile."""
        self._controller = controller
        return self._stop

    def register(self, rank: int, pid: int, actor, placement_group) -> bool:
        """Registers a rank's worker; returns whether the run was stopped (the rank then returns)."""
        self._workers[rank] = (pid, actor)
        if placement_group is not None:
            self._placement_group = placement_group
        return self._stop

    def pids(self) -> dict[int, int]:
        return {rank: pid for rank, (pid, _) in self._workers.items()}

    def actors(self) -> tuple[Any, list, Any]:
        """(controller, worker actors, placement group)."""
        return self._controller, [a for _, a in self._workers.values()], self._placement_group


def _stopped(call) -> bool:
    """The answer of a RunControl call that says whether the run was stopped; a control actor that
    is gone (the driver closed the run) counts as stopped."""
    import ray

    try:
        return bool(ray.get(call))
    except ray.exceptions.RayActorError:
        return True


def _controller_callback(control):
    """A Ray Train controller callback (an extension point of Ray 2.60's Train v2) that registers the
    controller with `control` as it starts, and aborts at once when the run was stopped before."""
    import ray
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class RegisterController(ControllerCallback):
        def __init__(self, control):
            self.control = control

        def after_controller_start(self, train_run_context) -> None:
            me = ray.get_runtime_context().current_actor
            if _stopped(self.control.set_controller.remote(me)):
                me.abort.remote()  # not waited for: it runs once the controller's start returns

    return RegisterController(control)


def _train_loop(config: dict) -> tuple[bytes, dict] | None:
    """One rank of the KD (runs in a Ray Train worker); rank 0 returns the student's files."""
    import ray
    import ray.train
    import torch

    from poe.engine import pipeline
    from poe.engine.pool import wrn_config_from_dict
    from poe.engine.train import TeacherViews
    from poe_services.extractor import stages

    _setup(config["threads"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if _stopped(config["control"].register.remote(rank, os.getpid(), ray.get_runtime_context().current_actor,
                                                  ray.util.get_current_placement_group())):
        return None
    device = config["device"]
    if device.startswith("cuda"):
        import ray.train.torch

        device = str(ray.train.torch.get_device())
        torch.cuda.set_device(device)
    spec = _spec(config["spec"])
    images, logits = ray.get([config["images"], config["logits"]])
    test = config["test"]
    if isinstance(test, ray.ObjectRef):
        test = ray.get(test)
    channel = config["channel"]
    with tempfile.TemporaryDirectory(prefix="poe-ray-library-") as tmp:
        workdir = Path(tmp)
        relay = None
        if rank == 0:
            relay = TaskRelay(channel, STAGE, workdir, workers=world)  # restores the latest checkpoint
        else:
            data = ray.get(channel.latest.remote(STAGE))
            if data is not None:
                (workdir / f"{STAGE}.ckpt").write_bytes(data)
        pipeline.library_stage(workdir, TeacherViews(_tensor(images), _tensor(logits)), test,
                               wrn_config_from_dict(config["student_config"]), spec.library_schedule, device,
                               progress=relay.progress if relay else None, progress_every=1,
                               on_checkpoint=relay.checkpoint if relay else None, shard=(rank, world))
        if relay is None:
            return None
        relay.flush()
        return stages.student_files(workdir)


class LibraryFailed(Exception):
    """A rank of the data-parallel KD raised (after Ray Train's restarts): its rank and message."""


def _launch(config: dict, workers: int, cpus_per_worker: float, gpus_per_worker: float,
            max_failures: int) -> tuple[bytes, dict] | None:
    """The launcher task: runs the TorchTrainer and returns rank 0's result (None once stopped)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.exceptions import WorkerGroupError

    control = config["control"]
    if _stopped(control.stopped.remote()):
        return None
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker > 0 else {})}
    with tempfile.TemporaryDirectory(prefix="poe-ray-train-") as storage:
        trainer = TorchTrainer(
            _train_loop, train_loop_config=config,
            torch_config=TorchConfig(backend="nccl" if gpus_per_worker >= 1 else "gloo"),
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                                         resources_per_worker=resources),
            run_config=RunConfig(name="poe-library", storage_path=storage,
                                 failure_config=FailureConfig(max_failures=max_failures),
                                 callbacks=[_controller_callback(control)]))
        try:
            result = trainer.fit()
        except Exception as e:
            if _stopped(control.stopped.remote()):
                return None
            if not isinstance(e, WorkerGroupError):
                raise
            rank, error = min(e.worker_failures.items(), key=lambda item: item[0])
            cause = getattr(error, "cause", None) or error
            if isinstance(cause, PoeError):
                raise cause from None
            first = (str(cause).strip().splitlines() or [""])[-1][:300]
            raise LibraryFailed(f"rank {rank} of {workers}: {type(cause).__name__}: {first}") from None
    return None if _stopped(control.stopped.remote()) else result.return_value


class LibraryDDP:
    """One data-parallel KD of the student on Ray Train, for the driver: `start()` submits it and
    returns the object ref of (student bytes, student.json); `cancel()` stops it (see the module's
    doc); `pids()` gives each rank's worker pid; `close()` frees the run's control actor."""

    def __init__(self, spec_dict: dict, device: str, threads: int, channel, student_config: dict,
                 images_ref, logits_ref, test, workers: int, cpus_per_worker: float, gpus_per_worker: float,
                 max_failures: int):
        import ray

        batch_size = int(spec_dict["library_schedule"]["batch_size"])
        self.workers = max(1, min(int(workers), batch_size))  # every rank gets at least one example
        self.resources = (float(cpus_per_worker), float(gpus_per_worker))
        self.max_failures = max(0, int(max_failures))
        self.control = ray.remote(RunControl).options(num_cpus=0).remote()
        self.config = {"spec": spec_dict, "device": device, "threads": int(threads), "channel": channel,
                       "student_config": student_config, "images": images_ref, "logits": logits_ref,
                       "test": test, "control": self.control}
        self.ref = None

    def start(self):
        import ray

        self.ref = ray.remote(_launch).options(
            num_cpus=0, num_gpus=0, max_retries=self.max_failures, retry_exceptions=False,
            name="poe-library-ddp").remote(self.config, self.workers, *self.resources, self.max_failures)
        return self.ref

    def pids(self) -> dict[int, int]:
        import ray

        with contextlib.suppress(Exception):
            return ray.get(self.control.pids.remote(), timeout=5)
        return {}

    def cancel(self, grace: float = CANCEL_GRACE) -> None:
        """Stops the run within `grace` seconds (Ray Train's abort, then the kill of the launcher, the
        workers and their placement group). A run whose workers are still starting is left to its
        abort, which Ray Train runs once their start returns: no rank trains after a cancel."""
        import ray

        if self.ref is None:
            return
        self.ref, ref = None, self.ref
        controller = None
        with contextlib.suppress(Exception):
            controller = ray.get(self.control.stop.remote(), timeout=2)
        if controller is not None:  # else the controller aborts itself when it registers
            with contextlib.suppress(Exception):
                controller.abort.remote()
        done, _ = ray.wait([ref], timeout=grace)
        if done:
            return
        controller, actors, placement_group = None, [], None
        with contextlib.suppress(Exception):
            controller, actors, placement_group = ray.get(self.control.actors.remote(), timeout=2)
        if not actors:
            return
        # Training, but the abort did not finish: kill everything. Ray Train's placement-group cleaner
        # (a detached actor) may stay behind; without Ray's dashboard it cannot see the controller die.
        log.warning("extractor: the library's Ray Train run did not abort within %.0f s; killing it", grace)
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)
        for actor in [*actors, controller]:
            if actor is not None:
                with contextlib.suppress(Exception):
                    ray.kill(actor)
        if placement_group is not None:
            with contextlib.suppress(Exception):
                ray.util.remove_placement_group(placement_group)

    def close(self) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.kill(self.control)
