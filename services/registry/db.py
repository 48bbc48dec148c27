"""Engine, managed sessions and migrations of the registry database (SQLite or PostgreSQL).

- `make_engine(url)`: SQLite gets WAL, foreign keys, a busy timeout and `BEGIN IMMEDIATE` for write
  transactions (so two writers queue instead of failing with "database is locked"); PostgreSQL
  gets a connect timeout and pre-ping, so a restarted server is picked up again.
- `session_scope(factory, write=...)`: the one place that commits or rolls back and maps database
  errors to domain errors (IntegrityError -> AlreadyExists, connection/operational errors ->
  Unavailable).
- `upgrade`, `downgrade`, `schema_status`, `require_current_schema`: Alembic, with the scripts
  shipped in `migrations/`. A service refuses to run on a schema that is not at head and names
  the command that fixes it (`poe registry migrate`).
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from poe.engine.config import redact_url
from poe.engine.errors import AlreadyExists, FailedPrecondition, InvalidArgument, Unavailable

log = logging.getLogger(__name__)

# Alembic logs at INFO whenever it is used (each plugin it sets up, "Context impl SQLiteImpl.",
# "Will assume non-transactional DDL."): a service logging at INFO would print that at every start.
# Its loggers stay at WARNING unless the application configured them; `upgrade` logs what changed.
if logging.getLogger("alembic").level == logging.NOTSET:
    logging.getLogger("alembic").setLevel(logging.WARNING)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
MIGRATE_COMMAND = "poe registry migrate"

_sqlite_write: contextvars.ContextVar[bool] = contextvars.ContextVar("poe_registry_sqlite_write", default=False)


def redact(url: str) -> str:
    """The URL with any password hidden (for messages and logs)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return redact_url(url)


def make_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError:
        raise InvalidArgument(f"database URL {redact_url(url)!r} is not a valid SQLAlchemy URL "
                              "(POE_DATABASE_URL)") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn, _record) -> None:
            dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")  # WAL: no corruption on power loss, fewer fsyncs
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if _sqlite_write.get() else "BEGIN")

        return engine
    if backend == "postgresql":
        connect_args = {"connect_timeout": 5} if parsed.get_driver_name() in ("psycopg", "psycopg2") else {}
        return create_engine(parsed, pool_pre_ping=True, pool_size=8, max_overflow=8, pool_timeout=10,
                             connect_args=connect_args)
    return create_engine(parsed, pool_pre_ping=True)


def _is_disconnect(e: Exception) -> bool:
    return isinstance(e, sa_exc.DBAPIError) and bool(getattr(e, "connection_invalidated", False))


@contextmanager
def session_scope(factory: sessionmaker[Session], write: bool = False) -> Iterator[Session]:
    """A session that commits when the block succeeds and rolls back otherwise.

    Database errors become domain errors: IntegrityError -> AlreadyExists; OperationalError,
    InterfaceError, a dropped connection or an exhausted pool -> Unavailable. `write` takes the
    SQLite write lock at BEGIN (no effect on PostgreSQL).
    """
    token = _sqlite_write.set(write)
    session = factory()
    try:
        try:
            yield session
            session.commit()
        except BaseException:
            try:
                session.rollback()
            except Exception:  # the connection may be gone; nothing to roll back then
                log.debug("rollback failed", exc_info=True)
            raise
    except sa_exc.IntegrityError as e:
        raise AlreadyExists(f"conflicts with an existing record ({_first_line(e.orig)})") from e
    except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, sa_exc.DisconnectionError) as e:
        raise Unavailable(f"database unavailable ({_first_line(getattr(e, 'orig', e))})") from e
    except sa_exc.DBAPIError as e:
        if _is_disconnect(e):
            raise Unavailable(f"database connection lost ({_first_line(e.orig)})") from e
        raise
    finally:
        session.close()
        _sqlite_write.reset(token)


def _first_line(e: object) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def ping(engine: Engine) -> None:
    """Raise Unavailable unless the database answers now."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, sa_exc.DisconnectionError,
            sa_exc.DBAPIError) as e:
        raise Unavailable(f"database {engine.url.render_as_string(hide_password=True)} unavailable "
                          f"({_first_line(getattr(e, 'orig', e))})") from None


# -- migrations ----------------------------------------------------------------------------------

def alembic_config(connection=None):
    from alembic.config import Config

    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@dataclass(frozen=True)
class SchemaStatus:
    current: str | None  # None: empty database
    head: str
    known: bool  # whether this code knows the current revision

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head


def schema_status(engine: Engine) -> SchemaStatus:
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
    except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DBAPIError) as e:
        raise Unavailable(f"database unavailable ({_first_line(getattr(e, 'orig', e))})") from None
    known = current is None or any(r.revision == current for r in script.walk_revisions())
    return SchemaStatus(current, script.get_current_head(), known)


def require_current_schema(engine: Engine) -> None:
    """FailedPrecondition, naming the fix, unless the database schema is at head."""
    st = schema_status(engine)
    if st.up_to_date:
        return
    where = engine.url.render_as_string(hide_password=True)
    if not st.known:
        raise FailedPrecondition(
            f"registry database {where} has schema revision {st.current}, unknown to this version (which "
            f"expects {st.head}): it was migrated by a newer release; run that release or restore a backup")
    state = "empty (no schema)" if st.current is None else f"at revision {st.current}"
    raise FailedPrecondition(f"registry database {where} is {state}, this version needs {st.head}: "
                             f"run `{MIGRATE_COMMAND}` (with the same POE_DATABASE_URL)")


def upgrade(engine: Engine, revision: str = "head") -> SchemaStatus:
    """Migrate to `revision`; one INFO line when the schema changed."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    token = _sqlite_write.set(True)
    try:
        with engine.begin() as conn:
            before = MigrationContext.configure(conn).get_current_revision()
            command.upgrade(alembic_config(conn), revision)
    except (sa_exc.OperationalError, sa_exc.InterfaceError) as e:
        raise Unavailable(f"database unavailable ({_first_line(getattr(e, 'orig', e))})") from None
    finally:
        _sqlite_write.reset(token)
    status = schema_status(engine)
    if status.current != before:
        log.info("registry database %s: schema %s -> %s", engine.url.render_as_string(hide_password=True),
                 before or "empty", status.current)
    return status


def downgrade(engine: Engine, revision: str = "base") -> SchemaStatus:
    from alembic import command

    token = _sqlite_write.set(True)
    try:
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), revision)
    finally:
        _sqlite_write.reset(token)
    return schema_status(engine)
