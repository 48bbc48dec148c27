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

class ModelFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_FORMAT_UNSPECIFIED: _ClassVar[ModelFormat]
    MODEL_FORMAT_TORCHSCRIPT: _ClassVar[ModelFormat]
    MODEL_FORMAT_SAFETENSORS: _ClassVar[ModelFormat]
    MODEL_FORMAT_PT2: _ClassVar[ModelFormat]
    MODEL_FORMAT_ONNX: _ClassVar[ModelFormat]
EXECUTION_UNSPECIFIED: Execution
EXECUTION_FUSED: Execution
EXECUTION_REFERENCE: Execution
MODEL_FORMAT_UNSPECIFIED: ModelFormat
MODEL_FORMAT_TORCHSCRIPT: ModelFormat
MODEL_FORMAT_SAFETENSORS: ModelFormat
MODEL_FORMAT_PT2: ModelFormat
MODEL_FORMAT_ONNX: ModelFormat

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
    format: ModelFormat
    def __init__(self, pool: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., tasks: _Optional[_Iterable[str]] = ..., execution: _Optional[_Union[Execution, str]] = ..., format: _Optional[_Union[ModelFormat, str]] = ...) -> None: ...

class ComposedModelHeader(_message.Message):
    __slots__ = ("model_id", "pool", "classes", "class_ids", "tasks", "expert_ids", "params", "flops", "size", "sha256", "format", "execution", "input_shape", "expected_accuracy", "cache_hit", "metadata_json", "degraded", "degraded_tasks")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    CLASS_IDS_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    FLOPS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_TASKS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    pool: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    class_ids: _containers.RepeatedScalarFieldContainer[int]
    tasks: _containers.RepeatedScalarFieldContainer[str]
    expert_ids: _containers.RepeatedScalarFieldContainer[int]
    params: int
    flops: int
    size: int
    sha256: str
    format: ModelFormat
    execution: Execution
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    expected_accuracy: float
    cache_hit: bool
    metadata_json: str
    degraded: bool
    degraded_tasks: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_id: _Optional[str] = ..., pool: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., class_ids: _Optional[_Iterable[int]] = ..., tasks: _Optional[_Iterable[str]] = ..., expert_ids: _Optional[_Iterable[int]] = ..., params: _Optional[int] = ..., flops: _Optional[int] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., format: _Optional[_Union[ModelFormat, str]] = ..., execution: _Optional[_Union[Execution, str]] = ..., input_shape: _Optional[_Iterable[int]] = ..., expected_accuracy: _Optional[float] = ..., cache_hit: _Optional[bool] = ..., metadata_json: _Optional[str] = ..., degraded: _Optional[bool] = ..., degraded_tasks: _Optional[_Iterable[str]] = ...) -> None: ...

class ComposeModelResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ComposedModelHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[ComposedModelHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class DescribeCompositionRequest(_message.Message):
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
    format: ModelFormat
    def __init__(self, pool: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., tasks: _Optional[_Iterable[str]] = ..., execution: _Optional[_Union[Execution, str]] = ..., format: _Optional[_Union[ModelFormat, str]] = ...) -> None: ...

class DescribeCompositionResponse(_message.Message):
    __slots__ = ("header",)
    HEADER_FIELD_NUMBER: _ClassVar[int]
    header: ComposedModelHeader
    def __init__(self, header: _Optional[_Union[ComposedModelHeader, _Mapping]] = ...) -> None: ...
