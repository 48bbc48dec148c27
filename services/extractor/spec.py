"""The job spec: everything an extraction job needs to run, or to resume after a restart.

`plan.Planner` resolves a StartExtraction request into a `JobSpec` once. It is stored as the job's
`params_json` in the registry (format poe.extraction/v1: `{"format": ..., **dataclasses.asdict(spec)}`),
handed to the worker as JSON, and read back with `JobSpec.from_dict`, which refuses unknown and
missing keys so that a spec never half-loads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from poe.engine.errors import InvalidArgument
from poe.engine.train import CKDSettings, Schedule

FORMAT = "poe.extraction/v1"


def _keys(cls, data, where: str, extra: tuple[str, ...] = ()) -> dict:
    """A copy of `data` after checking that it is an object with exactly the fields of `cls` (and `extra`)."""
    if not isinstance(data, dict):
        raise InvalidArgument(f"{where}: expected an object, got {type(data).__name__}")
    expected = {f.name for f in fields(cls)} | set(extra)
    unknown, missing = sorted(set(data) - expected), sorted(expected - set(data))
    if unknown or missing:
        problems = ([f"unknown key(s) {', '.join(unknown)}"] if unknown else []) + \
                   ([f"missing key(s) {', '.join(missing)}"] if missing else [])
        raise InvalidArgument(f"{where}: {'; '.join(problems)}")
    return dict(data)


def _flat(cls, data, where: str):
    """A dataclass without nested dataclasses, from its dict."""
    return cls(**_keys(cls, data, where))


# The key beside the spec in a job's stored params: the POE_EXTRACTOR_ID of the extractor that started it.
EXTRACTOR_KEY = "extractor"


@dataclass(frozen=True)
class RayResources:
    """What the job's Ray tasks ask for; 0 everywhere: the extractor's POE_RAY_* settings."""

    workers: int = 0  # tasks per stage (shards, experts at once)
    cpus_per_task: float = 0.0  # also the task's torch threads
    gpus_per_task: float = 0.0
    library_workers: int = 0  # data-parallel workers of the library's KD


@dataclass(frozen=True)
class PoolTarget:
    """The pool version a job publishes."""

    name: str
    version: str
    aliases: list[str]

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class StudentShape:
    """The WRN student distilled from the oracle (its front becomes the library)."""

    depth: int
    width: int
    stem_stride: int


@dataclass(frozen=True)
class ExpertShape:
    width: int
    blocks: int


@dataclass(frozen=True)
class RegistryOracle:
    """A safetensors WideResNet registered in the registry (downloaded into the run directory)."""

    id: int
    config: dict  # its WRNConfig
    kind: str = "registry"


@dataclass(frozen=True)
class TorchScriptOracle:
    """A TorchScript module copied into the run directory when the job started (never registered)."""

    file: str
    source: str
    sha256: str
    num_classes: int
    kind: str = "torchscript"


ORACLE_KINDS = {"registry": RegistryOracle, "torchscript": TorchScriptOracle}
Oracle = RegistryOracle | TorchScriptOracle


def oracle_from_dict(data, where: str = "job spec: oracle") -> Oracle:
    if not isinstance(data, dict):
        raise InvalidArgument(f"{where}: expected an object, got {type(data).__name__}")
    kind = data.get("kind")
    if kind not in ORACLE_KINDS:
        raise InvalidArgument(f"{where}: kind must be one of {', '.join(ORACLE_KINDS)}, got {kind!r}")
    return _flat(ORACLE_KINDS[kind], data, where)


@dataclass(frozen=True)
class ReusedExpert:
    """An expert of the base pool that the job's pool takes over (same task name and classes)."""

    id: int
    sha256: str
    class_ids: list[int]
    config: dict
    params: int
    hierarchy_version: int
    val_accuracy: float | None
    metrics: dict
    loss: dict


@dataclass(frozen=True)
class BaseSpec:
    """Incremental jobs: the base pool whose library is reused, and the experts it lends."""

    pool: str  # name@version
    library_id: int
    library_sha256: str
    library_config: dict
    library_oracle_id: int
    hierarchy_version: int
    reuse: dict[str, ReusedExpert]  # task -> expert
    dropped: list[str]  # base experts whose task the job's hierarchy no longer has

    @classmethod
    def from_dict(cls, data, where: str = "job spec: base") -> BaseSpec:
        d = _keys(cls, data, where)
        if not isinstance(d["reuse"], dict):
            raise InvalidArgument(f"{where}.reuse: expected an object, got {type(d['reuse']).__name__}")
        d["reuse"] = {task: _flat(ReusedExpert, x, f"{where}.reuse.{task}") for task, x in d["reuse"].items()}
        return cls(**d)


@dataclass(frozen=True)
class JobSpec:
    request: dict  # the StartExtraction parameters as JSON (what an idempotent retry is compared with)
    dataset: str  # a built-in data set's name or an absolute path on the extractor
    subset: int
    seed: int
    views: int
    input_shape: list[int]  # [C, H, W]
    num_classes: int
    train_images: int
    hierarchy: dict  # Hierarchy.to_dict()
    tasks: list[str]  # to train, in hierarchy order
    oracle: Oracle
    base: BaseSpec | None
    student: StudentShape | None  # None with a base pool (its library is reused)
    expert: ExpertShape
    library_schedule: Schedule | None
    expert_schedule: Schedule
    ckd: CKDSettings
    device: str
    pool: PoolTarget
    resources: RayResources = RayResources()

    @property
    def ref(self) -> str:
        return self.pool.ref

    @property
    def hierarchy_dataset(self) -> str:
        return self.hierarchy["dataset"]

    @property
    def hierarchy_version(self) -> int:
        return int(self.hierarchy["version"])

    @property
    def registered_oracle_id(self) -> int | None:
        return self.oracle.id if isinstance(self.oracle, RegistryOracle) else None

    def to_dict(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data, where: str = "job spec") -> JobSpec:
        if isinstance(data, dict) and "resources" not in data:  # stored before jobs had their own
            data = {**data, "resources": asdict(RayResources())}
        d = _keys(cls, data, where, extra=("format",))
        if d.pop("format") != FORMAT:
            raise InvalidArgument(f"{where}: format {data['format']!r}, expected {FORMAT!r}")
        d["oracle"] = oracle_from_dict(d["oracle"], f"{where}: oracle")
        d["base"] = None if d["base"] is None else BaseSpec.from_dict(d["base"], f"{where}: base")
        d["student"] = None if d["student"] is None else _flat(StudentShape, d["student"], f"{where}: student")
        d["expert"] = _flat(ExpertShape, d["expert"], f"{where}: expert")
        d["library_schedule"] = None if d["library_schedule"] is None else \
            _flat(Schedule, d["library_schedule"], f"{where}: library_schedule")
        d["expert_schedule"] = _flat(Schedule, d["expert_schedule"], f"{where}: expert_schedule")
        d["ckd"] = _flat(CKDSettings, d["ckd"], f"{where}: ckd")
        d["pool"] = _flat(PoolTarget, d["pool"], f"{where}: pool")
        d["resources"] = _flat(RayResources, d["resources"], f"{where}: resources")
        for name in ("request", "hierarchy"):
            if not isinstance(d[name], dict):
                raise InvalidArgument(f"{where}: {name}: expected an object, got {type(d[name]).__name__}")
        return cls(**d)
