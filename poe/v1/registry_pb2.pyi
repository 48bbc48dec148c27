import datetime
from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers

from poe.v1 import common_pb2 as _common_pb2

DESCRIPTOR: _descriptor.FileDescriptor

class Oracle(_message.Message):
    __slots__ = ("id", "name", "dataset", "config_json", "params", "metrics_json", "blob", "create_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: int
    name: str
    dataset: str
    config_json: str
    params: int
    metrics_json: str
    blob: _common_pb2.BlobRef
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, id: int | None = ..., name: str | None = ..., dataset: str | None = ..., config_json: str | None = ..., params: int | None = ..., metrics_json: str | None = ..., blob: _common_pb2.BlobRef | _Mapping | None = ..., create_time: datetime.datetime | _timestamp_pb2.Timestamp | _Mapping | None = ...) -> None: ...

class Library(_message.Message):
    __slots__ = ("id", "name", "dataset", "oracle_id", "config_json", "params", "metrics_json", "loss_json", "blob", "create_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    ORACLE_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    LOSS_JSON_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: int
    name: str
    dataset: str
    oracle_id: int
    config_json: str
    params: int
    metrics_json: str
    loss_json: str
    blob: _common_pb2.BlobRef
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, id: int | None = ..., name: str | None = ..., dataset: str | None = ..., oracle_id: int | None = ..., config_json: str | None = ..., params: int | None = ..., metrics_json: str | None = ..., loss_json: str | None = ..., blob: _common_pb2.BlobRef | _Mapping | None = ..., create_time: datetime.datetime | _timestamp_pb2.Timestamp | _Mapping | None = ...) -> None: ...

class Expert(_message.Message):
    __slots__ = ("id", "library_id", "dataset", "hierarchy_version", "task", "class_ids", "class_names", "config_json", "params", "val_accuracy", "metrics_json", "loss_json", "blob", "create_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    LIBRARY_ID_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    HIERARCHY_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    CLASS_IDS_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    VAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    LOSS_JSON_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: int
    library_id: int
    dataset: str
    hierarchy_version: int
    task: str
    class_ids: _containers.RepeatedScalarFieldContainer[int]
    class_names: _containers.RepeatedScalarFieldContainer[str]
    config_json: str
    params: int
    val_accuracy: float
    metrics_json: str
    loss_json: str
    blob: _common_pb2.BlobRef
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, id: int | None = ..., library_id: int | None = ..., dataset: str | None = ..., hierarchy_version: int | None = ..., task: str | None = ..., class_ids: _Iterable[int] | None = ..., class_names: _Iterable[str] | None = ..., config_json: str | None = ..., params: int | None = ..., val_accuracy: float | None = ..., metrics_json: str | None = ..., loss_json: str | None = ..., blob: _common_pb2.BlobRef | _Mapping | None = ..., create_time: datetime.datetime | _timestamp_pb2.Timestamp | _Mapping | None = ...) -> None: ...

class PoolVersion(_message.Message):
    __slots__ = ("name", "version", "aliases", "dataset", "hierarchy", "library", "experts", "info_json", "description", "publish_time", "params")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    HIERARCHY_FIELD_NUMBER: _ClassVar[int]
    LIBRARY_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    INFO_JSON_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_TIME_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    dataset: str
    hierarchy: _common_pb2.Hierarchy
    library: Library
    experts: _containers.RepeatedCompositeFieldContainer[Expert]
    info_json: str
    description: str
    publish_time: _timestamp_pb2.Timestamp
    params: int
    def __init__(self, name: str | None = ..., version: str | None = ..., aliases: _Iterable[str] | None = ..., dataset: str | None = ..., hierarchy: _common_pb2.Hierarchy | _Mapping | None = ..., library: Library | _Mapping | None = ..., experts: _Iterable[Expert | _Mapping] | None = ..., info_json: str | None = ..., description: str | None = ..., publish_time: datetime.datetime | _timestamp_pb2.Timestamp | _Mapping | None = ..., params: int | None = ...) -> None: ...

