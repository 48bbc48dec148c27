"""Alembic environment: runs on the connection the caller passes (`poe_services.registry.db`),
or on POE_DATABASE_URL when Alembic is run by hand."""

from __future__ import annotations

from alembic import context

from poe_services.registry.models import Base

target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from poe.engine.config import settings
    from poe_services.registry.db import make_engine

    engine = make_engine(settings().database_url)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
run_migrations_online()
