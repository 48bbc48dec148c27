"""`poe bench extract`: wall time of every extraction stage on Ray with 1, 2, ... workers.

The same job (the pool's oracle, a stratified subset of its data set, the given views and epochs)
runs through the Ray executor's stages (`poe_services.extractor.ray_executor.RayRun`, no registry:
the results stay in a scratch run directory) once per worker count, on a local Ray that the
benchmark starts with this machine's cores (or the Ray this process is connected to). Before the
first timed run every Ray worker process imports torch and the stages, so that no run pays for it.

Per worker count: seconds of the teacher views (oracle inference, sharded), the library (KD, one
task), the library features (sharded) and the experts (one task per primitive task, at most W at
once), the speed-up over one worker, and whether the trained library and experts are the same
bytes as with one worker (they should be: sharding never changes a batch).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from poe.bench import report

TITLE = "Extraction stages on Ray: 1 and 2 workers"
STAGES = ("teacher", "library", "features", "experts")
Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


def job_spec(pool_dir: Path, dataset: str, subset: int, views: int, library_epochs: int, expert_epochs: int,
             batch_size: int, seed: int, student_depth: int = 16, expert_width: int = 16):
    """A JobSpec as StartExtraction would resolve it for the pool's oracle (registered as id 0)."""
    from poe.engine import hierarchy as hierarchy_mod
    from poe.engine.train import CKDSettings, Schedule
    from poe_services.extractor import oracles
    from poe_services.extractor.plan import load_data
    from poe_services.extractor.spec import ExpertShape, JobSpec, PoolTarget, RegistryOracle, StudentShape

    oracle_file = pool_dir / "oracle.safetensors"
    data = oracle_file.read_bytes()
    config = oracles.config_for_file(oracle_file, data, "", "oracle",
                                     lambda p: p.read_bytes() if p.is_file() else None)
    manifest = json.loads((pool_dir / "pool.json").read_text())
    hier = hierarchy_mod.load(pool_dir / manifest["hierarchy"])
    train, _test = load_data(dataset, subset, seed)
    c, h, w = train.input_shape
    return JobSpec(
        request={}, dataset=dataset, subset=subset, seed=seed, views=views, input_shape=[c, h, w],
        num_classes=len(train.classes), train_images=len(train), hierarchy=hier.to_dict(), tasks=list(hier.tasks),
        oracle=RegistryOracle(0, oracles.oracle_config(config, "oracle").to_dict()), base=None,
        student=StudentShape(student_depth, 1, 1), expert=ExpertShape(expert_width, (student_depth - 4) // 6),
        library_schedule=Schedule(library_epochs, batch_size, 0.1, seed=seed),
        expert_schedule=Schedule(expert_epochs, batch_size, 0.1, seed=seed), ckd=CKDSettings(), device="cpu",
        pool=PoolTarget("bench", "1", [])), data


def _digest(run: Path, tasks: list[str]) -> dict:
    """sha256 of the teacher views, and of the library with every expert."""
    h = hashlib.sha256((run / "library.safetensors").read_bytes())
    for task in tasks:
        h.update((run / "experts" / f"{task}.safetensors").read_bytes())
    views = hashlib.sha256((run / "teacher_views.safetensors").read_bytes()).hexdigest()
    return {"teacher": views, "trained": h.hexdigest()}


def run(pool_dir: str | Path = "pools/fashion-mnist", workers: tuple[int, ...] = (1, 2), *, quick: bool = False,
        dataset: str | None = None, subset: int = 3_000, views: int = 2, library_epochs: int = 1,
        expert_epochs: int = 5, batch_size: int = 128, seed: int = 0, cpus: int = 0,
        data_parallel_library: bool = False, progress: Progress = _quiet) -> dict:
    import ray

    from poe.engine.config import Settings
    from poe.engine.errors import InvalidArgument
    from poe_services.extractor.ray_executor import RayCluster, RayRun, start_local_ray, usable_cores, warm_worker

    if not workers or any(w < 1 for w in workers):
        raise InvalidArgument(f"--workers: expected whole numbers >= 1, got {','.join(map(str, workers))}")
    depth, width = 16, 16  # the extractor's default student and experts
    if quick:
        subset, views, library_epochs, expert_epochs, batch_size, depth, width = 300, 1, 1, 1, 50, 10, 4
    pool_dir = Path(pool_dir)
    dataset = dataset or json.loads((pool_dir / "pool.json").read_text())["info"]["dataset"]
    spec, oracle = job_spec(pool_dir, dataset, subset, views, library_epochs, expert_epochs, batch_size, seed,
                            depth, width)
    if quick:  # two experts are enough to see them run side by side
        spec = replace(spec, tasks=spec.tasks[:2])
    started_here = not ray.is_initialized()
    if started_here:
        progress(f"starting a local Ray with {cpus or usable_cores()} CPUs")
        start_local_ray(cpus or usable_cores())
    cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
    base = replace(Settings.from_env({}), ray_cpus_per_task=1.0, ray_gpus_per_task=0.0)
    rows = []
    try:
        progress("warming the Ray workers (torch and the stages imported once)")
        ray.get([ray.remote(warm_worker).options(num_cpus=1).remote() for _ in range(cluster_cpus)])
        for n in workers:
            # With data_parallel_library the library's KD runs on n Ray Train workers (one task for n = 1).
            settings = replace(base, ray_workers=n, ray_library_workers=n if data_parallel_library else 1)
            with tempfile.TemporaryDirectory(prefix="poe-bench-extract-") as tmp:
                run_dir = Path(tmp)
                (run_dir / "oracle.safetensors").write_bytes(oracle)
                progress(f"{n} worker(s): {spec.train_images} images x {views} views, "
                         f"{library_epochs} KD epoch(s), {len(spec.tasks)} experts x {expert_epochs} epoch(s)")
                t0 = time.monotonic()
                stage_run = RayRun(spec, run_dir, RayCluster(settings), settings, emit=lambda _msg: None)
                stage_run.run_all()
                total = time.monotonic() - t0
                student = json.loads((run_dir / "student.json").read_text())
                rows.append({"workers": n, "seconds": {k: round(stage_run.timings.get(k, 0.0), 2) for k in STAGES},
                             "total": round(total, 2), "digest": _digest(run_dir, spec.tasks),
                             "library_test_acc": student.get("test_acc")})
                progress(f"{n} worker(s): " + ", ".join(f"{k} {v:.1f} s" for k, v in rows[-1]["seconds"].items()))
                shutil.rmtree(run_dir / "experts", ignore_errors=True)
    finally:
        if started_here:
            ray.shutdown()
    first = rows[0]
    for row in rows:
        row["speedup"] = {k: round(first["seconds"][k] / row["seconds"][k], 2) if row["seconds"][k] else None
                          for k in STAGES}
        row["speedup"]["total"] = round(first["total"] / row["total"], 2)
        row["same_result"] = row["digest"] == first["digest"]
        row["same_teacher_views"] = row["digest"]["teacher"] == first["digest"]["teacher"]
    return {"part": "extract", "pool": str(pool_dir), "ray_cpus": cluster_cpus,
            "settings": {"dataset": dataset, "train_images": spec.train_images, "views": views,
                         "library_epochs": library_epochs, "expert_epochs": expert_epochs, "batch_size": batch_size,
                         "tasks": len(spec.tasks), "seed": seed, "device": "cpu", "cpus_per_task": 1,
                         "data_parallel_library": data_parallel_library},
            "rows": rows}


def markdown(result: dict, command: str) -> str:
    s = result["settings"]
    lines = report.header({**result, "command": command})
    ddp = s.get("data_parallel_library", False)
    library = ("the library's KD data-parallel on as many Ray Train workers (DDP, gloo)" if ddp
               else "the library's KD one task")
    lines += ["", f"A local Ray with {result['ray_cpus']} CPUs, one CPU (one torch thread) per task; "
              f"{s['train_images']} training images x {s['views']} views, {s['library_epochs']} KD epoch(s), "
              f"{s['tasks']} experts x {s['expert_epochs']} CKD epoch(s), batch {s['batch_size']}; {library}. "
              "Seconds of wall time per stage (speed-up over 1 worker); \"same result\": the same bytes "
              "of the library and every expert as with 1 worker (with a data-parallel library only the teacher "
              "views can be); the library's student's test accuracy:", "",
              "| workers | teacher views | library (KD) | features | experts | total | same result | library acc |",
              "|---:|---:|---:|---:|---:|---:|:---|---:|"]
    for row in result["rows"]:
        cells = [f"{row['seconds'][k]:.1f} ({row['speedup'][k]:.2f}x)" if row["speedup"][k] else
                 f"{row['seconds'][k]:.1f}" for k in STAGES]
        same = "yes" if row["same_result"] else "teacher views" if row.get("same_teacher_views") else "no"
        acc = row.get("library_test_acc")
        lines.append(f"| {row['workers']} | " + " | ".join(cells) +
                     f" | {row['total']:.1f} ({row['speedup']['total']:.2f}x) | {same} | "
                     f"{'' if acc is None else f'{acc:.3f}'} |")
    lines += ["", *projection_lines(result)]
    return "\n".join(lines) + "\n"


def projection_lines(result: dict, experts: int = 100, workers: tuple[int, ...] = (8, 32)) -> list[str]:
    """The expert stage of a larger job projected from the measured time of one expert: experts of
    equal cost run in ceil(experts / workers) rounds (the data, epochs and device as measured)."""
    first = result["rows"][0]
    per_expert = first["seconds"]["experts"] * first["workers"] / max(1, result["settings"]["tasks"])
    cells = [f"{w} workers: {math.ceil(experts / w)} rounds, about {math.ceil(experts / w) * per_expert:.0f} s"
             for w in workers]
    return [f"Projection: one expert took {per_expert:.1f} s here ({first['workers']} worker(s)); "
            f"{experts} experts would take about {experts * per_expert:.0f} s on one worker, and on "
            + "; ".join(cells) + " (a GPU changes the time per expert, not the rounds)."]
