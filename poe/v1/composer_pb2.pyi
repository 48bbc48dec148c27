from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper

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
    def __init__(self, pool: str | None = ..., classes: _Iterable[str] | None = ..., tasks: _Iterable[str] | None = ..., execution: Execution | str | None = ..., format: str | None = ...) -> None: ...

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
    def __init__(self, pool: str | None = ..., classes: _Iterable[str] | None = ..., class_ids: _Iterable[int] | None = ..., experts: _Iterable[str] | None = ..., params: int | None = ..., size: int | None = ..., sha256: str | None = ..., format: str | None = ..., input_shape: _Iterable[int] | None = ..., metadata_json: str | None = ..., cache_hit: bool | None = ...) -> None: ...

class ComposeModelResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ComposedModelHeader
    chunk: bytes
    def __init__(self, header: ComposedModelHeader | _Mapping | None = ..., chunk: bytes | None = ...) -> None: ...

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
    def __init__(self, pool: str | None = ..., classes: _Iterable[str] | None = ..., tasks: _Iterable[str] | None = ..., execution: Execution | str | None = ...) -> None: ...

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
    def __init__(self, pool: str | None = ..., classes: _Iterable[str] | None = ..., class_ids: _Iterable[int] | None = ..., experts: _Iterable[str] | None = ..., params: int | None = ..., input_shape: _Iterable[int] | None = ..., cached: bool | None = ...) -> None: ...
