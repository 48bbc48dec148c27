"""Alembic migrations on SQLite and PostgreSQL, and refusing to run on an out-of-date schema."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from testenv import auth_env

from poe.cli.main import main
from poe.cli.output import EXIT_INVALID_ARGUMENT
from poe.engine.errors import FailedPrecondition
from poe_services.host import create_server
from poe_services.registry import db
from poe_services.registry.models import Base
from poe_services.registry.sqlstore import SqlRegistryStore

TABLES = {t.name for t in Base.metadata.sorted_tables}


def head_revision() -> str:
    return ScriptDirectory.from_config(db.alembic_config()).get_current_head()


def tables(engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def test_upgrade_empty_database_to_head_and_back_to_base(empty_db_url):
    engine = db.make_engine(empty_db_url)
    try:
        assert tables(engine) == set()
        status = db.upgrade(engine)
        assert status.up_to_date and status.current == head_revision()
        assert tables(engine) == TABLES
        with engine.connect() as conn:  # the migrations create exactly what the ORM classes describe
            diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diffs == []
        store = SqlRegistryStore(engine)  # accepted at head
        store.ping()
        db.downgrade(engine, "0001")
        assert tables(engine) == TABLES - {"composed_models", "extraction_jobs"}
        status = db.downgrade(engine, "base")
        assert status.current is None and tables(engine) == set()
        db.upgrade(engine)  # and up again
        assert tables(engine) == TABLES
    finally:
        engine.dispose()


def test_refuses_out_of_date_schema_and_names_the_command(empty_db_url, tmp_path):
    from poe.engine.config import Settings

    engine = db.make_engine(empty_db_url)
    try:
        with pytest.raises(FailedPrecondition, match="empty.*poe registry migrate"):
            SqlRegistryStore(engine)
        db.upgrade(engine, "0001")
        with pytest.raises(FailedPrecondition, match="at revision 0001.*needs 0002.*`poe registry migrate`"):
            db.require_current_schema(engine)
        cfg = Settings.from_env({"POE_HOME": str(tmp_path), "POE_DATABASE_URL": empty_db_url,
                                 "POE_BLOB_URL": f"file://{tmp_path / 'blobs'}"})
        with pytest.raises(FailedPrecondition, match="poe registry migrate"):
            create_server("127.0.0.1:0", cfg, ("registry",))
        # A schema written by a newer release is refused too, with a different hint.
        db.upgrade(engine)
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
        with pytest.raises(FailedPrecondition, match="unknown to this version"):
            SqlRegistryStore(engine)
        with engine.begin() as conn:
            conn.execute(text(f"UPDATE alembic_version SET version_num = '{head_revision()}'"))
        host = create_server("127.0.0.1:0", cfg, ("registry",))
        assert host.port > 0
        assert host.stop(None).wait(30)
    finally:
        engine.dispose()


def test_auto_migrate_on_start(empty_db_url, tmp_path):
    from poe.engine.config import Settings

    cfg = Settings.from_env({**auth_env(), "POE_HOME": str(tmp_path), "POE_DATABASE_URL": empty_db_url,
                             "POE_BLOB_URL": f"file://{tmp_path / 'blobs'}", "POE_REGISTRY_AUTO_MIGRATE": "true"})
    assert create_server("127.0.0.1:0", cfg, ("registry",)).stop(None).wait(30)
    engine = db.make_engine(empty_db_url)
    try:
        assert db.schema_status(engine).up_to_date
    finally:
        engine.dispose()


def test_poe_registry_migrate_command(empty_db_url, capsys):
    assert main(["registry", "migrate", "--status", "--database-url", empty_db_url]) == 1
    assert "needs `poe registry migrate`" in capsys.readouterr().out
    assert main(["registry", "migrate", "--database-url", empty_db_url]) == 0
    assert f"empty -> {head_revision()}" in capsys.readouterr().out
    assert main(["registry", "migrate", "--database-url", empty_db_url]) == 0
    assert "already at" in capsys.readouterr().out
    assert main(["registry", "migrate", "--status", "--database-url", empty_db_url]) == 0
    assert main(["registry", "migrate", "--database-url", "not a url"]) == EXIT_INVALID_ARGUMENT
    err = capsys.readouterr().err
    assert err.startswith("poe: error:") and len(err.strip().splitlines()) == 1
