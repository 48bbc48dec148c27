"""StartExtraction's checks: a request -> the resolved `JobSpec` stored with the job in the registry.

Everything a job needs to run, or to resume after a restart, is resolved here once and recorded
as the job's `params_json` (`spec.JobSpec`, format poe.extraction/v1): the hierarchy inline, the
oracle as a registry id or a TorchScript file in the run directory, the base pool's library and the
experts it lends, every hyperparameter with its default filled in, and the pool version to publish.

The checks load the data set and the oracle, so that an oracle, data set and hierarchy that do not
fit together are refused with INVALID_ARGUMENT before any job exists. Side effects (registering
the hierarchy and a file-based safetensors oracle) happen only after every check passed. Files a
request names are opened under the rules of `files.InputFiles` (allowed directories, regular files,
size caps); a TorchScript oracle only from the oracle directory.

`check_spec` applies the same bounds to a spec read back from the registry before the job is
resumed: a stored spec is input too, and one that does not pass is never run.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from pathlib import Path

from google.protobuf.json_format import MessageToDict

from poe.client.registry import RegistryClient
from poe.contract import hierarchy_from_message
from poe.engine import hierarchy as hierarchy_mod
from poe.engine import limits
from poe.engine.config import Settings, resolve_device
from poe.engine.data import Dataset, builtin_dataset, dataset_choices, default_hierarchy, has_test_split, load_dataset
from poe.engine.errors import AlreadyExists, InvalidArgument, NotFound, PoeError, field_error
from poe.engine.hierarchy import Hierarchy
from poe.engine.names import ALIAS, JOB_ID, NAME, VERSION
from poe.engine.nets import WRNConfig, count_params
from poe.engine.train import CKDSettings, Schedule
from poe.v1 import extractor_pb2 as pb
from poe_services.extractor import oracles
from poe_services.extractor.files import MAX_HIERARCHY_BYTES, MAX_TORCHSCRIPT_BYTES, InputFiles
from poe_services.extractor.spec import (
    BaseSpec,
    ExpertShape,
    JobSpec,
    Oracle,
    PoolTarget,
    RayResources,
    RegistryOracle,
    ReusedExpert,
    StudentShape,
    TorchScriptOracle,
)

TORCHSCRIPT_FILE = "oracle.torchscript"

DEFAULTS = {"student_depth": 16, "student_width": 1, "stem_stride": 1, "expert_width": 16, "library_epochs": 10,
            "expert_epochs": 10, "batch_size": 128, "lr": 0.1, "temperature": 4.0, "soft_weight": 1.0,
            "scale_weight": 0.3, "views": 4, "seed": 0, "subset": 0}


def request_dict(params: pb.ExtractionParams) -> dict:
    """The request as JSON (what an idempotent retry is compared with)."""
    return MessageToDict(params, preserving_proto_field_name=True)


def check_job_id(job_id: str) -> str:
    if job_id and not JOB_ID.match(job_id):
        raise field_error("job_id", f"{job_id!r} must be 1-64 letters, digits, '.', '_' or '-'")
    return job_id


# -- data ----------------------------------------------------------------------------------------

def load_data(spec: str, subset: int = 0, seed: int = 0, with_test: bool = True) -> tuple[Dataset, Dataset | None]:
    """Training images (a stratified subset when asked) and, where the data set has one, its test split."""
    train = load_dataset(spec, "train")
    if not len(train) or not train.classes:
        raise InvalidArgument(f"{spec}: no training images")
    test = load_dataset(spec, "test") if with_test and has_test_split(spec) else None
    if subset:
        k = len(train.classes)
        train = train.stratified(max(1, subset // k), seed)
        if test is not None:
            test = test.stratified(max(1, subset // (6 * k)), seed)
    return train, test


def task_seed(seed: int, task: str) -> int:
    """An expert's seed depends on its task only, so an expert trained in an incremental job is the
    one a full extraction would have trained (same library, views and settings)."""
    return seed + zlib.crc32(task.encode()) % 100_003


# -- hyperparameters -----------------------------------------------------------------------------

# Bounds of the Ray resources a job may ask for (0: the extractor's settings).
MAX_RAY_WORKERS = 4096
MAX_CPUS_PER_TASK = 1024.0
MAX_GPUS_PER_TASK = 64.0

# Integer bounds of a request's hyperparameters (and of a stored spec's).
RANGES = {"library_epochs": (1, 100_000), "expert_epochs": (1, 100_000), "batch_size": (1, 1 << 16),
          "views": (1, 32), "student_width": (1, limits.MAX_WRN_WIDTH), "expert_width": (1, limits.MAX_EXPERT_WIDTH),
          "subset": (0, 1 << 31), "seed": (0, 1 << 31)}


def _numbers(p: pb.ExtractionParams) -> dict:
    out = {k: (getattr(p, k) if p.HasField(k) else v) for k, v in DEFAULTS.items()}
    for name, (lo, hi) in RANGES.items():
        if not lo <= out[name] <= hi:
            raise field_error(f"params.{name}", f"must be in [{lo}, {hi}], got {out[name]}")
    if out["stem_stride"] not in (1, 2):
        raise field_error("params.stem_stride", f"must be 1 or 2, got {out['stem_stride']}")
    # Finite too: an infinite rate or weight would train NaN weights (and a stored spec with one is
    # refused on resume by check_spec).
    for name in ("lr", "temperature"):
        if not (math.isfinite(out[name]) and out[name] > 0):
            raise field_error(f"params.{name}", f"must be > 0 and finite, got {out[name]}")
    for name in ("soft_weight", "scale_weight"):
        if not (math.isfinite(out[name]) and out[name] >= 0):
            raise field_error(f"params.{name}", f"must be >= 0 and finite, got {out[name]}")
    if out["soft_weight"] == 0 and out["scale_weight"] == 0:
        raise field_error("params.soft_weight", "soft_weight and scale_weight cannot both be 0")
    return out


# -- hierarchy -----------------------------------------------------------------------------------

def _hierarchy(p: pb.ExtractionParams, base, files: InputFiles) -> Hierarchy:
    try:
        if p.hierarchy_text:
            return hierarchy_mod.loads(p.hierarchy_text, "hierarchy_text")
        if p.hierarchy:
            ref = p.hierarchy
            if Path(ref).suffix in (".yaml", ".yml", ".json") or "/" in ref:
                path, data = files.read_data(ref, "params.hierarchy", MAX_HIERARCHY_BYTES, "hierarchy files")
                try:
                    text = data.decode()
                except UnicodeDecodeError:
                    raise field_error("params.hierarchy", f"{path.name}: not UTF-8 text") from None
                return hierarchy_mod.loads(text, path.name)
            return hierarchy_mod.builtin(ref)
    except PoeError as e:
        if str(getattr(e, "field", "")).startswith("params."):  # already about the request's field
            raise
        field = "params.hierarchy_text" if p.hierarchy_text else "params.hierarchy"
        raise field_error(field, str(e)) from None
    if base is not None:
        return hierarchy_from_message(base.hierarchy, "params.base_pool.hierarchy")
    name = default_hierarchy(p.dataset)
    try:
        return hierarchy_mod.builtin(name)
    except NotFound:
        raise field_error("params.hierarchy", f"required for data set {p.dataset} (no built-in hierarchy "
                                              f"{name!r}); name one or pass a YAML/JSON file") from None


# -- the plan ------------------------------------------------------------------------------------

class Planner:
    """Resolves StartExtraction requests against the registry and the extractor's filesystem."""

    def __init__(self, settings: Settings, registry: RegistryClient):
        self.settings = settings
        self.registry = registry
        self.files = InputFiles(settings.extractor_oracle_dir, settings.data_dir)

    def plan(self, p: pb.ExtractionParams, staging: Path, busy: dict[str, str]) -> JobSpec:
        """The job spec; `staging` receives files the job needs (a TorchScript oracle); `busy` maps
        "name@version" targets of unfinished jobs to their job ids."""
        n = _numbers(p)
        resources = _resources(p)
        device = p.device or self.settings.device
        try:
            resolve_device(device)
        except InvalidArgument as e:
            raise field_error("params.device", str(e)) from None
        if not p.dataset:
            raise field_error("params.dataset", f"required: {dataset_choices()}")
        for a in p.aliases:
            if not ALIAS.match(a) or a == "latest":
                raise field_error("params.aliases", f"alias {a!r} must start with a lower-case letter, then letters, "
                                                    "digits, '.', '_' or '-' (and not be 'latest')")
        base = self.registry.get_pool(p.base_pool) if p.base_pool else None
        if base is not None:
            for name in ("student_depth", "student_width", "stem_stride"):
                if p.HasField(name):
                    raise field_error(f"params.{name}", f"not allowed with a base pool: its library "
                                                        f"(WRN config of library {base.library.id}) is reused")
        hier = _hierarchy(p, base, self.files)

        # The data set, and what it means for the hierarchy and the schedule.
        dataset = self._dataset_spec(p.dataset)
        try:
            train, _ = load_data(dataset, n["subset"], n["seed"], with_test=False)
        except PoeError as e:
            raise field_error("params.dataset", str(e)) from None
        if len(hier.classes) != len(train.classes):
            raise field_error("params.hierarchy", f"class count mismatch: hierarchy {hier.dataset} v{hier.version} "
                                                  f"has {len(hier.classes)} classes but the data set {p.dataset} has "
                                                  f"{len(train.classes)}")
        c, h, w = train.input_shape

        # Tasks: what to train, what a base pool lends.
        try:
            requested = hier.resolve_tasks(p.tasks) if p.tasks else list(hier.tasks)
        except InvalidArgument as e:
            raise field_error("params.tasks", str(e)) from None
        base_spec, expert_cfg = None, ExpertShape(n["expert_width"], (n["student_depth"] - 4) // 6)
        student = None
        if base is None:
            try:
                WRNConfig(n["student_depth"], n["student_width"], c, len(train.classes), n["stem_stride"],
                          mean=(0.0,) * c, std=(1.0,) * c)
            except ValueError as e:
                raise field_error("params.student_depth", str(e)) from None
            student = StudentShape(n["student_depth"], n["student_width"], n["stem_stride"])
            to_train = requested
        else:
            base_spec, expert_cfg = self._base(base, hier, p, n, (c, h, w), len(train.classes))
            lent = base_spec.reuse
            if p.tasks:
                covered = [t for t in requested if t in lent]
                if covered:
                    raise field_error("params.tasks", f"already covered by {base_spec.pool}: {', '.join(covered)} "
                                                      "(its experts are reused; list only new tasks)")
            to_train = [t for t in requested if t not in lent]
            if not to_train:
                raise field_error("params.tasks", f"nothing to train: {base_spec.pool} already covers every task "
                                                  f"of hierarchy {hier.dataset} v{hier.version}")

        # The oracle.
        oracle, register = self._oracle(p, base, hier, train, dataset, staging)
        if len(train) * n["views"] < n["batch_size"]:
            raise field_error("params.batch_size", f"{n['batch_size']} is larger than the training set "
                                                   f"({len(train)} images x {n['views']} views)")

        # The pool version to publish.
        pool_name = p.pool_name or (base.name if base is not None else hier.dataset)
        if not NAME.match(pool_name):
            raise field_error("params.pool_name", f"pool name {pool_name!r} must be 1-63 lower-case letters, digits, "
                                                  "'.', '_' or '-'")
        version = p.pool_version or self._next_version(pool_name, busy)
        if not VERSION.match(version):
            raise field_error("params.pool_version", f"version {version!r} must be 1-64 letters, digits, '.', '_', "
                                                     "'+' or '-'")
        ref = f"{pool_name}@{version}"
        if ref in busy:
            raise AlreadyExists(f"params.pool_version: job {busy[ref]} is already extracting {ref}")
        try:
            existing = self.registry.get_pool(ref)
            if existing.version == version:
                raise AlreadyExists(f"params.pool_version: {ref} is already published; choose another version")
        except NotFound:
            pass

        # Every check passed: now record what the job depends on.
        registered, _ = self.registry.register_hierarchy(hier)
        if registered.version != hier.version:  # pragma: no cover - the registry keeps the version it is given
            raise InvalidArgument(f"params.hierarchy: registered as version {registered.version}")
        if register is not None:
            cfg, data, source, params = register
            o, _ = self.registry.register_oracle(f"oracle {Path(source).name}", hier.dataset, cfg.to_dict(),
                                                 data, params=params, metrics={"source": source})
            oracle = RegistryOracle(o.id, cfg.to_dict())

        lib_schedule = Schedule(n["library_epochs"], n["batch_size"], n["lr"], seed=n["seed"])
        exp_schedule = Schedule(n["expert_epochs"], n["batch_size"], n["lr"], seed=n["seed"])
        return JobSpec(
            request=request_dict(p), dataset=dataset, subset=n["subset"], seed=n["seed"], views=n["views"],
            input_shape=[c, h, w], num_classes=len(train.classes), train_images=len(train),
            hierarchy=hier.to_dict(), tasks=to_train, oracle=oracle, base=base_spec, student=student,
            expert=expert_cfg, library_schedule=None if base is not None else lib_schedule,
            expert_schedule=exp_schedule, ckd=CKDSettings(n["temperature"], n["soft_weight"], n["scale_weight"]),
            device=device, pool=PoolTarget(pool_name, version, list(p.aliases)), resources=resources)

    # -- pieces ----------------------------------------------------------------------------------

    def _dataset_spec(self, spec: str) -> str:
        """A built-in data set's name, or the real path of a data set inside the extractor's data
        directories (absolute, so that a job resumed by another process reads the same files)."""
        if not spec:
            raise field_error("params.dataset", f"required: {dataset_choices()}")
        builtin = builtin_dataset(spec)
        if builtin is not None:
            return builtin.name
        return str(self.files.data_path(spec, "params.dataset"))

    def _next_version(self, name: str, busy: dict[str, str]) -> str:
        versions = [pv.version for pv in self.registry.list_pools(name=name)]
        versions += [ref.split("@", 1)[1] for ref in busy if ref.split("@", 1)[0] == name]
        numbers = [int(v) for v in versions if v.isdigit()]
        return str(max(numbers, default=0) + 1)

    def _base(self, base, hier: Hierarchy, p: pb.ExtractionParams, n: dict, shape,
              num_classes: int) -> tuple[BaseSpec, ExpertShape]:
        lib_cfg = json.loads(base.library.config_json or "{}")
        cfg = oracles.wrn_config(lib_cfg, "params.base_pool")
        if base.dataset != hier.dataset:
            raise field_error("params.hierarchy", f"base pool {base.name}@{base.version} is for data set "
                                                  f"{base.dataset!r}, the hierarchy for {hier.dataset!r}")
        if cfg.in_channels != shape[0] or cfg.num_classes != num_classes:
            raise field_error("params.dataset", f"base pool {base.name}@{base.version} was extracted for "
                                                f"{cfg.in_channels}-channel images of {cfg.num_classes} classes; "
                                                f"the data set has {shape[0]} channel(s) and {num_classes} classes")
        reuse, widths = {}, set()
        for x in base.experts:
            xcfg = json.loads(x.config_json or "{}")
            widths.add((int(xcfg.get("width", 0)), int(xcfg.get("blocks", 0))))
            task = hier.tasks.get(x.task)
            if task is not None and sorted(task) == sorted(x.class_ids):
                reuse[x.task] = ReusedExpert(
                    id=x.id, sha256=x.blob.sha256, class_ids=list(x.class_ids), config=xcfg, params=x.params,
                    hierarchy_version=x.hierarchy_version,
                    val_accuracy=x.val_accuracy if x.HasField("val_accuracy") else None,
                    metrics=json.loads(x.metrics_json or "{}"), loss=json.loads(x.loss_json or "{}"))
        width, blocks = sorted(widths)[0] if widths else (n["expert_width"], cfg.blocks_per_group)
        if len(widths) > 1:
            raise field_error("params.base_pool", f"base pool {base.name}@{base.version} mixes expert shapes "
                                                  f"{sorted(widths)}")
        if p.HasField("expert_width") and p.expert_width != width:
            raise field_error("params.expert_width", f"{p.expert_width} differs from the base pool's experts "
                                                     f"({width}); experts of one pool share one width")
        spec = BaseSpec(pool=f"{base.name}@{base.version}", library_id=base.library.id,
                        library_sha256=base.library.blob.sha256, library_config=lib_cfg,
                        library_oracle_id=base.library.oracle_id, hierarchy_version=base.hierarchy.version,
                        reuse=reuse, dropped=[x.task for x in base.experts if x.task not in reuse])
        return spec, ExpertShape(width, blocks)

    def _oracle(self, p: pb.ExtractionParams, base, hier: Hierarchy, train: Dataset, dataset: str,
                staging: Path) -> tuple[Oracle | None, tuple | None]:
        """(oracle spec, what to register or None); the spec is None until a file's oracle is registered."""
        src = p.oracle.WhichOneof("source") if p.HasField("oracle") else None
        if src is None and base is not None and base.library.oracle_id:
            src, registry_id = "registry_id", base.library.oracle_id
        elif src == "registry_id":
            registry_id = p.oracle.registry_id
        elif src is None:
            raise field_error("params.oracle", "required: a registered oracle id or a file on the extractor")
        if src == "registry_id":
            if registry_id <= 0:
                raise field_error("params.oracle.registry_id", f"expected a positive id, got {registry_id}")
            o = self.registry.get_oracle(registry_id)
            if o.dataset != hier.dataset:
                raise field_error("params.oracle", f"oracle {o.id} was registered for data set {o.dataset!r}, the "
                                                   f"hierarchy is for {hier.dataset!r}")
            try:
                stored = json.loads(o.config_json or "{}")
            except ValueError:
                stored = None
            cfg = oracles.oracle_config(stored, "params.oracle")
            oracles.check_fits(cfg, train, dataset, "params.oracle")
            return RegistryOracle(o.id, cfg.to_dict()), None
        # A file in the oracle directory: the bytes are read once, checked, and only those bytes
        # are used (a TorchScript oracle's copy in the run directory is exactly what was checked).
        field = "params.oracle.path"
        path, data = self.files.read_oracle(p.oracle.path, field, MAX_TORCHSCRIPT_BYTES)
        if data.startswith(oracles.ZIP_MAGIC):
            model = oracles.load_torchscript(data, path.name, field)
            k = oracles.check_module_fits(model, train, dataset, field)
            staging.mkdir(parents=True, exist_ok=True)
            (staging / TORCHSCRIPT_FILE).write_bytes(data)
            return TorchScriptOracle(TORCHSCRIPT_FILE, str(path), hashlib.sha256(data).hexdigest(), k), None
        oracles.check_safetensors_header(data, path.name, field)
        config = oracles.config_for_file(path, data, p.oracle.config_json, field,
                                         oracles.side_reader(self.files, field))
        cfg = oracles.oracle_config(config, f"{field}.config_json")
        model = oracles.load_weights(cfg, data, path.name, field)
        oracles.check_fits(cfg, train, dataset, field)
        return None, (cfg, data, str(path), count_params(model))


# -- a stored spec, before it is resumed -------------------------------------------------------------

def _float_in(field: str, value: object, lo: float, hi: float = math.inf, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not (lo < value if lo_open else lo <= value) or value > hi:
        bound = f"({lo}" if lo_open else f"[{lo}"
        raise field_error(field, f"must be a finite number in {bound}, {hi}], got {limits.quote(value)}")
    return float(value)


def _resources(p: pb.ExtractionParams) -> RayResources:
    r = RayResources(p.ray_workers, p.ray_cpus_per_task, p.ray_gpus_per_task, p.library_workers)
    _check_resources(r, "params.", ("ray_workers", "ray_cpus_per_task", "ray_gpus_per_task", "library_workers"))
    return r


def _check_resources(r: RayResources, prefix: str = "resources.",
                     names: tuple[str, ...] = ("workers", "cpus_per_task", "gpus_per_task", "library_workers")) -> None:
    limits.check_int_range(prefix + names[0], r.workers, 0, MAX_RAY_WORKERS)
    _float_in(prefix + names[1], r.cpus_per_task, 0.0, MAX_CPUS_PER_TASK)
    _float_in(prefix + names[2], r.gpus_per_task, 0.0, MAX_GPUS_PER_TASK)
    limits.check_int_range(prefix + names[3], r.library_workers, 0, MAX_RAY_WORKERS)


def _schedule(field: str, s: Schedule, epochs_key: str) -> None:
    limits.check_int_range(f"{field}.epochs", s.epochs, *RANGES[epochs_key])
    limits.check_int_range(f"{field}.batch_size", s.batch_size, *RANGES["batch_size"])
    limits.check_int_range(f"{field}.seed", s.seed, 0, limits.MAX_INT64)
    _float_in(f"{field}.lr", s.lr, 0.0, lo_open=True)
    _float_in(f"{field}.momentum", s.momentum, 0.0, 1.0)
    _float_in(f"{field}.weight_decay", s.weight_decay, 0.0)
    _float_in(f"{field}.warmup_epochs", s.warmup_epochs, 0.0, float(s.epochs))


def check_spec(spec: JobSpec, files: InputFiles) -> None:
    """A spec read back from the registry: every value within the bounds StartExtraction enforces,
    every path inside the directories this extractor allows, and a TorchScript oracle only while
    this extractor has an oracle directory and the file it was copied from lies in it.
    InvalidArgument naming the spec's field otherwise."""
    import torch

    # The data set: a built-in one, or (still) inside the data directories.
    if not isinstance(spec.dataset, str) or not spec.dataset:
        raise field_error("dataset", f"expected a data set name or path, got {limits.quote(spec.dataset)}")
    if builtin_dataset(spec.dataset) is None:
        real = files.data_path(spec.dataset, "dataset")
        if str(real) != spec.dataset:
            raise field_error("dataset", f"{limits.quote(spec.dataset)} is not the real path of a data set")
    for name in ("subset", "seed", "views"):
        limits.check_int_range(name, getattr(spec, name), *RANGES[name])
    if not isinstance(spec.input_shape, list) or len(spec.input_shape) != 3:
        raise field_error("input_shape", f"expected [C, H, W], got {limits.quote(spec.input_shape)}")
    limits.check_int_range("input_shape", spec.input_shape[0], 1, limits.MAX_IN_CHANNELS)
    for side in spec.input_shape[1:]:
        limits.check_int_range("input_shape", side, 1, 1 << 16)
    limits.check_int_range("num_classes", spec.num_classes, 1, limits.MAX_CLASSES)
    limits.check_int_range("train_images", spec.train_images, 1, limits.MAX_INT64)

    # The hierarchy and the tasks to train.
    try:
        hier = hierarchy_mod.from_dict(spec.hierarchy)
        hierarchy_mod.validate(hier)
    except InvalidArgument as e:
        raise field_error("hierarchy", str(e)) from None
    if len(hier.classes) != spec.num_classes:
        raise field_error("hierarchy", f"{len(hier.classes)} classes, the spec says {spec.num_classes}")
    if not isinstance(spec.tasks, list) or not spec.tasks or len(set(map(str, spec.tasks))) != len(spec.tasks):
        raise field_error("tasks", "expected a non-empty list of distinct task names")
    unknown = [t for t in spec.tasks if not isinstance(t, str) or t not in hier.tasks]
    if unknown:
        raise field_error("tasks", f"not tasks of the hierarchy: {limits.listing(map(limits.quote, unknown))}")

    # The oracle.
    o = spec.oracle
    if isinstance(o, RegistryOracle):
        limits.check_id("oracle.id", o.id)
        oracles.check_fits(oracles.oracle_config(o.config, "oracle.config"),
                           _Shape(spec.input_shape, spec.num_classes), "of the job", "oracle.config")
    else:
        if o.file != TORCHSCRIPT_FILE:
            raise field_error("oracle.file", f"expected {TORCHSCRIPT_FILE!r}, got {limits.quote(o.file)}")
        limits.check_sha256("oracle.sha256", o.sha256)
        if o.num_classes != spec.num_classes:
            raise field_error("oracle.num_classes", f"{limits.quote(o.num_classes)}, the data set has "
                                                    f"{spec.num_classes} classes")
        files.oracle_path(o.source, "oracle.source")  # TorchScript runs code: only from the oracle directory

    # The networks, schedules and distillation settings.
    base = spec.base
    if base is None:
        if spec.student is None or spec.library_schedule is None:
            raise field_error("student", "required without a base pool")
        limits.check_int_range("student.width", spec.student.width, *RANGES["student_width"])
        limits.check_int_range("student.depth", spec.student.depth, 10, limits.MAX_WRN_DEPTH)
        try:
            WRNConfig(spec.student.depth, spec.student.width, spec.input_shape[0], spec.num_classes,
                      spec.student.stem_stride, mean=(0.0,) * spec.input_shape[0], std=(1.0,) * spec.input_shape[0])
        except (ValueError, TypeError) as e:
            raise field_error("student", str(e)) from None
        _schedule("library_schedule", spec.library_schedule, "library_epochs")
    else:
        _check_base(base, spec)
        if spec.student is not None or spec.library_schedule is not None:
            raise field_error("student", "not allowed with a base pool (its library is reused)")
    limits.check_int_range("expert.width", spec.expert.width, *RANGES["expert_width"])
    limits.check_int_range("expert.blocks", spec.expert.blocks, 1, limits.MAX_EXPERT_BLOCKS)
    _schedule("expert_schedule", spec.expert_schedule, "expert_epochs")
    _float_in("ckd.temperature", spec.ckd.temperature, 0.0, lo_open=True)
    soft = _float_in("ckd.soft_weight", spec.ckd.soft_weight, 0.0)
    scale = _float_in("ckd.scale_weight", spec.ckd.scale_weight, 0.0)
    if soft == 0 and scale == 0:
        raise field_error("ckd.soft_weight", "soft_weight and scale_weight cannot both be 0")
    if not isinstance(spec.device, str) or not spec.device:
        raise field_error("device", f"expected a device name, got {limits.quote(spec.device)}")
    if spec.device != "auto":
        try:
            torch.device(spec.device)
        except (RuntimeError, ValueError):
            raise field_error("device", f"not a device: {limits.quote(spec.device)}") from None

    _check_resources(spec.resources)

    # The pool version to publish.
    limits.check_name("pool.name", spec.pool.name, "pool name")
    limits.check_version("pool.version", spec.pool.version)
    if not isinstance(spec.pool.aliases, list):
        raise field_error("pool.aliases", "expected a list")
    limits.check_count("pool.aliases", spec.pool.aliases, limits.MAX_ALIASES, "aliases")
    for a in spec.pool.aliases:
        if limits.check_alias("pool.aliases", a) == "latest":
            raise field_error("pool.aliases", "'latest' always moves to the new version; it is not an extra alias")


class _Shape:
    """What `oracles.check_fits` reads of a data set, from a stored spec."""

    def __init__(self, input_shape: list[int], num_classes: int):
        self.input_shape = tuple(input_shape)
        self.classes = range(num_classes)


def _check_base(base: BaseSpec, spec: JobSpec) -> None:
    limits.parse_pool_ref("base.pool", base.pool)
    limits.check_id("base.library_id", base.library_id)
    limits.check_sha256("base.library_sha256", base.library_sha256)
    limits.check_network_config("base.library_config", base.library_config)
    oracles.wrn_config(base.library_config, "base.library_config")
    if base.library_oracle_id:
        limits.check_id("base.library_oracle_id", base.library_oracle_id)
    limits.check_int_range("base.hierarchy_version", base.hierarchy_version, 1, limits.MAX_INT32)
    if not isinstance(base.dropped, list) or not all(isinstance(t, str) for t in base.dropped):
        raise field_error("base.dropped", "expected a list of task names")
    for task, x in base.reuse.items():
        where = f"base.reuse.{limits.quote(task)}"
        limits.check_id(f"{where}.id", x.id)
        limits.check_sha256(f"{where}.sha256", x.sha256)
        limits.check_expert_config(f"{where}.config", x.config)
        if not isinstance(x.class_ids, list) or not x.class_ids:
            raise field_error(f"{where}.class_ids", "expected a non-empty list of class ids")
        for i in x.class_ids:
            limits.check_int_range(f"{where}.class_ids", i, 0, spec.num_classes - 1)
        limits.check_int_range(f"{where}.hierarchy_version", x.hierarchy_version, 1, limits.MAX_INT32)
        limits.check_int_range(f"{where}.params", x.params, 0, limits.MAX_INT64)
        if x.val_accuracy is not None:
            _float_in(f"{where}.val_accuracy", x.val_accuracy, 0.0, 1.0)
        for name in ("metrics", "loss"):
            limits.check_json_object(f"{where}.{name}", getattr(x, name))
