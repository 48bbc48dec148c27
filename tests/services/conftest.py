"""Real components for the host tests: SQLite + file blobs under tmp_path, and a PostgreSQL
database of the test's own (POE_TEST_POSTGRES_URL) that can refuse connections for a while."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from testenv import auth_env, eventually, own_postgres_database

from poe.engine.config import Settings

# poll(predicate) in the tests: testenv.eventually with this suite's timeout.
wait_until = functools.partial(eventually, timeout=15.0)


@pytest.fixture
def poll() -> Callable[..., bool]:
    """poll(predicate, timeout=15): wait until the predicate holds; returns whether it did."""
    return wait_until


def host_settings(home: Path, **env: str) -> Settings:
    """SQLite + file blobs under `home`; health probes every 0.1 s."""
    return Settings.from_env({**auth_env(), "POE_HOME": str(home),
                              "POE_DATABASE_URL": f"sqlite:///{home / 'registry.sqlite3'}",
                              "POE_BLOB_URL": f"file://{home / 'blobs'}", "POE_REGISTRY_HEALTH_INTERVAL": "0.1",
                              "POE_EXTRACTOR_HEALTH_INTERVAL": "0.1", **env})


@pytest.fixture
def make_settings() -> Callable[..., Settings]:
    """make_settings(home, **POE_env) -> Settings: SQLite + file blobs under home."""
    return host_settings


@pytest.fixture
def settings(tmp_path) -> Settings:
    return host_settings(tmp_path / "home")


@dataclass
class ClosableDatabase:
    """A migrated PostgreSQL database that `refuse()` makes unreachable (connections dropped, new
    ones refused by the server) and `accept()` brings back."""

    url: str
    name: str
    admin: object

    def refuse(self) -> None:
        self.admin.execute(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false')
        self.admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (self.name,))

    def accept(self) -> None:
        self.admin.execute(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true')


@pytest.fixture
def closable_database():
    from poe_services.registry import db

    with own_postgres_database("poe_host_test") as (admin, name, url):
        engine = db.make_engine(url)
        try:
            db.upgrade(engine)
        finally:
            engine.dispose()
        yield ClosableDatabase(url, name, admin)
