"""Environment shared by every test server and client (imported by name: tests/ is on sys.path).

The root conftest makes one token file for the whole run, with an admin and a service token, and
puts POE_TOKENS_FILE, POE_TOKEN (admin) and POE_SERVICE_TOKEN in os.environ: clients send the admin
token, and every server built from `auth_env()` (or from os.environ, as subprocesses are) accepts it.
Tests of authentication itself build their own files and tokens.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

AUTH_KEYS = ("POE_TOKENS_FILE", "POE_SERVICE_TOKEN")


def eventually(predicate: Callable[[], bool], timeout: float = 20.0, interval: float = 0.05) -> bool:
    """Whether `predicate()` holds within `timeout` seconds (polled every `interval`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, exited but not reaped yet, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def make_settings(tmp_path, **overrides):
    """The settings of a test's servers: the run's tokens, POE_HOME under `tmp_path`, then `overrides`
    (Settings fields)."""
    import dataclasses

    from poe.engine.config import Settings

    return dataclasses.replace(Settings.from_env({**auth_env(), "POE_HOME": str(tmp_path / "home")}), **overrides)


def auth_env() -> dict[str, str]:
    """The POE_* variables a test server needs to accept the run's tokens."""
    return {k: os.environ[k] for k in AUTH_KEYS if k in os.environ}


PG_URL = os.environ.get("POE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@contextmanager
def own_postgres_database(prefix: str) -> Iterator[tuple[object, str, str]]:
    """(admin connection, name, SQLAlchemy URL) of a new, empty database on the test server
    (POE_TEST_POSTGRES_URL), dropped afterwards. Skips when the server is unreachable; in CI fails."""
    import psycopg
    import pytest
    from sqlalchemy.engine import make_url

    base = make_url(PG_URL)
    try:
        admin = psycopg.connect(base.set(drivername="postgresql").render_as_string(hide_password=False),
                                autocommit=True, connect_timeout=3)
    except psycopg.Error as e:
        reason = str(e).strip().splitlines()[0]
        if IN_CI:
            pytest.fail(f"PostgreSQL tests cannot run in CI: {reason}", pytrace=False)
        pytest.skip(f"PostgreSQL not reachable ({reason}); set POE_TEST_POSTGRES_URL (CI fails instead)")
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin, name, base.set(database=name).render_as_string(hide_password=False)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
