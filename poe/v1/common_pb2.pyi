import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExtractionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXTRACTION_STATE_UNSPECIFIED: _ClassVar[ExtractionState]
    EXTRACTION_STATE_PENDING: _ClassVar[ExtractionState]
    EXTRACTION_STATE_RUNNING: _ClassVar[ExtractionState]
    EXTRACTION_STATE_SUCCEEDED: _ClassVar[ExtractionState]
    EXTRACTION_STATE_FAILED: _ClassVar[ExtractionState]
    EXTRACTION_STATE_CANCELLED: _ClassVar[ExtractionState]
EXTRACTION_STATE_UNSPECIFIED: ExtractionState
EXTRACTION_STATE_PENDING: ExtractionState
EXTRACTION_STATE_RUNNING: ExtractionState
EXTRACTION_STATE_SUCCEEDED: ExtractionState
EXTRACTION_STATE_FAILED: ExtractionState
EXTRACTION_STATE_CANCELLED: ExtractionState

class BlobRef(_message.Message):
    __slots__ = ("sha256", "size", "media_type")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size: int
    media_type: str
    def __init__(self, sha256: _Optional[str] = ..., size: _Optional[int] = ..., media_type: _Optional[str] = ...) -> None: ...

class PrimitiveTask(_message.Message):
    __slots__ = ("name", "class_ids", "class_names")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CLASS_IDS_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    name: str
    class_ids: _containers.RepeatedScalarFieldContainer[int]
    class_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., class_ids: _Optional[_Iterable[int]] = ..., class_names: _Optional[_Iterable[str]] = ...) -> None: ...

class Hierarchy(_message.Message):
    __slots__ = ("dataset", "version", "classes", "tasks")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    version: int
    classes: _containers.RepeatedScalarFieldContainer[str]
    tasks: _containers.RepeatedCompositeFieldContainer[PrimitiveTask]
    def __init__(self, dataset: _Optional[str] = ..., version: _Optional[int] = ..., classes: _Optional[_Iterable[str]] = ..., tasks: _Optional[_Iterable[_Union[PrimitiveTask, _Mapping]]] = ...) -> None: ...

class ExtractionJob(_message.Message):
    __slots__ = ("id", "state", "progress", "stage", "message", "params_json", "error", "oracle_id", "pool", "create_time", "update_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ORACLE_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: ExtractionState
    progress: float
    stage: str
    message: str
    params_json: str
    error: str
    oracle_id: int
    pool: str
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[ExtractionState, str]] = ..., progress: _Optional[float] = ..., stage: _Optional[str] = ..., message: _Optional[str] = ..., params_json: _Optional[str] = ..., error: _Optional[str] = ..., oracle_id: _Optional[int] = ..., pool: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
