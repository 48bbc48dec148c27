"""SQLAlchemy 2 typed ORM rows of the registry. Only `sqlstore` uses them; each row converts itself
to its entity (`to_entity`), so database types never leave the store.

The schema is created by the Alembic migrations in `migrations/versions` (not by create_all);
`tests/registry/test_migrations.py` checks that migrations and these classes agree.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, column_property, declared_attr, mapped_column, relationship

from poe.engine.hierarchy import Hierarchy
from poe_services.registry import entities as e

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(ts: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything stored is UTC."""
    if ts is None:
        return None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict: JSON, list: JSON, datetime: DateTime(timezone=True)}


class BlobRow(Base):
    __tablename__ = "blobs"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    media_type: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    def to_entity(self) -> e.Blob:
        return e.Blob(self.sha256, self.size, self.media_type)


class DatasetRow(Base):
    __tablename__ = "datasets"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    classes: Mapped[list[DatasetClassRow]] = relationship(order_by="DatasetClassRow.label", lazy="selectin")


class DatasetClassRow(Base):
    __tablename__ = "dataset_classes"
    __table_args__ = (UniqueConstraint("dataset_id", "name_key"), Index(None, "name_key"))
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True)
    label: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    name_key: Mapped[str] = mapped_column(String(256))  # casefolded, for case-insensitive look-ups