class ComposedModel(_message.Message):
    __slots__ = ("pool", "class_ids", "format", "blob", "hits", "metadata_json", "create_time", "last_hit_time")
    POOL_FIELD_NUMBER: _ClassVar[int]
    CLASS_IDS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_HIT_TIME_FIELD_NUMBER: _ClassVar[int]
    pool: str
    class_ids: _containers.RepeatedScalarFieldContainer[int]
    format: str
    blob: _common_pb2.BlobRef
    hits: int
    metadata_json: str
    create_time: _timestamp_pb2.Timestamp
    last_hit_time: _timestamp_pb2.Timestamp
    def __init__(self, pool: str | None = ..., class_ids: _Iterable[int] | None = ..., format: str | None = ..., blob: _common_pb2.BlobRef | _Mapping | None = ..., hits: int | None = ..., metadata_json: str | None = ..., create_time: datetime.datetime | _timestamp_pb2.Timestamp | _Mapping | None = ..., last_hit_time: datetime.datetime | _timestamp_pb2.Timestamp | _Mapping | None = ...) -> None: ...

class LineageNode(_message.Message):
    __slots__ = ("kind", "id", "name", "blob")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    kind: str
    id: str
    name: str
    blob: _common_pb2.BlobRef
    def __init__(self, kind: str | None = ..., id: str | None = ..., name: str | None = ..., blob: _common_pb2.BlobRef | _Mapping | None = ...) -> None: ...

class RegisterHierarchyRequest(_message.Message):
    __slots__ = ("hierarchy",)
    HIERARCHY_FIELD_NUMBER: _ClassVar[int]
    hierarchy: _common_pb2.Hierarchy
    def __init__(self, hierarchy: _common_pb2.Hierarchy | _Mapping | None = ...) -> None: ...

class RegisterHierarchyResponse(_message.Message):
    __slots__ = ("hierarchy", "created")
    HIERARCHY_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    hierarchy: _common_pb2.Hierarchy
    created: bool
    def __init__(self, hierarchy: _common_pb2.Hierarchy | _Mapping | None = ..., created: bool | None = ...) -> None: ...

class GetHierarchyRequest(_message.Message):
    __slots__ = ("dataset", "version")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    version: int
    def __init__(self, dataset: str | None = ..., version: int | None = ...) -> None: ...

class GetHierarchyResponse(_message.Message):
    __slots__ = ("hierarchy",)
    HIERARCHY_FIELD_NUMBER: _ClassVar[int]
    hierarchy: _common_pb2.Hierarchy
    def __init__(self, hierarchy: _common_pb2.Hierarchy | _Mapping | None = ...) -> None: ...

