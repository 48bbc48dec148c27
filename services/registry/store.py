"""The abstract registry metadata store: every operation, what it returns, what it raises.

Implementations return the dataclasses of `entities` and raise `poe.engine.errors` exceptions:
InvalidArgument (naming the field), NotFound, AlreadyExists, FailedPrecondition, Unavailable
(database down). Blobs are not stored here: the store records each blob's sha256, size and media
type, and the `before_commit` hooks let the caller make the bytes visible inside the transaction
that records them (see `core.Registry`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from poe.engine.hierarchy import Hierarchy
from poe_services.registry.entities import (
    Blob,
    ComposedModel,
    ComposedModelSpec,
    Expert,
    ExpertFilter,
    ExpertSpec,
    ExtractionJob,
    JobState,
    JobUpdate,
    Library,
    LibrarySpec,
    LineageNode,
    Oracle,
    OracleSpec,
    Page,
    PoolFilter,
    PoolSpec,
    PoolVersion,
)

BeforeCommit = Callable[[], object] | None

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
LATEST = "latest"


class RegistryStore(ABC):
    # -- lifecycle ---------------------------------------------------------------------------

    @abstractmethod
    def ping(self) -> None:
        """Raise Unavailable unless the database answers a trivial query now."""

    @abstractmethod
    def close(self) -> None:
        """Release all connections."""

    # -- data sets and hierarchies -------------------------------------------------------------

    @abstractmethod
    def add_hierarchy(self, hierarchy: Hierarchy) -> tuple[Hierarchy, bool]:
        """Record a hierarchy (and its data set with the class list, when new).

        Returns (hierarchy, created). Identical content for an existing (data set, version) is
        idempotent; different content is AlreadyExists. A class list that differs from the data
        set's registered classes is FailedPrecondition.
        """

    @abstractmethod
    def get_hierarchy(self, dataset: str, version: int | None = None) -> Hierarchy:
        """The hierarchy `version` of `dataset` (the highest version when None); NotFound."""

    # -- blobs ---------------------------------------------------------------------------------

    @abstractmethod
    def get_blob(self, sha256: str) -> Blob:
        """The recorded blob with this sha256; NotFound when no artifact ever registered it."""

    @abstractmethod
    def blob_referenced(self, sha256: str) -> bool:
        """Whether a blob row with this sha256 exists (used to undo a failed commit safely)."""

    @abstractmethod
    def all_blobs(self) -> list[Blob]:
        """Every recorded blob, by sha256 (for maintenance: `poe registry gc`, `fsck`)."""

    # -- artifacts -----------------------------------------------------------------------------

    @abstractmethod
    def add_oracle(self, spec: OracleSpec, blob: Blob, before_commit: BeforeCommit = None) -> tuple[Oracle, bool]:
        """Record an oracle whose weights are `blob`; returns (oracle, created).

        The oracle's identity is its content: the same sha256 again returns the existing record
        (created False, `before_commit` not called) when data set and config agree, else
        AlreadyExists. The data set must be registered (NotFound).
        """

    @abstractmethod
    def get_oracle(self, oracle_id: int) -> Oracle:
        """The oracle with this id; NotFound."""

    @abstractmethod
    def add_library(self, spec: LibrarySpec, blob: Blob, before_commit: BeforeCommit = None) -> tuple[Library, bool]:
        """Record a library (same identity rules as add_oracle); the oracle, when given, must exist
        and belong to the same data set."""

    @abstractmethod
    def get_library(self, library_id: int) -> Library:
        """The library with this id; NotFound."""

    @abstractmethod
    def add_expert(self, spec: ExpertSpec, blob: Blob, before_commit: BeforeCommit = None) -> tuple[Expert, bool]:
        """Record an expert for a primitive task of a hierarchy of the library's data set.

        `class_ids` must be exactly the task's classes (in the expert's output order). Identity:
        (library, task, sha256); the same again returns the existing record.
        """

    @abstractmethod
    def get_expert(self, expert_id: int) -> Expert:
        """The expert with this id; NotFound."""

    @abstractmethod
    def list_experts(self, flt: ExpertFilter, page_size: int = 0, page_token: str = "",
                     item_bytes: Callable[[Expert], int] | None = None) -> Page[Expert]:
        """Experts matching every set filter field, by id; paginated (page_size 0: default). With
        `item_bytes` (a record's size as served) a page also stops at `poe.engine.limits.MAX_PAGE_BYTES`."""

    # -- pools ---------------------------------------------------------------------------------

    @abstractmethod
    def publish_pool(self, spec: PoolSpec,
                     check: Callable[[PoolVersion], None] | None = None) -> tuple[PoolVersion, bool]:
        """Publish a pool version atomically (created with all its experts, or not at all).

        One expert per task, all on `library_id` and from one hierarchy. `latest` moves to the new
        version, as do `spec.aliases`. Publishing the same name and version again with the same
        library and experts is idempotent; anything else under an existing version is
        AlreadyExists (published versions are immutable). `check` sees the new version before it is
        committed; whatever it raises undoes the publication.
        """

    @abstractmethod
    def get_pool(self, ref: str) -> PoolVersion:
        """The version for "name", "name@version" or "name@alias" (version first); NotFound."""

    @abstractmethod
    def list_pools(self, flt: PoolFilter, page_size: int = 0, page_token: str = "",
                   item_bytes: Callable[[PoolVersion], int] | None = None) -> Page[PoolVersion]:
        """Pool versions matching every set filter field, by name then publication; paginated (and
        cut by bytes, as list_experts)."""

    @abstractmethod
    def set_alias(self, name: str, alias: str, version: str) -> PoolVersion:
        """Point `alias` of pool `name` at `version` (not "latest": the store manages it)."""

    @abstractmethod
    def delete_alias(self, name: str, alias: str) -> None:
        """Remove an alias (not "latest"); NotFound when absent."""

    @abstractmethod
    def delete_pool_version(self, name: str, version: str) -> int:
        """Delete a version that nothing references; returns the number of cache entries dropped.

        Aliases other than `latest` pointing at it are references (FailedPrecondition); `latest`
        moves to the newest remaining version. Its composed-model cache entries go with it, jobs
        that produced it forget it. Artifacts (library, experts) and blobs stay.
        """

    # -- composed-model cache ------------------------------------------------------------------

    @abstractmethod
    def add_composed_model(self, spec: ComposedModelSpec, blob: Blob,
                           before_commit: BeforeCommit = None) -> tuple[ComposedModel, bool]:
        """Record a composed model under (pool version, class set, format); idempotent for the same
        sha256, AlreadyExists for different bytes under the same key."""

    @abstractmethod
    def add_composed_models(self, items: Sequence[tuple[ComposedModelSpec, Blob]],
                            before_commit: BeforeCommit = None) -> list[tuple[ComposedModel, bool]]:
        """`add_composed_model` for each item, in one transaction (all or none); a key given twice
        is created once."""

    @abstractmethod
    def get_composed_model(self, ref: str, class_ids: Sequence[int], fmt: str, count_hit: bool = True) -> ComposedModel:
        """The cache entry for (pool version, class set, format), counting a hit; NotFound."""

    # -- extraction jobs -----------------------------------------------------------------------

    @abstractmethod
    def create_job(self, params: dict, oracle_id: int | None = None, job_id: str | None = None) -> ExtractionJob:
        """A new PENDING job (id generated when None); AlreadyExists for a used id."""

    @abstractmethod
    def update_job(self, job_id: str, update: JobUpdate) -> ExtractionJob:
        """Apply the set fields. Terminal jobs are final (FailedPrecondition); progress in [0, 1]."""

    @abstractmethod
    def get_job(self, job_id: str) -> ExtractionJob:
        """The job; NotFound."""

    @abstractmethod
    def list_jobs(self, state: JobState | None = None, page_size: int = 0, page_token: str = "",
                  item_bytes: Callable[[ExtractionJob], int] | None = None) -> Page[ExtractionJob]:
        """Jobs, newest first, optionally in one state; paginated (and cut by bytes, as list_experts)."""

    # -- lineage -------------------------------------------------------------------------------

    @abstractmethod
    def lineage(self, kind: str, ident: str) -> list[LineageNode]:
        """The artifact, then what it came from, back to its oracle and data set.

        kind: composed_model (ident: sha256), pool (a pool reference), expert, library, oracle.
        """
