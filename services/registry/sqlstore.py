"""`RegistryStore` on SQLAlchemy 2 (SQLite or PostgreSQL).

Every operation runs in one managed session (`db.session_scope`). "Create or return the identical
record" operations first look for the record, then insert it; when a concurrent writer wins the
race the insert fails with a unique violation (AlreadyExists from the session scope), and the
operation looks again and returns the winner's record if it is identical. Blob rows are inserted
with ON CONFLICT DO NOTHING, so any number of artifacts may share one blob.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Engine, Exists, Select, delete, exists, false, func, select, update
from sqlalchemy.orm import Session, contains_eager, lazyload, load_only, sessionmaker

from poe.engine import limits
from poe.engine.errors import AlreadyExists, FailedPrecondition, NotFound, field_error
from poe.engine.hierarchy import Hierarchy
from poe_services.registry import db
from poe_services.registry import entities as e
from poe_services.registry import validation as v
from poe_services.registry.models import (
    BlobRow,
    ComposedModelRow,
    DatasetClassRow,
    DatasetRow,
    ExpertRow,
    ExtractionJobRow,
    HierarchyRow,
    LibraryRow,
    OracleRow,
    PoolAliasRow,
    PoolRow,
    PoolVersionExpertRow,
    PoolVersionRow,
    TaskClassRow,
    TaskRow,
    aware,
    utcnow,
)
from poe_services.registry.store import DEFAULT_PAGE_SIZE, LATEST, MAX_PAGE_SIZE, BeforeCommit, RegistryStore

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")  # an ORM row class

# Row ids are INTEGER columns: 32-bit on PostgreSQL. A larger id (valid on the wire, which allows
# int64) names no row, on either database, and never reaches the database as a parameter.
MAX_ROW_ID = (1 << 31) - 1
PAGE_BATCH = 32  # rows converted at a time while a page is filled (pages stop early by bytes)
POOL_CACHE_SIZE = 64  # published pool versions kept as entities (GetPool, ListPools)
EXPERT_CACHE_SIZE = 20_000  # experts kept as entities (ListExperts)


def class_set_key(class_ids: Sequence[int]) -> str:
    return hashlib.sha256(",".join(str(i) for i in sorted(class_ids)).encode()).hexdigest()


def _where_equal(q: Select, *filters: tuple[ColumnElement, object]) -> Select:
    """`q` restricted to the rows where each column equals its value, for the values that are set."""
    return q.where(*(column == value for column, value in filters if value))


def _task_has_class(task_id: ColumnElement, class_name: str, *also: ColumnElement) -> Exists:
    """The task `task_id` has a class named `class_name` (as the composer looks names up), and the
    `also` conditions hold."""
    return exists().where(*also, TaskClassRow.task_id == task_id,
                          DatasetClassRow.dataset_id == HierarchyRow.dataset_id,
                          DatasetClassRow.label == TaskClassRow.label,
                          DatasetClassRow.name_key == limits.class_key(class_name))


def _check_filter(flt: e.ExpertFilter | e.PoolFilter) -> None:
    """Filters are checked like the fields they match: a malformed one is InvalidArgument, not an
    empty page (and never a query parameter the database refuses)."""
    for field, check in (("name", lambda f, x: v.name(x, f, "pool name")),
                         ("dataset", lambda f, x: v.name(x, f, "data set name")),
                         ("task", lambda f, x: v.name(x, f, "task name")),
                         ("class_name", limits.check_ref),
                         ("alias", lambda f, x: v.alias(x, f)),
                         ("library_id", lambda f, x: v.positive_id(x, f)),
                         ("pool", lambda f, x: v.pool_ref(x, f))):
        value = getattr(flt, field, None)
        if value:
            check(field, value)


class SqlRegistryStore(RegistryStore):
    def __init__(self, url_or_engine: str | Engine, *, require_current: bool = True):
        self.engine = db.make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
        self._factory = sessionmaker(self.engine, expire_on_commit=False)
        # A published pool version never changes but for its aliases, so its entity is built from
        # its rows (a dozen queries and most of a GetPool's time) once. Keyed by id and publish
        # time: SQLite may give a deleted version's id to the next one.
        self._pools: OrderedDict[tuple[int, Any], e.PoolVersion] = OrderedDict()
        self._pools_lock = threading.Lock()
        self._experts: OrderedDict[tuple[int, Any], e.Expert] = OrderedDict()
        self._experts_lock = threading.Lock()
        if require_current:
            db.require_current_schema(self.engine)

    def _session(self, write: bool = False):
        return db.session_scope(self._factory, write=write)

    def _create_or_get(self, find: Callable[[Session], T | None], create: Callable[[Session], T]) -> tuple[T, bool]:
        """find() returns an identical existing record (or raises AlreadyExists on a conflicting one)."""
        for attempt in range(3):
            try:
                with self._session(write=True) as s:
                    found = find(s)
                    if found is not None:
                        return found, False
                    return create(s), True
            except AlreadyExists:  # a concurrent writer inserted the same key first
                with self._session() as s:
                    found = find(s)
                if found is not None:
                    return found, False
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    # -- lifecycle ---------------------------------------------------------------------------

    def ping(self) -> None:
        db.ping(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _row(s: Session, row_class: type[R], key: int | str, field: str, what: str) -> R:
        """The row with this primary key; NotFound naming the field otherwise."""
        if isinstance(key, int) and not 0 < key <= MAX_ROW_ID:
            raise NotFound(f"{field}: no {what} {key!r}")
        row = s.get(row_class, key)
        if row is None:
            raise NotFound(f"{field}: no {what} {key!r}")  # repr: numeric ids bare, job ids quoted
        return row

    def _get(self, row_class: type, key: int | str, what: str, field: str = "id"):
        """The entity of the row with this primary key; NotFound naming the field otherwise."""
        with self._session() as s:
            return self._row(s, row_class, key, field, what).to_entity()

    def _page(self, query: Callable[[Session], Select], filters: object, page_size: int,
              page_token: str, item_bytes: Callable[[Any], int] | None = None,
              entities: Callable[[Session, list], list] | None = None) -> e.Page:
        """A page of the entities of `query`'s rows (in its order); the page token is bound to `filters`.

        With `item_bytes` (an entity's size as served) the page also stops before its records
        would pass `limits.MAX_PAGE_BYTES`, so that any page fits a message; it always holds at
        least one record. Rows are read a batch at a time, never the whole page size at once;
        `entities(session, rows)` turns a batch into entities (each row's `to_entity()` without it)."""
        size = v.page_size(page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        offset = v.decode_page_token(page_token, filters)
        items: list = []
        total, more = 0, False
        with self._session() as s:
            while len(items) < size:
                batch = min(PAGE_BATCH, size - len(items))
                rows = s.scalars(query(s).offset(offset + len(items)).limit(batch + 1)).unique().all()
                full = False
                converted = [r.to_entity() for r in rows[:batch]] if entities is None else entities(s, rows[:batch])
                for item in converted:
                    if item_bytes is not None:
                        n = item_bytes(item)
                        if items and total + n > limits.MAX_PAGE_BYTES:
                            full = True
                            break
                        total += n
                    items.append(item)
                more = full or len(rows) > batch
                if full or len(rows) <= batch:
                    break
        token = v.encode_page_token(offset + len(items), filters) if more else ""
        return e.Page(tuple(items), token)

    @staticmethod
    def _dataset(s: Session, name: str, field: str = "dataset") -> DatasetRow:
        row = s.scalar(select(DatasetRow).where(DatasetRow.name == name))
        if row is None:
            raise NotFound(f"{field}: data set {name!r} is not registered (register a hierarchy for it first)")
        return row

    @staticmethod
    def _insert_blob(s: Session, blob: e.Blob) -> None:
        v.sha256(blob.sha256, "sha256")
        v.non_negative(blob.size, "size")
        values = {"sha256": blob.sha256, "size": blob.size, "media_type": blob.media_type, "created_at": utcnow()}
        dialect = s.get_bind().dialect.name
        if dialect in ("sqlite", "postgresql"):
            if dialect == "sqlite":
                from sqlalchemy.dialects.sqlite import insert
            else:
                from sqlalchemy.dialects.postgresql import insert
            s.execute(insert(BlobRow).values(**values).on_conflict_do_nothing(index_elements=["sha256"]))
        elif s.get(BlobRow, blob.sha256) is None:
            s.add(BlobRow(**values))
        row = s.get(BlobRow, blob.sha256)
        if row is not None and row.size != blob.size:  # same hash, different size: cannot happen unless corrupt
            raise FailedPrecondition(f"blob {blob.sha256[:12]}... is recorded with {row.size} bytes, not {blob.size}")

    @staticmethod
    def _pool_version(s: Session, ref: str, field: str = "pool", light: bool = False) -> PoolVersionRow:
        """The pool version `ref` names; `light`: without its experts, hierarchy and aliases loaded
        up front (they load when touched)."""
        name, tag = v.pool_ref(ref, field)
        # One query in the common cases (a version, or an alias); the pool's row comes along.
        named = (select(PoolVersionRow).join(PoolVersionRow.pool).where(PoolRow.name == name)
                 .options(contains_eager(PoolVersionRow.pool), *((lazyload("*"),) if light else ())))
        if tag is not None:
            row = s.scalar(named.where(PoolVersionRow.version == tag))
            if row is not None:
                return row
        alias_name = tag or LATEST
        row = s.scalar(named.join(PoolAliasRow, PoolAliasRow.pool_version_id == PoolVersionRow.id)
                       .where(PoolAliasRow.alias == alias_name))
        if row is None:
            pool = s.scalar(select(PoolRow).where(PoolRow.name == name))
            if pool is None:
                raise NotFound(f"{field}: no pool named {name!r}")
            versions = s.scalars(select(PoolVersionRow.version).where(PoolVersionRow.pool_id == pool.id)).all()
            aliases = s.scalars(select(PoolAliasRow.alias).where(PoolAliasRow.pool_id == pool.id)).all()
            raise NotFound(f"{field}: pool {name!r} has no version or alias {alias_name!r} "
                           f"(versions: {limits.listing(versions) or 'none'}; "
                           f"aliases: {limits.listing(aliases) or 'none'})")
        return row

    def _pool_entity(self, s: Session, row: PoolVersionRow) -> e.PoolVersion:
        """The entity of a pool version row (loaded light or not): from the cache of published
        versions, with its aliases as they are now."""
        key = (row.id, row.published_at)
        with self._pools_lock:
            cached = self._pools.get(key)
            if cached is not None:
                self._pools.move_to_end(key)
        if cached is None:  # loaded again with its relationships in a few queries, not one per expert
            full = s.scalar(select(PoolVersionRow).where(PoolVersionRow.id == row.id)
                            .execution_options(populate_existing=True))
            cached = full.to_entity()
            with self._pools_lock:
                self._pools[key] = cached
                while len(self._pools) > POOL_CACHE_SIZE:
                    self._pools.popitem(last=False)
            return cached
        aliases = s.scalars(select(PoolAliasRow.alias).where(PoolAliasRow.pool_version_id == row.id)
                            .order_by(PoolAliasRow.alias)).all()
        return dataclasses.replace(cached, aliases=tuple(aliases))

    @staticmethod
    def _check_alias_count(s: Session, pool_id: int, field: str = "aliases") -> None:
        """At most `limits.MAX_ALIASES` aliases per pool (each is listed in its version's record)."""
        n = s.scalar(select(func.count()).select_from(PoolAliasRow).where(PoolAliasRow.pool_id == pool_id))
        if n > limits.MAX_ALIASES:
            raise field_error(field, f"the pool would have {n} aliases; at most {limits.MAX_ALIASES} "
                                     "(delete some first)")

    @staticmethod
    def _set_alias_row(s: Session, pool_id: int, alias: str, version_id: int) -> None:
        row = s.get(PoolAliasRow, (pool_id, alias))
        if row is None:
            s.add(PoolAliasRow(pool_id=pool_id, alias=alias, pool_version_id=version_id))
        else:
            row.pool_version_id = version_id

    # -- data sets and hierarchies -------------------------------------------------------------

    def add_hierarchy(self, hierarchy: Hierarchy) -> tuple[Hierarchy, bool]:
        v.name(hierarchy.dataset, "hierarchy.dataset", "data set name")
        limits.check_int_range("hierarchy.version", hierarchy.version, 1, limits.MAX_INT32)
        limits.check_class_names("hierarchy.classes", hierarchy.classes)  # Hierarchy checked them too

        def find(s: Session) -> Hierarchy | None:
            ds = s.scalar(select(DatasetRow).where(DatasetRow.name == hierarchy.dataset))
            if ds is None:
                return None
            registered = tuple(c.name for c in ds.classes)
            if registered != tuple(hierarchy.classes):
                raise FailedPrecondition(f"hierarchy.classes: data set {hierarchy.dataset!r} is registered with "
                                         f"{len(registered)} classes ({limits.listing(registered)}), not "
                                         f"these {len(hierarchy.classes)} ({limits.listing(hierarchy.classes)})")
            row = s.scalar(select(HierarchyRow).where(HierarchyRow.dataset_id == ds.id,
                                                      HierarchyRow.version == hierarchy.version))
            if row is None:
                return None
            existing = row.to_entity()
            if existing != hierarchy:
                raise AlreadyExists(f"hierarchy {hierarchy.dataset} v{hierarchy.version} is already registered with "
                                    "different tasks; register a new version")
            return existing

        def create(s: Session) -> Hierarchy:
            ds = s.scalar(select(DatasetRow).where(DatasetRow.name == hierarchy.dataset))
            if ds is None:
                ds = DatasetRow(name=hierarchy.dataset)
                s.add(ds)
                s.flush()
                for label, cname in enumerate(hierarchy.classes):
                    s.add(DatasetClassRow(dataset_id=ds.id, label=label, name=cname, name_key=limits.class_key(cname)))
            row = HierarchyRow(dataset_id=ds.id, version=hierarchy.version)
            s.add(row)
            s.flush()
            for pos, (task, ids) in enumerate(hierarchy.tasks.items()):
                t = TaskRow(hierarchy_id=row.id, name=task, position=pos)
                s.add(t)
                s.flush()
                for i, label in enumerate(ids):
                    s.add(TaskClassRow(task_id=t.id, label=label, position=i))
            s.flush()
            s.expire_all()
            return s.get(HierarchyRow, row.id).to_entity()

        return self._create_or_get(find, create)

    def get_hierarchy(self, dataset: str, version: int | None = None) -> Hierarchy:
        v.name(dataset, "dataset", "data set name")
        if version is not None:
            limits.check_int_range("version", version, 0, limits.MAX_INT32)
        with self._session() as s:
            ds = self._dataset(s, dataset)
            q = select(HierarchyRow).where(HierarchyRow.dataset_id == ds.id)
            q = q.where(HierarchyRow.version == version) if version else q.order_by(HierarchyRow.version.desc())
            row = s.scalars(q.limit(1)).first()
            if row is None:
                raise NotFound(f"version: data set {dataset!r} has no hierarchy"
                               + (f" version {version}" if version else ""))
            return row.to_entity()

    # -- blobs ---------------------------------------------------------------------------------

    def get_blob(self, sha256: str) -> e.Blob:
        v.sha256(sha256)
        with self._session() as s:
            row = s.get(BlobRow, sha256)
            if row is None:
                raise NotFound(f"sha256: no registered blob {sha256[:12]}...")
            return row.to_entity()

    def blob_referenced(self, sha256: str) -> bool:
        with self._session() as s:
            return s.get(BlobRow, sha256) is not None

    def all_blobs(self) -> list[e.Blob]:
        with self._session() as s:
            return [e.Blob(*row) for row in s.execute(select(BlobRow.sha256, BlobRow.size, BlobRow.media_type)
                                                       .order_by(BlobRow.sha256))]

    # -- artifacts -----------------------------------------------------------------------------

    def _add_artifact(self, blob: e.Blob, before_commit: BeforeCommit, existing: Callable[[Session], R | None],
                      new_row: Callable[[Session], R]) -> tuple[Any, bool]:
        """Record an artifact whose bytes are `blob`, or return the identical one already recorded.

        existing(s): the row already recorded under the artifact's identity, or None; it raises
        AlreadyExists when that row is not identical. new_row(s): the row to insert, its references
        checked (not yet added to the session).
        """
        v.sha256(blob.sha256)

        def find(s: Session):
            row = existing(s)
            return row.to_entity() if row is not None else None

        def create(s: Session):
            row = new_row(s)
            self._insert_blob(s, blob)
            s.add(row)
            s.flush()
            if before_commit:
                before_commit()
            return row.to_entity()

        return self._create_or_get(find, create)

    def add_oracle(self, spec: e.OracleSpec, blob: e.Blob, before_commit: BeforeCommit = None) -> tuple[e.Oracle, bool]:
        v.check_oracle_spec(spec)

        def existing(s: Session) -> OracleRow | None:
            row = s.scalar(select(OracleRow).where(OracleRow.blob_sha256 == blob.sha256))
            if row is not None and (row.dataset.name != spec.dataset or row.config != spec.config):
                raise AlreadyExists(f"oracle {row.id} ({row.name}) already holds these weights with a different "
                                    "data set or config")
            return row

        def new_row(s: Session) -> OracleRow:
            return OracleRow(name=spec.name, dataset_id=self._dataset(s, spec.dataset).id, config=spec.config,
                             params=spec.params, metrics=spec.metrics, blob_sha256=blob.sha256)

        return self._add_artifact(blob, before_commit, existing, new_row)

    def get_oracle(self, oracle_id: int) -> e.Oracle:
        return self._get(OracleRow, oracle_id, "oracle")

    def add_library(self, spec: e.LibrarySpec, blob: e.Blob,
                    before_commit: BeforeCommit = None) -> tuple[e.Library, bool]:
        v.check_library_spec(spec)

        def existing(s: Session) -> LibraryRow | None:
            row = s.scalar(select(LibraryRow).where(LibraryRow.blob_sha256 == blob.sha256))
            if row is not None and (row.dataset.name != spec.dataset or row.config != spec.config
                                    or row.oracle_id != spec.oracle_id):
                raise AlreadyExists(f"library {row.id} ({row.name}) already holds these weights with a different "
                                    "data set, config or oracle")
            return row

        def new_row(s: Session) -> LibraryRow:
            ds = self._dataset(s, spec.dataset)
            if spec.oracle_id is not None:
                oracle = self._row(s, OracleRow, spec.oracle_id, "oracle_id", "oracle")
                if oracle.dataset_id != ds.id:
                    raise FailedPrecondition(f"oracle_id: oracle {oracle.id} is for data set {oracle.dataset.name!r}, "
                                             f"not {spec.dataset!r}")
            return LibraryRow(name=spec.name, dataset_id=ds.id, oracle_id=spec.oracle_id, config=spec.config,
                              params=spec.params, metrics=spec.metrics, loss=spec.loss, blob_sha256=blob.sha256)

        return self._add_artifact(blob, before_commit, existing, new_row)

    def get_library(self, library_id: int) -> e.Library:
        return self._get(LibraryRow, library_id, "library")

    @classmethod
    def _expert_task(cls, s: Session, spec: e.ExpertSpec) -> tuple[LibraryRow, TaskRow]:
        lib = cls._row(s, LibraryRow, spec.library_id, "library_id", "library")
        # One indexed row, not the hierarchy's every task and class (hundreds of rows in a large one).
        task = s.scalar(select(TaskRow).join(TaskRow.hierarchy)
                        .where(HierarchyRow.dataset_id == lib.dataset_id,
                               HierarchyRow.version == spec.hierarchy_version, TaskRow.name == spec.task)
                        .options(contains_eager(TaskRow.hierarchy).lazyload(HierarchyRow.tasks),
                                 contains_eager(TaskRow.hierarchy).lazyload(HierarchyRow.dataset)))
        if task is None:
            h = s.scalar(select(HierarchyRow).where(HierarchyRow.dataset_id == lib.dataset_id,
                                                    HierarchyRow.version == spec.hierarchy_version))
            if h is None:
                raise NotFound(f"hierarchy_version: data set {lib.dataset.name!r} has no hierarchy version "
                               f"{spec.hierarchy_version}")
            raise field_error("task", f"hierarchy {lib.dataset.name} v{h.version} has no task {spec.task!r} "
                                      f"(tasks: {limits.listing(t.name for t in h.tasks)})")
        expected = sorted(c.label for c in task.classes)
        if sorted(spec.class_ids) != expected:
            raise field_error("class_ids", f"task {spec.task!r} has classes [{limits.listing(expected, 20)}], "
                                           f"got [{limits.listing(spec.class_ids, 20)}]")
        return lib, task

    def add_expert(self, spec: e.ExpertSpec, blob: e.Blob,
                   before_commit: BeforeCommit = None) -> tuple[e.Expert, bool]:
        v.check_expert_spec(spec)
        ids = tuple(spec.class_ids)
        # existing() and new_row() run in one session: look the task up once per session. The rows
        # held here also stay in the session's (weak) identity map for to_entity().
        looked_up: dict[Session, tuple[LibraryRow, TaskRow]] = {}

        def lib_task(s: Session) -> tuple[LibraryRow, TaskRow]:
            if s not in looked_up:
                looked_up[s] = self._expert_task(s, spec)
            return looked_up[s]

        def existing(s: Session) -> ExpertRow | None:
            lib, task = lib_task(s)
            row = s.scalar(select(ExpertRow).where(ExpertRow.library_id == lib.id, ExpertRow.task_id == task.id,
                                                   ExpertRow.blob_sha256 == blob.sha256))
            if row is not None and (tuple(row.class_ids) != ids or row.config != spec.config):
                raise AlreadyExists(f"expert {row.id} already holds these weights for task {spec.task!r} with a "
                                    "different class order or config")
            return row

        def new_row(s: Session) -> ExpertRow:
            lib, task = lib_task(s)
            return ExpertRow(library_id=lib.id, task_id=task.id, class_ids=list(ids), config=spec.config,
                             params=spec.params, val_accuracy=spec.val_accuracy, metrics=spec.metrics,
                             loss=spec.loss, blob_sha256=blob.sha256)

        return self._add_artifact(blob, before_commit, existing, new_row)

    def get_expert(self, expert_id: int) -> e.Expert:
        return self._get(ExpertRow, expert_id, "expert")

    def list_experts(self, flt: e.ExpertFilter, page_size: int = 0, page_token: str = "",
                     item_bytes: Callable[[e.Expert], int] | None = None) -> e.Page[e.Expert]:
        _check_filter(flt)

        def query(s: Session) -> Select:
            q = (select(ExpertRow).options(lazyload("*"), load_only(ExpertRow.id, ExpertRow.created_at))
                 .join(TaskRow, ExpertRow.task_id == TaskRow.id)
                 .join(HierarchyRow, TaskRow.hierarchy_id == HierarchyRow.id)
                 .join(DatasetRow, HierarchyRow.dataset_id == DatasetRow.id))
            library_id = flt.library_id if flt.library_id and flt.library_id <= MAX_ROW_ID else None
            q = _where_equal(q, (DatasetRow.name, flt.dataset), (TaskRow.name, flt.task),
                             (ExpertRow.library_id, library_id))
            if flt.library_id and library_id is None:  # an id no row can have: an empty page
                q = q.where(false())
            if flt.class_name:
                q = q.where(_task_has_class(ExpertRow.task_id, flt.class_name))
            if flt.pool:
                pv = self._pool_version(s, flt.pool)
                q = q.where(ExpertRow.id.in_(select(PoolVersionExpertRow.expert_id)
                                             .where(PoolVersionExpertRow.pool_version_id == pv.id)))
            return q.order_by(ExpertRow.id)

        return self._page(query, flt, page_size, page_token, item_bytes, self._expert_entities)

    def _expert_entities(self, s: Session, rows: Sequence[ExpertRow]) -> list[e.Expert]:
        """The entities of expert rows (loaded with their id and creation time only): from the
        cache, the others loaded in one query. An expert is never changed once registered."""
        keys = [(row.id, row.created_at) for row in rows]
        with self._experts_lock:
            found = {k: self._experts[k] for k in keys if k in self._experts}
        missing = [k[0] for k in keys if k not in found]
        if missing:
            loaded = s.scalars(select(ExpertRow).where(ExpertRow.id.in_(missing))
                               .execution_options(populate_existing=True)).unique().all()
            with self._experts_lock:
                for row in loaded:
                    found[(row.id, row.created_at)] = self._experts[(row.id, row.created_at)] = row.to_entity()
                while len(self._experts) > EXPERT_CACHE_SIZE:
                    self._experts.popitem(last=False)
        return [found[k] for k in keys]

    # -- pools ---------------------------------------------------------------------------------

    def publish_pool(self, spec: e.PoolSpec,
                     check: Callable[[e.PoolVersion], None] | None = None) -> tuple[e.PoolVersion, bool]:
        v.check_pool_spec(spec)
        for a in spec.aliases:
            if a == LATEST:
                raise field_error("aliases", "'latest' always moves to the newest version; do not list it")

        def find(s: Session) -> e.PoolVersion | None:
            row = s.scalar(select(PoolVersionRow).join(PoolRow, PoolVersionRow.pool_id == PoolRow.id)
                           .where(PoolRow.name == spec.name, PoolVersionRow.version == spec.version))
            if row is None:
                return None
            same = (row.library_id == spec.library_id
                    and sorted(m.expert_id for m in row.members) == sorted(spec.expert_ids))
            if not same:
                raise AlreadyExists(f"pool {spec.name}@{spec.version} is already published with a different library "
                                    "or experts; published versions are immutable: publish a new version")
            return row.to_entity()

        def create(s: Session) -> e.PoolVersion:
            lib = self._row(s, LibraryRow, spec.library_id, "library_id", "library")
            storable = [i for i in spec.expert_ids if i <= MAX_ROW_ID]
            experts = s.scalars(select(ExpertRow).where(ExpertRow.id.in_(storable))).unique().all()
            missing = sorted(set(spec.expert_ids) - {x.id for x in experts})
            if missing:
                raise NotFound(f"expert_ids: no expert(s) {limits.listing(missing)}")
            by_task: dict[int, ExpertRow] = {}
            for x in experts:
                if x.library_id != lib.id:
                    raise field_error("expert_ids", f"expert {x.id} is on library {x.library_id}, not {lib.id}")
                if x.task_id in by_task:
                    raise field_error("expert_ids", f"experts {by_task[x.task_id].id} and {x.id} are both for task "
                                                    f"{x.task.name!r}")
                by_task[x.task_id] = x
            hierarchies = {x.task.hierarchy_id for x in experts}
            if len(hierarchies) != 1:
                raise field_error("expert_ids", "experts come from different hierarchies")
            pool = s.scalar(select(PoolRow).where(PoolRow.name == spec.name))
            if pool is None:
                pool = PoolRow(name=spec.name)
                s.add(pool)
                s.flush()
            row = PoolVersionRow(pool_id=pool.id, version=spec.version, library_id=lib.id,
                                 hierarchy_id=hierarchies.pop(), info=spec.info, description=spec.description or "")
            row.members = [PoolVersionExpertRow(task_id=t, expert_id=x.id) for t, x in by_task.items()]
            s.add(row)
            s.flush()
            for a in (LATEST, *spec.aliases):
                self._set_alias_row(s, pool.id, a, row.id)
            s.flush()
            self._check_alias_count(s, pool.id)
            s.expire(row)
            published = s.get(PoolVersionRow, row.id).to_entity()
            if check is not None:  # e.g. that the record fits a message; raising rolls the publication back
                check(published)
            return published

        return self._create_or_get(find, create)

    def get_pool(self, ref: str) -> e.PoolVersion:
        with self._session() as s:
            return self._pool_entity(s, self._pool_version(s, ref, light=True))

    def list_pools(self, flt: e.PoolFilter, page_size: int = 0, page_token: str = "",
                   item_bytes: Callable[[e.PoolVersion], int] | None = None) -> e.Page[e.PoolVersion]:
        _check_filter(flt)

        def query(s: Session) -> Select:
            q = (select(PoolVersionRow).options(lazyload("*")).join(PoolRow, PoolVersionRow.pool_id == PoolRow.id)
                 .join(HierarchyRow, PoolVersionRow.hierarchy_id == HierarchyRow.id)
                 .join(DatasetRow, HierarchyRow.dataset_id == DatasetRow.id))
            q = _where_equal(q, (PoolRow.name, flt.name), (DatasetRow.name, flt.dataset))
            if flt.alias:
                q = q.where(exists().where(PoolAliasRow.pool_version_id == PoolVersionRow.id,
                                           PoolAliasRow.alias == flt.alias))
            if flt.class_name:
                q = q.where(_task_has_class(PoolVersionExpertRow.task_id, flt.class_name,
                                            PoolVersionExpertRow.pool_version_id == PoolVersionRow.id))
            return q.order_by(PoolRow.name, PoolVersionRow.id)

        return self._page(query, flt, page_size, page_token, item_bytes,
                          lambda s, rows: [self._pool_entity(s, row) for row in rows])

    def set_alias(self, name: str, alias: str, version: str) -> e.PoolVersion:
        v.name(name, "name", "pool name")
        v.alias(alias)
        v.version(version)
        if alias == LATEST:
            raise field_error("alias", "'latest' is managed by the registry (it moves to each new version)")
        with self._session(write=True) as s:
            row = self._pool_version(s, f"{name}@{version}", "version")
            if row.version != version:  # `version` named an alias
                raise NotFound(f"version: pool {name!r} has no version {version!r}")
            self._set_alias_row(s, row.pool_id, alias, row.id)
            s.flush()
            self._check_alias_count(s, row.pool_id, "alias")
            s.expire(row)
            return s.get(PoolVersionRow, row.id).to_entity()

    def delete_alias(self, name: str, alias: str) -> None:
        v.name(name, "name", "pool name")
        v.alias(alias)
        if alias == LATEST:
            raise field_error("alias", "'latest' is managed by the registry and cannot be deleted")
        with self._session(write=True) as s:
            pool = s.scalar(select(PoolRow).where(PoolRow.name == name))
            row = s.get(PoolAliasRow, (pool.id, alias)) if pool else None
            if row is None:
                raise NotFound(f"alias: pool {name!r} has no alias {alias!r}")
            s.delete(row)

    def delete_pool_version(self, name: str, version: str) -> int:
        v.name(name, "name", "pool name")
        v.version(version)
        with self._session(write=True) as s:
            row = s.scalar(select(PoolVersionRow).join(PoolRow, PoolVersionRow.pool_id == PoolRow.id)
                           .where(PoolRow.name == name, PoolVersionRow.version == version))
            if row is None:
                raise NotFound(f"version: pool {name!r} has no version {version!r}")
            pinned = s.scalars(select(PoolAliasRow.alias).where(PoolAliasRow.pool_version_id == row.id,
                                                                PoolAliasRow.alias != LATEST)).all()
            if pinned:
                raise FailedPrecondition(f"pool {name}@{version} is referenced by alias(es) "
                                         f"{', '.join(sorted(pinned))}; move or delete them first")
            pool_id = row.pool_id
            dropped = s.execute(delete(ComposedModelRow).where(ComposedModelRow.pool_version_id == row.id)).rowcount
            s.execute(update(ExtractionJobRow).where(ExtractionJobRow.pool_version_id == row.id)
                      .values(pool_version_id=None))
            s.execute(delete(PoolAliasRow).where(PoolAliasRow.pool_version_id == row.id))
            s.delete(row)
            s.flush()
            newest = s.scalar(select(func.max(PoolVersionRow.id)).where(PoolVersionRow.pool_id == pool_id))
            if newest is None:
                s.execute(delete(PoolRow).where(PoolRow.id == pool_id))
            else:
                self._set_alias_row(s, pool_id, LATEST, newest)
            return int(dropped or 0)

    # -- composed-model cache ------------------------------------------------------------------

    def _composed_key(self, s: Session, spec: e.ComposedModelSpec,
                      pools: dict[str, tuple[PoolVersionRow, int]]) -> tuple[PoolVersionRow, tuple[int, ...], str]:
        """(pool version, sorted class ids, class-set key) of a composed model; `pools` remembers
        each pool reference's version and class count for the transaction."""
        ids = tuple(sorted(spec.class_ids))
        if spec.pool not in pools:
            pv = self._pool_version(s, spec.pool, light=True)
            n = s.scalar(select(func.count()).select_from(DatasetClassRow)
                         .join(HierarchyRow, HierarchyRow.dataset_id == DatasetClassRow.dataset_id)
                         .where(HierarchyRow.id == pv.hierarchy_id))
            pools[spec.pool] = (pv, n)
        pv, n = pools[spec.pool]
        if ids[-1] >= n:
            raise field_error("class_ids", f"data set {pv.hierarchy.dataset.name!r} has class ids 0..{n - 1}")
        return pv, ids, class_set_key(ids)

    @staticmethod
    def _composed_row(s: Session, pv: PoolVersionRow, key: str, fmt: str) -> ComposedModelRow | None:
        return s.scalar(select(ComposedModelRow).where(ComposedModelRow.pool_version_id == pv.id,
                                                       ComposedModelRow.class_set == key,
                                                       ComposedModelRow.format == fmt))

    def add_composed_model(self, spec: e.ComposedModelSpec, blob: e.Blob,
                           before_commit: BeforeCommit = None) -> tuple[e.ComposedModel, bool]:
        v.check_composed_spec(spec)
        pools: dict[Session, dict] = {}  # existing() and new_row() both look, in one transaction

        def existing(s: Session) -> ComposedModelRow | None:
            pv, _, key = self._composed_key(s, spec, pools.setdefault(s, {}))
            return self._composed_row(s, pv, key, spec.format)

        def new_row(s: Session) -> ComposedModelRow:
            pv, ids, key = self._composed_key(s, spec, pools.setdefault(s, {}))
            return ComposedModelRow(pool_version_id=pv.id, class_set=key, class_ids=list(ids), format=spec.format,
                                    blob_sha256=blob.sha256, meta=spec.metadata, hits=0)

        # The first entry for a key wins: other bytes under the same key get that entry back.
        return self._add_artifact(blob, before_commit, existing, new_row)

    def add_composed_models(self, items: Sequence[tuple[e.ComposedModelSpec, e.Blob]],
                            before_commit: BeforeCommit = None) -> list[tuple[e.ComposedModel, bool]]:
        for spec, blob in items:
            v.check_composed_spec(spec)
            v.sha256(blob.sha256)

        def record(s: Session) -> list[tuple[e.ComposedModel, bool]]:
            # A few queries for the whole batch: its pool versions, the rows already recorded
            # under its keys, one insert of the new blobs; entities built without reading back.
            pools: dict[str, tuple[PoolVersionRow, int]] = {}
            keyed = [(spec, blob, *self._composed_key(s, spec, pools)) for spec, blob in items]
            known: dict[tuple[int, str, str], e.ComposedModel] = {
                (row.pool_version_id, row.class_set, row.format): row.to_entity()
                for row in s.scalars(select(ComposedModelRow).where(
                    ComposedModelRow.pool_version_id.in_({pv.id for _, _, pv, _, _ in keyed}),
                    ComposedModelRow.class_set.in_({key for _, _, _, _, key in keyed})))}
            out, new_rows, new_blobs, now = [], [], [], utcnow()
            for spec, blob, pv, ids, key in keyed:
                where = (pv.id, key, spec.format)
                if where in known:  # recorded before, or earlier in this batch: the first wins
                    out.append((known[where], False))
                    continue
                new_rows.append(ComposedModelRow(pool_version_id=pv.id, class_set=key, class_ids=list(ids),
                                                 format=spec.format, blob_sha256=blob.sha256, meta=spec.metadata,
                                                 hits=0, created_at=now))
                new_blobs.append(blob)
                known[where] = e.ComposedModel(f"{pv.pool.name}@{pv.version}", ids, spec.format, blob, 0,
                                               dict(spec.metadata), aware(now), None)
                out.append((known[where], True))
            for blob in new_blobs:  # before the rows that reference them are flushed
                self._insert_blob(s, blob)
            s.add_all(new_rows)
            s.flush()
            if before_commit:
                before_commit()
            return out

        for attempt in range(3):
            try:
                with self._session(write=True) as s:
                    return record(s)
            except AlreadyExists:  # a concurrent writer recorded one of them first: look again
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def get_composed_model(self, ref: str, class_ids: Sequence[int], fmt: str,
                           count_hit: bool = True) -> e.ComposedModel:
        ids = tuple(sorted(v.class_ids(class_ids)))
        limits.check_format("format", fmt)
        with self._session(write=count_hit) as s:
            pv = self._pool_version(s, ref, light=True)
            row = s.scalar(select(ComposedModelRow).where(ComposedModelRow.pool_version_id == pv.id,
                                                          ComposedModelRow.class_set == class_set_key(ids),
                                                          ComposedModelRow.format == fmt))
            if row is None:
                raise NotFound(f"no composed model cached for {pv.pool.name}@{pv.version} classes "
                               f"[{limits.listing(ids, 20)}] format {fmt!r}")
            if count_hit:
                s.execute(update(ComposedModelRow).where(ComposedModelRow.id == row.id)
                          .values(hits=ComposedModelRow.hits + 1, last_hit_at=utcnow()))
                s.refresh(row)
            return row.to_entity()

    # -- extraction jobs -----------------------------------------------------------------------

    def create_job(self, params: dict, oracle_id: int | None = None, job_id: str | None = None) -> e.ExtractionJob:
        v.mapping(params, "params_json", limits.MAX_LARGE_JSON_BYTES)
        if job_id:
            limits.check_job_id("job_id", job_id)
        else:
            job_id = uuid.uuid4().hex
        if oracle_id is not None:
            v.positive_id(oracle_id, "oracle_id")
        try:
            with self._session(write=True) as s:
                if oracle_id is not None:
                    self._row(s, OracleRow, oracle_id, "oracle_id", "oracle")
                if s.get(ExtractionJobRow, job_id) is not None:
                    raise AlreadyExists(f"job_id: job {job_id!r} already exists")
                now = utcnow()
                row = ExtractionJobRow(id=job_id, state=e.JobState.PENDING.value, progress=0.0, stage="", message="",
                                       params=params, error="", oracle_id=oracle_id, created_at=now, updated_at=now)
                s.add(row)
                s.flush()
                return row.to_entity()
        except AlreadyExists:
            raise AlreadyExists(f"job_id: job {job_id!r} already exists") from None

    def update_job(self, job_id: str, update_: e.JobUpdate) -> e.ExtractionJob:
        limits.check_job_id("job_id", job_id)
        v.check_job_update(update_)
        with self._session(write=True) as s:
            row = self._row(s, ExtractionJobRow, job_id, "job_id", "job")
            current = e.JobState(row.state)
            if current.terminal:
                raise FailedPrecondition(f"job {job_id} is {current.value}; a finished job cannot change")
            if update_.state is not None:
                row.state = e.JobState(update_.state).value
            for attr in ("progress", "stage", "message", "error"):
                value = getattr(update_, attr)
                if value is not None:
                    setattr(row, attr, value)
            if update_.oracle_id is not None:
                self._row(s, OracleRow, update_.oracle_id, "oracle_id", "oracle")
                row.oracle_id = update_.oracle_id
            if update_.pool is not None:
                row.pool_version_id = self._pool_version(s, update_.pool).id
            row.updated_at = utcnow()
            s.flush()
            s.expire(row)
            return s.get(ExtractionJobRow, job_id).to_entity()

    def get_job(self, job_id: str) -> e.ExtractionJob:
        limits.check_job_id("job_id", job_id)
        return self._get(ExtractionJobRow, job_id, "job", "job_id")

    def list_jobs(self, state: e.JobState | None = None, page_size: int = 0, page_token: str = "",
                  item_bytes: Callable[[e.ExtractionJob], int] | None = None) -> e.Page[e.ExtractionJob]:
        def query(s: Session) -> Select:
            q = select(ExtractionJobRow)
            if state is not None:
                q = q.where(ExtractionJobRow.state == e.JobState(state).value)
            return q.order_by(ExtractionJobRow.created_at.desc(), ExtractionJobRow.id)

        return self._page(query, ("jobs", state), page_size, page_token, item_bytes)

    # -- lineage -------------------------------------------------------------------------------

    LINEAGE_KINDS = ("composed_model", "pool", "expert", "library", "oracle")

    def lineage(self, kind: str, ident: str) -> list[e.LineageNode]:
        if kind not in self.LINEAGE_KINDS:
            raise field_error("kind", f"expected one of {', '.join(self.LINEAGE_KINDS)}, got {limits.quote(kind)}")
        if kind in ("expert", "library", "oracle"):
            num = limits.parse_id("id", ident)
        nodes: list[e.LineageNode] = []
        with self._session() as s:
            library: LibraryRow | None = None
            oracle: OracleRow | None = None
            dataset = ""
            if kind == "composed_model":
                v.sha256(ident, "id")
                cm = s.scalar(select(ComposedModelRow).where(ComposedModelRow.blob_sha256 == ident)
                              .order_by(ComposedModelRow.id).limit(1))
                if cm is None:
                    raise NotFound(f"id: no composed model with sha256 {ident[:12]}...")
                ent = cm.to_entity()
                nodes.append(e.LineageNode("composed_model", ident, f"{ent.pool} {list(ent.class_ids)} {ent.format}",
                                           ent.blob))
                kind, pv = "pool", cm.pool_version
            elif kind == "pool":
                pv = self._pool_version(s, ident, "id")
            if kind == "pool":
                nodes.append(e.LineageNode("pool", f"{pv.pool.name}@{pv.version}", pv.pool.name))
                library = pv.library
            elif kind == "expert":
                x = self._row(s, ExpertRow, num, "id", "expert")
                nodes.append(e.LineageNode("expert", str(x.id), x.task.name, x.blob.to_entity()))
                library = x.library
            elif kind == "library":
                library = self._row(s, LibraryRow, num, "id", "library")
            elif kind == "oracle":
                oracle = self._row(s, OracleRow, num, "id", "oracle")
            if library is not None:
                nodes.append(e.LineageNode("library", str(library.id), library.name, library.blob.to_entity()))
                oracle = s.get(OracleRow, library.oracle_id) if library.oracle_id else None
                dataset = library.dataset.name
            if oracle is not None:
                nodes.append(e.LineageNode("oracle", str(oracle.id), oracle.name, oracle.blob.to_entity()))
                dataset = oracle.dataset.name
            nodes.append(e.LineageNode("dataset", dataset, dataset))
        return nodes