class OracleMetadata(_message.Message):
    __slots__ = ("name", "dataset", "config_json", "params", "metrics_json", "sha256", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dataset: str
    config_json: str
    params: int
    metrics_json: str
    sha256: str
    size: int
    def __init__(self, name: str | None = ..., dataset: str | None = ..., config_json: str | None = ..., params: int | None = ..., metrics_json: str | None = ..., sha256: str | None = ..., size: int | None = ...) -> None: ...

class RegisterOracleRequest(_message.Message):
    __slots__ = ("metadata", "chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: OracleMetadata
    chunk: bytes
    def __init__(self, metadata: OracleMetadata | _Mapping | None = ..., chunk: bytes | None = ...) -> None: ...

class RegisterOracleResponse(_message.Message):
    __slots__ = ("oracle", "created")
    ORACLE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    oracle: Oracle
    created: bool
    def __init__(self, oracle: Oracle | _Mapping | None = ..., created: bool | None = ...) -> None: ...

class GetOracleRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: int | None = ...) -> None: ...

class GetOracleResponse(_message.Message):
    __slots__ = ("oracle",)
    ORACLE_FIELD_NUMBER: _ClassVar[int]
    oracle: Oracle
    def __init__(self, oracle: Oracle | _Mapping | None = ...) -> None: ...

class LibraryMetadata(_message.Message):
    __slots__ = ("name", "dataset", "oracle_id", "config_json", "params", "metrics_json", "loss_json", "sha256", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    ORACLE_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    LOSS_JSON_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dataset: str
    oracle_id: int
    config_json: str
    params: int
    metrics_json: str
    loss_json: str
    sha256: str
    size: int
    def __init__(self, name: str | None = ..., dataset: str | None = ..., oracle_id: int | None = ..., config_json: str | None = ..., params: int | None = ..., metrics_json: str | None = ..., loss_json: str | None = ..., sha256: str | None = ..., size: int | None = ...) -> None: ...

class RegisterLibraryRequest(_message.Message):
    __slots__ = ("metadata", "chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: LibraryMetadata
    chunk: bytes
    def __init__(self, metadata: LibraryMetadata | _Mapping | None = ..., chunk: bytes | None = ...) -> None: ...

class RegisterLibraryResponse(_message.Message):
    __slots__ = ("library", "created")
    LIBRARY_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    library: Library
    created: bool
    def __init__(self, library: Library | _Mapping | None = ..., created: bool | None = ...) -> None: ...

class GetLibraryRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: int | None = ...) -> None: ...

class GetLibraryResponse(_message.Message):
    __slots__ = ("library",)
    LIBRARY_FIELD_NUMBER: _ClassVar[int]
    library: Library
    def __init__(self, library: Library | _Mapping | None = ...) -> None: ...

class ExpertMetadata(_message.Message):
    __slots__ = ("library_id", "hierarchy_version", "task", "class_ids", "config_json", "params", "val_accuracy", "metrics_json", "loss_json", "sha256", "size")
    LIBRARY_ID_FIELD_NUMBER: _ClassVar[int]
    HIERARCHY_VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    CLASS_IDS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    VAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    LOSS_JSON_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    library_id: int
    hierarchy_version: int
    task: str
    class_ids: _containers.RepeatedScalarFieldContainer[int]
    config_json: str
    params: int
    val_accuracy: float
    metrics_json: str
    loss_json: str
    sha256: str
    size: int
    def __init__(self, library_id: int | None = ..., hierarchy_version: int | None = ..., task: str | None = ..., class_ids: _Iterable[int] | None = ..., config_json: str | None = ..., params: int | None = ..., val_accuracy: float | None = ..., metrics_json: str | None = ..., loss_json: str | None = ..., sha256: str | None = ..., size: int | None = ...) -> None: ...

class RegisterExpertRequest(_message.Message):
    __slots__ = ("metadata", "chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: ExpertMetadata
    chunk: bytes
    def __init__(self, metadata: ExpertMetadata | _Mapping | None = ..., chunk: bytes | None = ...) -> None: ...

class RegisterExpertResponse(_message.Message):
    __slots__ = ("expert", "created")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    expert: Expert
    created: bool
    def __init__(self, expert: Expert | _Mapping | None = ..., created: bool | None = ...) -> None: ...

class GetExpertRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: int | None = ...) -> None: ...

class GetExpertResponse(_message.Message):
    __slots__ = ("expert",)
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    expert: Expert
    def __init__(self, expert: Expert | _Mapping | None = ...) -> None: ...

class ListExpertsRequest(_message.Message):
    __slots__ = ("dataset", "class_name", "task", "library_id", "pool", "page_size", "page_token")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    LIBRARY_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    class_name: str
    task: str
    library_id: int
    pool: str
    page_size: int
    page_token: str
    def __init__(self, dataset: str | None = ..., class_name: str | None = ..., task: str | None = ..., library_id: int | None = ..., pool: str | None = ..., page_size: int | None = ..., page_token: str | None = ...) -> None: ...

class ListExpertsResponse(_message.Message):
    __slots__ = ("experts", "next_page_token")
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[Expert]
    next_page_token: str
    def __init__(self, experts: _Iterable[Expert | _Mapping] | None = ..., next_page_token: str | None = ...) -> None: ...

class PublishPoolRequest(_message.Message):
    __slots__ = ("name", "version", "library_id", "expert_ids", "info_json", "description", "aliases")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LIBRARY_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    INFO_JSON_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    library_id: int
    expert_ids: _containers.RepeatedScalarFieldContainer[int]
    info_json: str
    description: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: str | None = ..., version: str | None = ..., library_id: int | None = ..., expert_ids: _Iterable[int] | None = ..., info_json: str | None = ..., description: str | None = ..., aliases: _Iterable[str] | None = ...) -> None: ...

class PublishPoolResponse(_message.Message):
    __slots__ = ("pool", "created")
    POOL_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    pool: PoolVersion
    created: bool
    def __init__(self, pool: PoolVersion | _Mapping | None = ..., created: bool | None = ...) -> None: ...

class GetPoolRequest(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: str
    def __init__(self, pool: str | None = ...) -> None: ...

class GetPoolResponse(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: PoolVersion
    def __init__(self, pool: PoolVersion | _Mapping | None = ...) -> None: ...

class ListPoolsRequest(_message.Message):
    __slots__ = ("name", "dataset", "class_name", "alias", "page_size", "page_token")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    dataset: str
    class_name: str
    alias: str
    page_size: int
    page_token: str
    def __init__(self, name: str | None = ..., dataset: str | None = ..., class_name: str | None = ..., alias: str | None = ..., page_size: int | None = ..., page_token: str | None = ...) -> None: ...

class ListPoolsResponse(_message.Message):
    __slots__ = ("pools", "next_page_token")
    POOLS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    pools: _containers.RepeatedCompositeFieldContainer[PoolVersion]
    next_page_token: str
    def __init__(self, pools: _Iterable[PoolVersion | _Mapping] | None = ..., next_page_token: str | None = ...) -> None: ...

class SetPoolAliasRequest(_message.Message):
    __slots__ = ("name", "alias", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    alias: str
    version: str
    def __init__(self, name: str | None = ..., alias: str | None = ..., version: str | None = ...) -> None: ...

class SetPoolAliasResponse(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: PoolVersion
    def __init__(self, pool: PoolVersion | _Mapping | None = ...) -> None: ...

class DeletePoolAliasRequest(_message.Message):
    __slots__ = ("name", "alias")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    alias: str
    def __init__(self, name: str | None = ..., alias: str | None = ...) -> None: ...

class DeletePoolAliasResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeletePoolVersionRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: str | None = ..., version: str | None = ...) -> None: ...

class DeletePoolVersionResponse(_message.Message):
    __slots__ = ("deleted_cache_entries",)
    DELETED_CACHE_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    deleted_cache_entries: int
    def __init__(self, deleted_cache_entries: int | None = ...) -> None: ...

class ResolveClassesRequest(_message.Message):
    __slots__ = ("pool", "classes", "tasks")
    POOL_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    pool: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    tasks: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, pool: str | None = ..., classes: _Iterable[str] | None = ..., tasks: _Iterable[str] | None = ...) -> None: ...

class ResolveClassesResponse(_message.Message):
    __slots__ = ("pool", "class_ids", "class_names", "library", "experts", "info_json")
    POOL_FIELD_NUMBER: _ClassVar[int]
    CLASS_IDS_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    LIBRARY_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    INFO_JSON_FIELD_NUMBER: _ClassVar[int]
    pool: str
    class_ids: _containers.RepeatedScalarFieldContainer[int]
    class_names: _containers.RepeatedScalarFieldContainer[str]
    library: Library
    experts: _containers.RepeatedCompositeFieldContainer[Expert]
    info_json: str
    def __init__(self, pool: str | None = ..., class_ids: _Iterable[int] | None = ..., class_names: _Iterable[str] | None = ..., library: Library | _Mapping | None = ..., experts: _Iterable[Expert | _Mapping] | None = ..., info_json: str | None = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("sha256", "offset", "length")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    offset: int
    length: int
    def __init__(self, sha256: str | None = ..., offset: int | None = ..., length: int | None = ...) -> None: ...

class DownloadResponse(_message.Message):
    __slots__ = ("blob", "offset", "data")
    BLOB_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    blob: _common_pb2.BlobRef
    offset: int
    data: bytes
    def __init__(self, blob: _common_pb2.BlobRef | _Mapping | None = ..., offset: int | None = ..., data: bytes | None = ...) -> None: ...

class ComposedModelMetadata(_message.Message):
    __slots__ = ("pool", "class_ids", "format", "metadata_json", "sha256", "size")
    POOL_FIELD_NUMBER: _ClassVar[int]
    CLASS_IDS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    pool: str
    class_ids: _containers.RepeatedScalarFieldContainer[int]
    format: str
    metadata_json: str
    sha256: str
    size: int
    def __init__(self, pool: str | None = ..., class_ids: _Iterable[int] | None = ..., format: str | None = ..., metadata_json: str | None = ..., sha256: str | None = ..., size: int | None = ...) -> None: ...

class PutComposedModelRequest(_message.Message):
    __slots__ = ("metadata", "chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: ComposedModelMetadata
    chunk: bytes
    def __init__(self, metadata: ComposedModelMetadata | _Mapping | None = ..., chunk: bytes | None = ...) -> None: ...

class PutComposedModelResponse(_message.Message):
    __slots__ = ("model", "created")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    model: ComposedModel
    created: bool
    def __init__(self, model: ComposedModel | _Mapping | None = ..., created: bool | None = ...) -> None: ...

class GetComposedModelRequest(_message.Message):
    __slots__ = ("pool", "class_ids", "format")
    POOL_FIELD_NUMBER: _ClassVar[int]
    CLASS_IDS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    pool: str
    class_ids: _containers.RepeatedScalarFieldContainer[int]
    format: str
    def __init__(self, pool: str | None = ..., class_ids: _Iterable[int] | None = ..., format: str | None = ...) -> None: ...

class GetComposedModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ComposedModel
    def __init__(self, model: ComposedModel | _Mapping | None = ...) -> None: ...

class CreateExtractionJobRequest(_message.Message):
    __slots__ = ("job_id", "params_json", "oracle_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    ORACLE_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    params_json: str
    oracle_id: int
    def __init__(self, job_id: str | None = ..., params_json: str | None = ..., oracle_id: int | None = ...) -> None: ...

class CreateExtractionJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _common_pb2.ExtractionJob
    def __init__(self, job: _common_pb2.ExtractionJob | _Mapping | None = ...) -> None: ...

class UpdateExtractionJobRequest(_message.Message):
    __slots__ = ("job_id", "state", "progress", "stage", "message", "error", "oracle_id", "pool")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ORACLE_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: _common_pb2.ExtractionState
    progress: float
    stage: str
    message: str
    error: str
    oracle_id: int
    pool: str
    def __init__(self, job_id: str | None = ..., state: _common_pb2.ExtractionState | str | None = ..., progress: float | None = ..., stage: str | None = ..., message: str | None = ..., error: str | None = ..., oracle_id: int | None = ..., pool: str | None = ...) -> None: ...

class UpdateExtractionJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _common_pb2.ExtractionJob
    def __init__(self, job: _common_pb2.ExtractionJob | _Mapping | None = ...) -> None: ...

class GetExtractionJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: str | None = ...) -> None: ...

class GetExtractionJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _common_pb2.ExtractionJob
    def __init__(self, job: _common_pb2.ExtractionJob | _Mapping | None = ...) -> None: ...

class ListExtractionJobsRequest(_message.Message):
    __slots__ = ("state", "page_size", "page_token")
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.ExtractionState
    page_size: int
    page_token: str
    def __init__(self, state: _common_pb2.ExtractionState | str | None = ..., page_size: int | None = ..., page_token: str | None = ...) -> None: ...

class ListExtractionJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.ExtractionJob]
    next_page_token: str
    def __init__(self, jobs: _Iterable[_common_pb2.ExtractionJob | _Mapping] | None = ..., next_page_token: str | None = ...) -> None: ...

class GetLineageRequest(_message.Message):
    __slots__ = ("kind", "id")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    kind: str
    id: str
    def __init__(self, kind: str | None = ..., id: str | None = ...) -> None: ...

class GetLineageResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[LineageNode]
    def __init__(self, nodes: _Iterable[LineageNode | _Mapping] | None = ...) -> None: ...
