from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Execution(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXECUTION_UNSPECIFIED: _ClassVar[Execution]
    EXECUTION_FUSED: _ClassVar[Execution]
    EXECUTION_REFERENCE: _ClassVar[Execution]
EXECUTION_UNSPECIFIED: Execution
EXECUTION_FUSED: Execution
EXECUTION_REFERENCE: Execution

class ComposeModelRequest(_message.Message):
    __slots__ = ("pool", "classes", "tasks", "execution", "format")
    POOL_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    pool: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    tasks: _containers.RepeatedScalarFieldContainer[str]
    execution: Execution
    format: str
    def __init__(self, pool: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., tasks: _Optional[_Iterable[str]] = ..., execution: _Optional[_Union[Execution, str]] = ..., format: _Optional[str] = ...) -> None: ...

class ComposedModelHeader(_message.Message):
    __slots__ = ("pool", "classes", "class_ids", "experts", "params", "size", "sha256", "format", "input_shape", "metadata_json", "cache_hit")
    POOL_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    CLASS_IDS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    pool: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    class_ids: _containers.RepeatedScalarFieldContainer[int]
    experts: _containers.RepeatedScalarFieldContainer[str]
    params: int
    size: int
    sha256: str
    format: str
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    metadata_json: str
    cache_hit: bool
    def __init__(self, pool: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., class_ids: _Optional[_Iterable[int]] = ..., experts: _Optional[_Iterable[str]] = ..., params: _Optional[int] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., format: _Optional[str] = ..., input_shape: _Optional[_Iterable[int]] = ..., metadata_json: _Optional[str] = ..., cache_hit: _Optional[bool] = ...) -> None: ...

class ComposeModelResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ComposedModelHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[ComposedModelHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class DescribeCompositionRequest(_message.Message):
    __slots__ = ("pool", "classes", "tasks", "execution")
    POOL_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_FIELD_NUMBER: _ClassVar[int]
    pool: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    tasks: _containers.RepeatedScalarFieldContainer[str]
    execution: Execution
    def __init__(self, pool: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., tasks: _Optional[_Iterable[str]] = ..., execution: _Optional[_Union[Execution, str]] = ...) -> None: ...

class DescribeCompositionResponse(_message.Message):
    __slots__ = ("pool", "classes", "class_ids", "experts", "params", "input_shape", "cached")
    POOL_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    CLASS_IDS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    pool: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    class_ids: _containers.RepeatedScalarFieldContainer[int]
    experts: _containers.RepeatedScalarFieldContainer[str]
    params: int
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    cached: bool
    def __init__(self, pool: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., class_ids: _Optional[_Iterable[int]] = ..., experts: _Optional[_Iterable[str]] = ..., params: _Optional[int] = ..., input_shape: _Optional[_Iterable[int]] = ..., cached: _Optional[bool] = ...) -> None: ...
