import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from poe.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

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
    def __init__(self, id: _Optional[int] = ..., name: _Optional[str] = ..., dataset: _Optional[str] = ..., config_json: _Optional[str] = ..., params: _Optional[int] = ..., metrics_json: _Optional[str] = ..., blob: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

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
    def __init__(self, id: _Optional[int] = ..., name: _Optional[str] = ..., dataset: _Optional[str] = ..., oracle_id: _Optional[int] = ..., config_json: _Optional[str] = ..., params: _Optional[int] = ..., metrics_json: _Optional[str] = ..., loss_json: _Optional[str] = ..., blob: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

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
    def __init__(self, id: _Optional[int] = ..., library_id: _Optional[int] = ..., dataset: _Optional[str] = ..., hierarchy_version: _Optional[int] = ..., task: _Optional[str] = ..., class_ids: _Optional[_Iterable[int]] = ..., class_names: _Optional[_Iterable[str]] = ..., config_json: _Optional[str] = ..., params: _Optional[int] = ..., val_accuracy: _Optional[float] = ..., metrics_json: _Optional[str] = ..., loss_json: _Optional[str] = ..., blob: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

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
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ..., dataset: _Optional[str] = ..., hierarchy: _Optional[_Union[_common_pb2.Hierarchy, _Mapping]] = ..., library: _Optional[_Union[Library, _Mapping]] = ..., experts: _Optional[_Iterable[_Union[Expert, _Mapping]]] = ..., info_json: _Optional[str] = ..., description: _Optional[str] = ..., publish_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., params: _Optional[int] = ...) -> None: ...

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
    def __init__(self, pool: _Optional[str] = ..., class_ids: _Optional[_Iterable[int]] = ..., format: _Optional[str] = ..., blob: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., hits: _Optional[int] = ..., metadata_json: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_hit_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

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
    def __init__(self, kind: _Optional[str] = ..., id: _Optional[str] = ..., name: _Optional[str] = ..., blob: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ...) -> None: ...

class RegisterHierarchyRequest(_message.Message):
    __slots__ = ("hierarchy",)
    HIERARCHY_FIELD_NUMBER: _ClassVar[int]
    hierarchy: _common_pb2.Hierarchy
    def __init__(self, hierarchy: _Optional[_Union[_common_pb2.Hierarchy, _Mapping]] = ...) -> None: ...

class RegisterHierarchyResponse(_message.Message):
    __slots__ = ("hierarchy", "created")
    HIERARCHY_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    hierarchy: _common_pb2.Hierarchy
    created: bool
    def __init__(self, hierarchy: _Optional[_Union[_common_pb2.Hierarchy, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class GetHierarchyRequest(_message.Message):
    __slots__ = ("dataset", "version")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    version: int
    def __init__(self, dataset: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class GetHierarchyResponse(_message.Message):
    __slots__ = ("hierarchy",)
    HIERARCHY_FIELD_NUMBER: _ClassVar[int]
    hierarchy: _common_pb2.Hierarchy
    def __init__(self, hierarchy: _Optional[_Union[_common_pb2.Hierarchy, _Mapping]] = ...) -> None: ...

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
    def __init__(self, name: _Optional[str] = ..., dataset: _Optional[str] = ..., config_json: _Optional[str] = ..., params: _Optional[int] = ..., metrics_json: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class RegisterOracleRequest(_message.Message):
    __slots__ = ("metadata", "chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: OracleMetadata
    chunk: bytes
    def __init__(self, metadata: _Optional[_Union[OracleMetadata, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class RegisterOracleResponse(_message.Message):
    __slots__ = ("oracle", "created")
    ORACLE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    oracle: Oracle
    created: bool
    def __init__(self, oracle: _Optional[_Union[Oracle, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class GetOracleRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class GetOracleResponse(_message.Message):
    __slots__ = ("oracle",)
    ORACLE_FIELD_NUMBER: _ClassVar[int]
    oracle: Oracle
    def __init__(self, oracle: _Optional[_Union[Oracle, _Mapping]] = ...) -> None: ...

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
    def __init__(self, name: _Optional[str] = ..., dataset: _Optional[str] = ..., oracle_id: _Optional[int] = ..., config_json: _Optional[str] = ..., params: _Optional[int] = ..., metrics_json: _Optional[str] = ..., loss_json: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class RegisterLibraryRequest(_message.Message):
    __slots__ = ("metadata", "chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: LibraryMetadata
    chunk: bytes
    def __init__(self, metadata: _Optional[_Union[LibraryMetadata, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class RegisterLibraryResponse(_message.Message):
    __slots__ = ("library", "created")
    LIBRARY_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    library: Library
    created: bool
    def __init__(self, library: _Optional[_Union[Library, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class GetLibraryRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class GetLibraryResponse(_message.Message):
    __slots__ = ("library",)
    LIBRARY_FIELD_NUMBER: _ClassVar[int]
    library: Library
    def __init__(self, library: _Optional[_Union[Library, _Mapping]] = ...) -> None: ...

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
    def __init__(self, library_id: _Optional[int] = ..., hierarchy_version: _Optional[int] = ..., task: _Optional[str] = ..., class_ids: _Optional[_Iterable[int]] = ..., config_json: _Optional[str] = ..., params: _Optional[int] = ..., val_accuracy: _Optional[float] = ..., metrics_json: _Optional[str] = ..., loss_json: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class RegisterExpertRequest(_message.Message):
    __slots__ = ("metadata", "chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: ExpertMetadata
    chunk: bytes
    def __init__(self, metadata: _Optional[_Union[ExpertMetadata, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class RegisterExpertResponse(_message.Message):
    __slots__ = ("expert", "created")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    expert: Expert
    created: bool
    def __init__(self, expert: _Optional[_Union[Expert, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class GetExpertRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class GetExpertResponse(_message.Message):
    __slots__ = ("expert",)
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    expert: Expert
    def __init__(self, expert: _Optional[_Union[Expert, _Mapping]] = ...) -> None: ...

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
    def __init__(self, dataset: _Optional[str] = ..., class_name: _Optional[str] = ..., task: _Optional[str] = ..., library_id: _Optional[int] = ..., pool: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListExpertsResponse(_message.Message):
    __slots__ = ("experts", "next_page_token")
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[Expert]
    next_page_token: str
    def __init__(self, experts: _Optional[_Iterable[_Union[Expert, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

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
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., library_id: _Optional[int] = ..., expert_ids: _Optional[_Iterable[int]] = ..., info_json: _Optional[str] = ..., description: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ...) -> None: ...

class PublishPoolResponse(_message.Message):
    __slots__ = ("pool", "created")
    POOL_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    pool: PoolVersion
    created: bool
    def __init__(self, pool: _Optional[_Union[PoolVersion, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class GetPoolRequest(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: str
    def __init__(self, pool: _Optional[str] = ...) -> None: ...

class GetPoolResponse(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: PoolVersion
    def __init__(self, pool: _Optional[_Union[PoolVersion, _Mapping]] = ...) -> None: ...

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
    def __init__(self, name: _Optional[str] = ..., dataset: _Optional[str] = ..., class_name: _Optional[str] = ..., alias: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListPoolsResponse(_message.Message):
    __slots__ = ("pools", "next_page_token")
    POOLS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    pools: _containers.RepeatedCompositeFieldContainer[PoolVersion]
    next_page_token: str
    def __init__(self, pools: _Optional[_Iterable[_Union[PoolVersion, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class SetPoolAliasRequest(_message.Message):
    __slots__ = ("name", "alias", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    alias: str
    version: str
    def __init__(self, name: _Optional[str] = ..., alias: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class SetPoolAliasResponse(_message.Message):
    __slots__ = ("pool",)
    POOL_FIELD_NUMBER: _ClassVar[int]
    pool: PoolVersion
    def __init__(self, pool: _Optional[_Union[PoolVersion, _Mapping]] = ...) -> None: ...

class DeletePoolAliasRequest(_message.Message):
    __slots__ = ("name", "alias")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    alias: str
    def __init__(self, name: _Optional[str] = ..., alias: _Optional[str] = ...) -> None: ...

class DeletePoolAliasResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeletePoolVersionRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class DeletePoolVersionResponse(_message.Message):
    __slots__ = ("deleted_cache_entries",)
    DELETED_CACHE_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    deleted_cache_entries: int
    def __init__(self, deleted_cache_entries: _Optional[int] = ...) -> None: ...

class ResolveClassesRequest(_message.Message):
    __slots__ = ("pool", "classes", "tasks")
    POOL_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    pool: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    tasks: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, pool: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., tasks: _Optional[_Iterable[str]] = ...) -> None: ...

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
    def __init__(self, pool: _Optional[str] = ..., class_ids: _Optional[_Iterable[int]] = ..., class_names: _Optional[_Iterable[str]] = ..., library: _Optional[_Union[Library, _Mapping]] = ..., experts: _Optional[_Iterable[_Union[Expert, _Mapping]]] = ..., info_json: _Optional[str] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("sha256", "offset", "length")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    offset: int
    length: int
    def __init__(self, sha256: _Optional[str] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class DownloadResponse(_message.Message):
    __slots__ = ("blob", "offset", "data")
    BLOB_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    blob: _common_pb2.BlobRef
    offset: int
    data: bytes
    def __init__(self, blob: _Optional[_Union[_common_pb2.BlobRef, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

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
    def __init__(self, pool: _Optional[str] = ..., class_ids: _Optional[_Iterable[int]] = ..., format: _Optional[str] = ..., metadata_json: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class PutComposedModelRequest(_message.Message):
    __slots__ = ("metadata", "chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: ComposedModelMetadata
    chunk: bytes
    def __init__(self, metadata: _Optional[_Union[ComposedModelMetadata, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class PutComposedModelResponse(_message.Message):
    __slots__ = ("model", "created")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    model: ComposedModel
    created: bool
    def __init__(self, model: _Optional[_Union[ComposedModel, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class ComposedModelUpload(_message.Message):
    __slots__ = ("metadata", "data")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    metadata: ComposedModelMetadata
    data: bytes
    def __init__(self, metadata: _Optional[_Union[ComposedModelMetadata, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutComposedModelsRequest(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ComposedModelUpload]
    def __init__(self, models: _Optional[_Iterable[_Union[ComposedModelUpload, _Mapping]]] = ...) -> None: ...

class PutComposedModelsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PutComposedModelResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[PutComposedModelResponse, _Mapping]]] = ...) -> None: ...

class GetComposedModelRequest(_message.Message):
    __slots__ = ("pool", "class_ids", "format")
    POOL_FIELD_NUMBER: _ClassVar[int]
    CLASS_IDS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    pool: str
    class_ids: _containers.RepeatedScalarFieldContainer[int]
    format: str
    def __init__(self, pool: _Optional[str] = ..., class_ids: _Optional[_Iterable[int]] = ..., format: _Optional[str] = ...) -> None: ...

class GetComposedModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ComposedModel
    def __init__(self, model: _Optional[_Union[ComposedModel, _Mapping]] = ...) -> None: ...

class CreateExtractionJobRequest(_message.Message):
    __slots__ = ("job_id", "params_json", "oracle_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    ORACLE_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    params_json: str
    oracle_id: int
    def __init__(self, job_id: _Optional[str] = ..., params_json: _Optional[str] = ..., oracle_id: _Optional[int] = ...) -> None: ...

class CreateExtractionJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _common_pb2.ExtractionJob
    def __init__(self, job: _Optional[_Union[_common_pb2.ExtractionJob, _Mapping]] = ...) -> None: ...

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
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.ExtractionState, str]] = ..., progress: _Optional[float] = ..., stage: _Optional[str] = ..., message: _Optional[str] = ..., error: _Optional[str] = ..., oracle_id: _Optional[int] = ..., pool: _Optional[str] = ...) -> None: ...

class UpdateExtractionJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _common_pb2.ExtractionJob
    def __init__(self, job: _Optional[_Union[_common_pb2.ExtractionJob, _Mapping]] = ...) -> None: ...

class GetExtractionJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetExtractionJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: _common_pb2.ExtractionJob
    def __init__(self, job: _Optional[_Union[_common_pb2.ExtractionJob, _Mapping]] = ...) -> None: ...

class ListExtractionJobsRequest(_message.Message):
    __slots__ = ("state", "page_size", "page_token")
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.ExtractionState
    page_size: int
    page_token: str
    def __init__(self, state: _Optional[_Union[_common_pb2.ExtractionState, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListExtractionJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.ExtractionJob]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[_common_pb2.ExtractionJob, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetLineageRequest(_message.Message):
    __slots__ = ("kind", "id")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    kind: str
    id: str
    def __init__(self, kind: _Optional[str] = ..., id: _Optional[str] = ...) -> None: ...

class GetLineageResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[LineageNode]
    def __init__(self, nodes: _Optional[_Iterable[_Union[LineageNode, _Mapping]]] = ...) -> None: ...
