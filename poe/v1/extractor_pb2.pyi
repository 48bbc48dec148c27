from poe.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OracleSource(_message.Message):
    __slots__ = ("registry_id", "path", "config_json")
    REGISTRY_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    registry_id: int
    path: str
    config_json: str
    def __init__(self, registry_id: _Optional[int] = ..., path: _Optional[str] = ..., config_json: _Optional[str] = ...) -> None: ...

class ExtractionParams(_message.Message):
    __slots__ = ("oracle", "dataset", "hierarchy", "hierarchy_text", "tasks", "base_pool", "pool_name", "pool_version", "aliases", "student_depth", "student_width", "stem_stride", "expert_width", "library_epochs", "expert_epochs", "batch_size", "lr", "temperature", "soft_weight", "scale_weight", "views", "seed", "subset", "device", "ray_workers", "ray_cpus_per_task", "ray_gpus_per_task", "library_workers")
    ORACLE_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    HIERARCHY_FIELD_NUMBER: _ClassVar[int]
    HIERARCHY_TEXT_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    BASE_POOL_FIELD_NUMBER: _ClassVar[int]
    POOL_NAME_FIELD_NUMBER: _ClassVar[int]
    POOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    STUDENT_DEPTH_FIELD_NUMBER: _ClassVar[int]
    STUDENT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    STEM_STRIDE_FIELD_NUMBER: _ClassVar[int]
    EXPERT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    LIBRARY_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SOFT_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SCALE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    VIEWS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SUBSET_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    RAY_WORKERS_FIELD_NUMBER: _ClassVar[int]
    RAY_CPUS_PER_TASK_FIELD_NUMBER: _ClassVar[int]
    RAY_GPUS_PER_TASK_FIELD_NUMBER: _ClassVar[int]
    LIBRARY_WORKERS_FIELD_NUMBER: _ClassVar[int]
    oracle: OracleSource
    dataset: str
    hierarchy: str
    hierarchy_text: str
    tasks: _containers.RepeatedScalarFieldContainer[str]
    base_pool: str
    pool_name: str
    pool_version: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    student_depth: int
    student_width: int
    stem_stride: int
    expert_width: int
    library_epochs: int
    expert_epochs: int
    batch_size: int
    lr: float
    temperature: float
    soft_weight: float
    scale_weight: float
    views: int
    seed: int
    subset: int
    device: str
    ray_workers: int
    ray_cpus_per_task: float
    ray_gpus_per_task: float
    library_workers: int
    def __init__(self, oracle: _Optional[_Union[OracleSource, _Mapping]] = ..., dataset: _Optional[str] = ..., hierarchy: _Optional[str] = ..., hierarchy_text: _Optional[str] = ..., tasks: _Optional[_Iterable[str]] = ..., base_pool: _Optional[str] = ..., pool_name: _Optional[str] = ..., pool_version: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ..., student_depth: _Optional[int] = ..., student_width: _Optional[int] = ..., stem_stride: _Optional[int] = ..., expert_width: _Optional[int] = ..., library_epochs: _Optional[int] = ..., expert_epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., lr: _Optional[float] = ..., temperature: _Optional[float] = ..., soft_weight: _Optional[float] = ..., scale_weight: _Optional[float] = ..., views: _Optional[int] = ..., seed: _Optional[int] = ..., subset: _Optional[int] = ..., device: _Optional[str] = ..., ray_workers: _Optional[int] = ..., ray_cpus_per_task: _Optional[float] = ..., ray_gpus_per_task: _Optional[float] = ..., library_workers: _Optional[int] = ...) -> None: ...

class ExtractionProgress(_message.Message):
    __slots__ = ("phase", "expert", "experts", "task", "epoch", "epochs", "step", "steps", "loss", "fraction", "eta_seconds", "elapsed_seconds", "attempt", "device", "live")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    phase: str
    expert: int
    experts: int
    task: str
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    fraction: float
    eta_seconds: float
    elapsed_seconds: float
    attempt: int
    device: str
    live: bool
    def __init__(self, phase: _Optional[str] = ..., expert: _Optional[int] = ..., experts: _Optional[int] = ..., task: _Optional[str] = ..., epoch: _Optional[int] = ..., epochs: _Optional[int] = ..., step: _Optional[int] = ..., steps: _Optional[int] = ..., loss: _Optional[float] = ..., fraction: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., elapsed_seconds: _Optional[float] = ..., attempt: _Optional[int] = ..., device: _Optional[str] = ..., live: _Optional[bool] = ...) -> None: ...

class StartExtractionRequest(_message.Message):
    __slots__ = ("params", "job_id")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    params: ExtractionParams
    job_id: str
    def __init__(self, params: _Optional[_Union[ExtractionParams, _Mapping]] = ..., job_id: _Optional[str] = ...) -> None: ...

class StartExtractionResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _common_pb2.ExtractionJob
    def __init__(self, job: _Optional[_Union[_common_pb2.ExtractionJob, _Mapping]] = ...) -> None: ...

class WatchExtractionRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class WatchExtractionResponse(_message.Message):
    __slots__ = ("job", "progress")
    JOB_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    job: _common_pb2.ExtractionJob
    progress: ExtractionProgress
    def __init__(self, job: _Optional[_Union[_common_pb2.ExtractionJob, _Mapping]] = ..., progress: _Optional[_Union[ExtractionProgress, _Mapping]] = ...) -> None: ...

class GetExtractionRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetExtractionResponse(_message.Message):
    __slots__ = ("job", "progress")
    JOB_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    job: _common_pb2.ExtractionJob
    progress: ExtractionProgress
    def __init__(self, job: _Optional[_Union[_common_pb2.ExtractionJob, _Mapping]] = ..., progress: _Optional[_Union[ExtractionProgress, _Mapping]] = ...) -> None: ...

class ListExtractionsRequest(_message.Message):
    __slots__ = ("state", "page_size", "page_token")
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.ExtractionState
    page_size: int
    page_token: str
    def __init__(self, state: _Optional[_Union[_common_pb2.ExtractionState, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListExtractionsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.ExtractionJob]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[_common_pb2.ExtractionJob, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelExtractionRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelExtractionResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _common_pb2.ExtractionJob
    def __init__(self, job: _Optional[_Union[_common_pb2.ExtractionJob, _Mapping]] = ...) -> None: ...