class HierarchyRow(Base):
    __tablename__ = "hierarchies"
    __table_args__ = (UniqueConstraint("dataset_id", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    dataset: Mapped[DatasetRow] = relationship(lazy="joined")
    tasks: Mapped[list[TaskRow]] = relationship(order_by="TaskRow.position", lazy="selectin",
                                                back_populates="hierarchy")

    def to_entity(self) -> Hierarchy:
        return Hierarchy(self.dataset.name, self.version, tuple(c.name for c in self.dataset.classes),
                         {t.name: tuple(c.label for c in t.classes) for t in self.tasks})


class TaskRow(Base):
    __tablename__ = "tasks"
    __table_args__ = (UniqueConstraint("hierarchy_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hierarchy_id: Mapped[int] = mapped_column(ForeignKey("hierarchies.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    position: Mapped[int] = mapped_column(Integer)
    hierarchy: Mapped[HierarchyRow] = relationship(back_populates="tasks")
    classes: Mapped[list[TaskClassRow]] = relationship(order_by="TaskClassRow.position", lazy="selectin")


class TaskClassRow(Base):
    __tablename__ = "task_classes"
    __table_args__ = (Index(None, "label"),)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True)
    label: Mapped[int] = mapped_column(Integer, primary_key=True)
    position: Mapped[int] = mapped_column(Integer)


class _DatasetNetworkColumns:
    """The columns of oracles and libraries: a named network of a data set, whose weights blob is its identity."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    config: Mapped[dict]
    params: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict]
    blob_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    @declared_attr
    def dataset(cls) -> Mapped[DatasetRow]:
        return relationship(DatasetRow, lazy="joined")

    @declared_attr
    def blob(cls) -> Mapped[BlobRow]:
        return relationship(BlobRow, lazy="joined")


class OracleRow(_DatasetNetworkColumns, Base):
    __tablename__ = "oracles"

    def to_entity(self) -> e.Oracle:
        return e.Oracle(self.id, self.name, self.dataset.name, dict(self.config), self.params, dict(self.metrics),
                        self.blob.to_entity(), aware(self.created_at))


class LibraryRow(_DatasetNetworkColumns, Base):
    __tablename__ = "libraries"
    oracle_id: Mapped[int | None] = mapped_column(ForeignKey("oracles.id"))
    loss: Mapped[dict]

    def to_entity(self) -> e.Library:
        return e.Library(self.id, self.name, self.dataset.name, self.oracle_id, dict(self.config), self.params,
                         dict(self.metrics), dict(self.loss), self.blob.to_entity(), aware(self.created_at))


class ExpertRow(Base):
    __tablename__ = "experts"
    __table_args__ = (UniqueConstraint("library_id", "task_id", "blob_sha256"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    library_id: Mapped[int] = mapped_column(ForeignKey("libraries.id"))
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    class_ids: Mapped[list]  # output order
    config: Mapped[dict]
    params: Mapped[int] = mapped_column(BigInteger)
    val_accuracy: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict]
    loss: Mapped[dict]
    blob_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    task: Mapped[TaskRow] = relationship(lazy="joined")
    library: Mapped[LibraryRow] = relationship(lazy="joined")
    blob: Mapped[BlobRow] = relationship(lazy="joined")

    def to_entity(self) -> e.Expert:
        h = self.task.hierarchy
        classes = h.dataset.classes  # in label order, labels 0..n-1: indexing costs nothing per class
        ids = tuple(int(i) for i in self.class_ids)
        return e.Expert(self.id, self.library_id, h.dataset.name, h.version, self.task.name, ids,
                        tuple(classes[i].name for i in ids), dict(self.config), self.params, self.val_accuracy,
                        dict(self.metrics), dict(self.loss), self.blob.to_entity(), aware(self.created_at))


class PoolRow(Base):
    __tablename__ = "pools"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PoolVersionRow(Base):
    __tablename__ = "pool_versions"
    __table_args__ = (UniqueConstraint("pool_id", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pool_id: Mapped[int] = mapped_column(ForeignKey("pools.id"))
    version: Mapped[str] = mapped_column(String(64))
    library_id: Mapped[int] = mapped_column(ForeignKey("libraries.id"), index=True)
    hierarchy_id: Mapped[int] = mapped_column(ForeignKey("hierarchies.id"))
    info: Mapped[dict]
    description: Mapped[str] = mapped_column(Text)
    published_at: Mapped[datetime] = mapped_column(default=utcnow)
    pool: Mapped[PoolRow] = relationship(lazy="joined")
    library: Mapped[LibraryRow] = relationship(lazy="joined")
    hierarchy: Mapped[HierarchyRow] = relationship(lazy="joined")
    members: Mapped[list[PoolVersionExpertRow]] = relationship(lazy="selectin", cascade="all, delete-orphan")
    aliases: Mapped[list[PoolAliasRow]] = relationship(lazy="selectin", viewonly=True, order_by="PoolAliasRow.alias")

    def to_entity(self) -> e.PoolVersion:
        order = {t.id: t.position for t in self.hierarchy.tasks}
        experts = sorted((m.expert for m in self.members), key=lambda x: order[x.task_id])
        return e.PoolVersion(self.pool.name, self.version, tuple(a.alias for a in self.aliases),
                             self.hierarchy.dataset.name, self.hierarchy.to_entity(), self.library.to_entity(),
                             tuple(x.to_entity() for x in experts), dict(self.info), self.description,
                             aware(self.published_at))


class PoolVersionExpertRow(Base):
    __tablename__ = "pool_version_experts"
    pool_version_id: Mapped[int] = mapped_column(ForeignKey("pool_versions.id", ondelete="CASCADE"),
                                                 primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), primary_key=True)
    expert_id: Mapped[int] = mapped_column(ForeignKey("experts.id"), index=True)
    expert: Mapped[ExpertRow] = relationship(lazy="joined")


class PoolAliasRow(Base):
    __tablename__ = "pool_aliases"
    pool_id: Mapped[int] = mapped_column(ForeignKey("pools.id"), primary_key=True)
    alias: Mapped[str] = mapped_column(String(64), primary_key=True)
    pool_version_id: Mapped[int] = mapped_column(ForeignKey("pool_versions.id"), index=True)


class ComposedModelRow(Base):
    __tablename__ = "composed_models"
    __table_args__ = (UniqueConstraint("pool_version_id", "class_set", "format"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pool_version_id: Mapped[int] = mapped_column(ForeignKey("pool_versions.id", ondelete="CASCADE"))
    class_set: Mapped[str] = mapped_column(String(64))  # sha256 of the sorted ids, "3,5,7"
    class_ids: Mapped[list]
    format: Mapped[str] = mapped_column(String(32))
    blob_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    meta: Mapped[dict] = mapped_column("metadata", JSON)
    hits: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_hit_at: Mapped[datetime | None]
    # Loaded when asked for: a pool version brings its experts and hierarchy along, which recording
    # a composition (many a second) does not need; "name@version" comes with the row instead.
    pool_version: Mapped[PoolVersionRow] = relationship(lazy="select")
    pool_ref: Mapped[str] = column_property(
        select(PoolRow.name + "@" + PoolVersionRow.version)
        .where(PoolVersionRow.id == pool_version_id, PoolRow.id == PoolVersionRow.pool_id)
        .correlate_except(PoolVersionRow, PoolRow).scalar_subquery())
    blob: Mapped[BlobRow] = relationship(lazy="joined")

    def to_entity(self) -> e.ComposedModel:
        return e.ComposedModel(self.pool_ref, tuple(int(i) for i in self.class_ids), self.format,
                               self.blob.to_entity(), self.hits, dict(self.meta), aware(self.created_at),
                               aware(self.last_hit_at))


class ExtractionJobRow(Base):
    __tablename__ = "extraction_jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    progress: Mapped[float] = mapped_column(Float)
    stage: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
    params: Mapped[dict]
    error: Mapped[str] = mapped_column(Text)
    oracle_id: Mapped[int | None] = mapped_column(ForeignKey("oracles.id"))
    pool_version_id: Mapped[int | None] = mapped_column(ForeignKey("pool_versions.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    pool_version: Mapped[PoolVersionRow | None] = relationship(lazy="joined")

    def to_entity(self) -> e.ExtractionJob:
        pv = self.pool_version
        return e.ExtractionJob(self.id, e.JobState(self.state), self.progress, self.stage, self.message,
                               dict(self.params), self.error, self.oracle_id,
                               f"{pv.pool.name}@{pv.version}" if pv else None,
                               aware(self.created_at), aware(self.updated_at))
