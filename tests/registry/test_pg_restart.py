"""A PostgreSQL server restarted under a serving registry: between imports and during one.

The test owns its server: a private cluster (initdb in a temp dir, a free port on 127.0.0.1, the
socket inside the temp dir) that it restarts with pg_ctl; the machine's own server is never
touched. It needs root (initdb runs as the `postgres` user) and the PostgreSQL binaries: without
them it is skipped locally and FAILS when CI=true (the CI machine has both).
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from poe.client.registry import RegistryClient
from poe.engine.errors import NotFound, Unavailable
from poe_services.host import create_server

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
EXPERTS = 5  # experts of the test pool (one per primitive task of fashion-mnist)


def _pg_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb, pg_ctl and postgres."""
    found = []
    for pg_ctl in glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"):
        bin_dir = Path(pg_ctl).parent
        version = bin_dir.parent.name
        if all((bin_dir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            found.append((int(version) if version.isdigit() else 0, bin_dir))
    return max(found)[1] if found else None


def _cannot_run(reason: str):
    if IN_CI:
        pytest.fail(f"the PostgreSQL restart tests cannot run in CI: {reason}", pytrace=False)
    pytest.skip(f"cannot run a private PostgreSQL server: {reason} (CI fails instead)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateServer:
    """A PostgreSQL cluster in `root` that only this test module uses (run as the `postgres` user)."""

    def __init__(self, bin_dir: Path, root: Path):
        self.bin_dir = bin_dir
        self.data = root / "data"
        self.sockets = root / "sockets"
        self.log = root / "server.log"
        self.port = _free_port()

    def _run(self, tool: str, *args: str, timeout: float = 60) -> None:
        cmd = ["runuser", "-u", "postgres", "--", str(self.bin_dir / tool), *args]
        # pg_ctl gets a log file (-l): a server inheriting our pipes would keep run() waiting forever.
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}\n{log}")

    def _pg_ctl(self, action: str, *args: str) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", *args, action)

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def start(self) -> None:
        self._pg_ctl("start", "-o", f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off")

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl("stop", "-m", mode)

    def restart(self) -> None:
        """`pg_ctl restart -m fast`: every session is terminated, the server comes back on the same port."""
        self._pg_ctl("restart", "-m", "fast")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        import psycopg

        name = f"poe_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name


@pytest.fixture(scope="module")
def pg_server():
    """A private PostgreSQL server, started; stopped (immediate) and removed after the module."""
    if os.geteuid() != 0:
        _cannot_run("not root (initdb must run as the postgres user, through runuser)")
    bin_dir = _pg_bin_dir()
    if bin_dir is None:
        _cannot_run("no initdb/pg_ctl/postgres under /usr/lib/postgresql/*/bin")
    if shutil.which("runuser") is None:
        _cannot_run("no runuser")
    try:
        postgres_user = pwd.getpwnam("postgres")
    except KeyError:
        _cannot_run("no `postgres` system user")

    # Directly under the system temp dir: pytest's tmp dirs are private to root, and a socket
    # path must stay under ~100 characters.
    root = Path(tempfile.mkdtemp(prefix="poe-pg-"))
    server = PrivateServer(bin_dir, root)
    try:
        server.sockets.mkdir()
        for path in (root, server.sockets):
            os.chown(path, postgres_user.pw_uid, postgres_user.pw_gid)
        server.init()
        server.start()
        yield server
    finally:
        if server.running():
            try:
                server.stop("immediate")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_restart_url(pg_server) -> str:
    """A fresh database on the private server, which is running (a failed test may have left it down)."""
    if not pg_server.running():
        pg_server.start()
    return pg_server.url(pg_server.create_database())


class RunningRegistry:
    """A registry on the private server with a file blob store, and its client."""

    def __init__(self, settings):
        self.settings = settings
        self.host = create_server("127.0.0.1:0", settings, ("registry",), migrate=True)
        self.host.start()
        self.client = RegistryClient(f"127.0.0.1:{self.host.port}", timeout=20)
        self.health = health_pb2_grpc.HealthStub(self.client.channel)

    def status(self):
        return self.health.Check(health_pb2.HealthCheckRequest(service="poe.v1.Registry"), timeout=5).status

    def versions(self) -> list[str]:
        return sorted(p.version for p in self.client.list_pools(name="test-pool"))

    def close(self) -> None:
        self.client.close()
        self.host.stop(None).wait(30)


@pytest.fixture
def start_registry(pg_restart_url, tmp_path, make_settings):
    """start_registry(**POE_env) -> RunningRegistry on the test's database (health probes every 0.1 s by default)."""
    started: list[RunningRegistry] = []

    def start(**env: str) -> RunningRegistry:
        started.append(RunningRegistry(make_settings(tmp_path, pg_restart_url, f"file://{tmp_path / 'blobs'}", **env)))
        return started[-1]

    yield start
    for reg in started:
        reg.close()


def pool_version(pool_dir: Path, version: str, tmp_path: Path) -> Path:
    """A copy of the test pool published as `version` (same bytes, so its blobs are shared)."""
    copy = tmp_path / f"pool-{version}"
    if not copy.exists():
        shutil.copytree(pool_dir, copy)
        manifest = json.loads((copy / "pool.json").read_text())
        manifest["version"] = version
        (copy / "pool.json").write_text(json.dumps(manifest))
    return copy


def test_restart_between_imports(pg_server, assert_fsck_clean, start_registry, pool_dir, tmp_path):
    # No health probe in this test: a probe would meet the dead connections first and have them
    # dropped; here the import's own calls must not be handed one.
    registry = start_registry(POE_REGISTRY_HEALTH_INTERVAL="3600")
    pv, created = registry.client.import_pool(pool_version(pool_dir, "1", tmp_path))
    assert created and len(pv.experts) == EXPERTS

    pg_server.restart()  # every pooled connection of the registry dies
    pv, created = registry.client.import_pool(pool_version(pool_dir, "2", tmp_path))
    assert created and len(pv.experts) == EXPERTS
    assert registry.versions() == ["1", "2"]
    assert all(len(registry.client.get_pool(f"test-pool@{v}").experts) == EXPERTS for v in ("1", "2"))

    # `poe registry fsck` finds nothing inconsistent (no upload is in flight).
    assert assert_fsck_clean(registry.settings).blobs_checked > 0


def test_health_follows_a_restart(pg_server, assert_fsck_clean, start_registry, pool_dir, tmp_path, poll):
    registry = start_registry()
    registry.client.import_pool(pool_version(pool_dir, "1", tmp_path))

    # A restart with the server held down until health notices (a plain restart may fall between
    # two probes): NOT_SERVING and UNAVAILABLE while it is down, SERVING once it is back, and the
    # same registry process imports again.
    pg_server.stop("fast")
    try:
        assert poll(lambda: registry.status() == NOT_SERVING)
        with pytest.raises(Unavailable, match="database"):
            registry.client.get_pool("test-pool@1")
    finally:
        pg_server.start()
    assert poll(lambda: registry.status() == SERVING)
    pv, created = registry.client.import_pool(pool_version(pool_dir, "2", tmp_path))
    assert created and len(pv.experts) == EXPERTS
    assert registry.versions() == ["1", "2"]

    # `poe registry fsck` finds nothing inconsistent (no upload is in flight).
    assert assert_fsck_clean(registry.settings).blobs_checked > 0


def test_restart_during_an_import(pg_server, assert_fsck_clean, start_registry, pool_dir, tmp_path, poll):
    registry = start_registry()
    registry.client.import_pool(pool_version(pool_dir, "1", tmp_path))
    started = threading.Event()
    outcome: dict[str, object] = {}

    def progress(msg: str) -> None:
        if "library" in msg:
            started.set()  # the restart begins now ...
        if started.is_set() and "published" not in msg:
            time.sleep(0.05)  # ... and the experts' uploads and the publish are spread across it

    def run_import() -> None:
        try:
            outcome["result"] = registry.client.import_pool(pool_version(pool_dir, "2", tmp_path), progress=progress)
        except Exception as err:  # judged below
            outcome["error"] = err
        outcome["ended"] = time.monotonic()

    importer = threading.Thread(target=run_import, daemon=True)
    importer.start()
    assert started.wait(20), outcome
    restart_began = time.monotonic()
    pg_server.restart()
    importer.join(60)
    assert not importer.is_alive()
    assert outcome["ended"] > restart_began, "the import was over before the restart began"

    error = outcome.get("error")
    if error is not None:
        assert isinstance(error, Unavailable), repr(error)
    else:
        pv, created = outcome["result"]
        assert created and len(pv.experts) == EXPERTS

    # The version is there completely or not at all, and ListPools agrees with GetPool.
    assert poll(lambda: registry.status() == SERVING)
    try:
        assert len(registry.client.get_pool("test-pool@2").experts) == EXPERTS
        published = True
    except NotFound:
        published = False
    assert published or error is not None  # (a failed import whose COMMIT went through is whole, too)
    assert registry.versions() == (["1", "2"] if published else ["1"])

    # The same registry, no restart: importing again publishes it (or finds it published).
    pv, created = registry.client.import_pool(pool_version(pool_dir, "2", tmp_path))
    assert created == (not published) and len(pv.experts) == EXPERTS
    assert registry.versions() == ["1", "2"]

    # `poe registry fsck`: nothing inconsistent (no upload in flight; a failed import's blobs are
    # referenced again by the import that followed it).
    assert assert_fsck_clean(registry.settings).blobs_checked > 0
