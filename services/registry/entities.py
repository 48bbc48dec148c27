"""Domain objects of the registry: what the store takes and returns (never ORM rows).

`*Spec` classes describe something to register; the other classes are stored records. Hierarchies
are `poe.engine.hierarchy.Hierarchy`, the core's own type.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, TypeVar

from poe.engine.hierarchy import Hierarchy

T = TypeVar("T")


@dataclass(frozen=True)
class Blob:
    sha256: str
    size: int
    media_type: str = "application/octet-stream"


SAFETENSORS = "application/vnd.safetensors"
TORCHSCRIPT = "application/vnd.pytorch.torchscript"


@dataclass(frozen=True)
class OracleSpec:
    name: str
    dataset: str
    config: dict
    params: int = 0
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Oracle:
    id: int
    name: str
    dataset: str
    config: dict
    params: int
    metrics: dict
    blob: Blob
    created_at: datetime


@dataclass(frozen=True)
class LibrarySpec:
    name: str
    dataset: str
    config: dict  # the student the library was cut from
    oracle_id: int | None = None
    params: int = 0
    metrics: dict = field(default_factory=dict)
    loss: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Library:
    id: int
    name: str
    dataset: str
    oracle_id: int | None
    config: dict
    params: int
    metrics: dict
    loss: dict
    blob: Blob
    created_at: datetime


@dataclass(frozen=True)
class ExpertSpec:
    library_id: int
    hierarchy_version: int
    task: str
    class_ids: tuple[int, ...]  # output order
    config: dict
    params: int = 0
    val_accuracy: float | None = None
    metrics: dict = field(default_factory=dict)
    loss: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Expert:
    id: int
    library_id: int
    dataset: str
    hierarchy_version: int
    task: str
    class_ids: tuple[int, ...]
    class_names: tuple[str, ...]
    config: dict
    params: int
    val_accuracy: float | None
    metrics: dict
    loss: dict
    blob: Blob
    created_at: datetime


@dataclass(frozen=True)
class PoolSpec:
    name: str
    version: str
    library_id: int
    expert_ids: tuple[int, ...]
    info: dict = field(default_factory=dict)
    description: str = ""
    aliases: tuple[str, ...] = ()  # besides "latest", which always moves to the new version


@dataclass(frozen=True)
class PoolVersion:
    name: str
    version: str
    aliases: tuple[str, ...]
    dataset: str
    hierarchy: Hierarchy
    library: Library
    experts: tuple[Expert, ...]  # hierarchy order
    info: dict
    description: str
    published_at: datetime

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def params(self) -> int:
        return self.library.params + sum(e.params for e in self.experts)


@dataclass(frozen=True)
class ComposedModelSpec:
    pool: str  # pool reference; resolved to a version
    class_ids: tuple[int, ...]
    format: str
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ComposedModel:
    pool: str  # name@version
    class_ids: tuple[int, ...]  # sorted
    format: str
    blob: Blob
    hits: int
    metadata: dict
    created_at: datetime
    last_hit_at: datetime | None


# What `core.Registry.register` records together with uploaded bytes.
ArtifactSpec = OracleSpec | LibrarySpec | ExpertSpec | ComposedModelSpec
Artifact = Oracle | Library | Expert | ComposedModel


class JobState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class ExtractionJob:
    id: str
    state: JobState
    progress: float
    stage: str
    message: str
    params: dict
    error: str
    oracle_id: int | None
    pool: str | None  # name@version of the result
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class JobUpdate:
    """Fields to change on a job; None keeps the current value."""

    state: JobState | None = None
    progress: float | None = None
    stage: str | None = None
    message: str | None = None
    error: str | None = None
    oracle_id: int | None = None
    pool: str | None = None


@dataclass(frozen=True)
class LineageNode:
    kind: str  # composed_model, pool, expert, library, oracle, dataset
    id: str
    name: str
    blob: Blob | None = None


@dataclass(frozen=True)
class Page(Generic[T]):
    items: tuple[T, ...]
    next_page_token: str = ""


@dataclass(frozen=True)
class ExpertFilter:
    dataset: str | None = None
    class_name: str | None = None
    task: str | None = None
    library_id: int | None = None
    pool: str | None = None


@dataclass(frozen=True)
class PoolFilter:
    name: str | None = None
    dataset: str | None = None
    class_name: str | None = None
    alias: str | None = None
