from poe.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExtractionParams(_message.Message):
    __slots__ = ("oracle_id", "dataset", "hierarchy_version", "pool_name", "pool_version", "student_depth", "student_width", "expert_width", "library_epochs", "expert_epochs", "batch_size", "lr", "temperature", "soft_weight", "scale_weight", "seed", "subset")
    ORACLE_ID_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    HIERARCHY_VERSION_FIELD_NUMBER: _ClassVar[int]
    POOL_NAME_FIELD_NUMBER: _ClassVar[int]
    POOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    STUDENT_DEPTH_FIELD_NUMBER: _ClassVar[int]
    STUDENT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    EXPERT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    LIBRARY_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SOFT_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SCALE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SUBSET_FIELD_NUMBER: _ClassVar[int]
    oracle_id: int
    dataset: str
    hierarchy_version: int
    pool_name: str
    pool_version: str
    student_depth: int
    student_width: int
    expert_width: int
    library_epochs: int
    expert_epochs: int
    batch_size: int
    lr: float
    temperature: float
    soft_weight: float
    scale_weight: float
    seed: int
    subset: int
    def __init__(self, oracle_id: _Optional[int] = ..., dataset: _Optional[str] = ..., hierarchy_version: _Optional[int] = ..., pool_name: _Optional[str] = ..., pool_version: _Optional[str] = ..., student_depth: _Optional[int] = ..., student_width: _Optional[int] = ..., expert_width: _Optional[int] = ..., library_epochs: _Optional[int] = ..., expert_epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., lr: _Optional[float] = ..., temperature: _Optional[float] = ..., soft_weight: _Optional[float] = ..., scale_weight: _Optional[float] = ..., seed: _Optional[int] = ..., subset: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _common_pb2.ExtractionJob
    def __init__(self, job: _Optional[_Union[_common_pb2.ExtractionJob, _Mapping]] = ...) -> None: ...

class GetExtractionRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetExtractionResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _common_pb2.ExtractionJob
    def __init__(self, job: _Optional[_Union[_common_pb2.ExtractionJob, _Mapping]] = ...) -> None: ...

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
