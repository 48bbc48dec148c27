"""`poe registry gc` and `poe registry fsck`, and what crashes leave behind, on real components:
SQLite and PostgreSQL, file and S3 (moto) blob stores, a `poe registry import` killed with SIGKILL
mid-upload, PostgreSQL backends terminated under a serving registry, the database gone between an
upload's bytes and its COMMIT. Each ends with fsck finding nothing it did not leave on purpose."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from poe.cli.main import main
from poe.cli.output import EXIT_FSCK_PROBLEMS, EXIT_UNAVAILABLE, EXIT_USAGE
from poe.client.registry import RegistryClient
from poe.engine import hierarchy as hierarchy_mod
from poe.engine.errors import NotFound, Unavailable
from poe.engine.pool import Pool
from poe.engine.pool import save as save_pool
from poe.v1 import common_pb2
from poe_services.extractor.driver import clean_run_dir
from poe_services.extractor.jobs import Job
from poe_services.host import create_server
from poe_services.registry import entities as e
from poe_services.registry.blobstore import FileBlobStore, blob_path
from poe_services.registry.core import Registry
from poe_services.registry.maintenance import _delete_orphan, check_blobs, collect_garbage, sweep_leftovers
from poe_services.registry.sqlstore import SqlRegistryStore

FM = "fashion-mnist"
HOUR = 3600.0
SHIPPED_POOL = Path(__file__).resolve().parents[2] / "pools" / "fashion-mnist"  # an 11 MB oracle: slow to stage


@pytest.fixture
def registry_core(store, blob_store) -> Registry:
    """The registry's core on the test's database and blob store (closed by their fixtures)."""
    store.add_hierarchy(hierarchy_mod.builtin(FM))
    return Registry(store, blob_store)


def register(reg: Registry, data: bytes, name: str = "oracle") -> str:
    sha = hashlib.sha256(data).hexdigest()
    reg.register(e.LibrarySpec(name, FM, {"depth": 10, "width": 1}), sha, len(data), [data])
    return sha


def overwrite(blobs, sha256: str, data: bytes) -> None:
    """Change the bytes at rest behind the registry's back (bit rot, a truncating copy)."""
    if isinstance(blobs, FileBlobStore):
        (blobs.root / blob_path(sha256)).write_bytes(data)
    else:
        blobs.client.put_object(blobs.bucket, blobs.prefix + blob_path(sha256), io.BytesIO(data), len(data))


def leave_in_staging(blobs, name: str, data: bytes) -> str:
    """What an upload killed half-way leaves in staging/."""
    if isinstance(blobs, FileBlobStore):
        (blobs.root / "staging" / name).write_bytes(data)
    else:
        blobs.client.put_object(blobs.bucket, f"{blobs.prefix}staging/{name}", io.BytesIO(data), len(data))
    return f"staging/{name}"


def age_file(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


# -- fsck --------------------------------------------------------------------------------------


def test_fsck_finds_flipped_truncated_and_missing_blobs(registry_core, assert_fsck_clean):
    store, blobs = registry_core.store, registry_core.blobs
    data = [os.urandom(3000 + i) for i in range(4)]
    flipped, truncated, missing, intact = (register(registry_core, d) for d in data)
    clean = check_blobs(store, blobs)
    assert clean.clean and clean.blobs_checked == 4 and clean.bytes_checked == sum(map(len, data))

    bad = bytearray(data[0])
    bad[1234] ^= 0x01
    overwrite(blobs, flipped, bytes(bad))
    overwrite(blobs, truncated, data[1][:-700])
    blobs.delete(missing)
    report = check_blobs(store, blobs)
    assert not report.clean and report.problems == 3
    assert {c["sha256"]: (c["stored_size"], c["recorded_size"]) for c in report.corrupt} == {
        flipped: (3000, 3000), truncated: (3001 - 700, 3001)}
    assert all(c["hashes_to"] != c["sha256"] and c["referenced"] for c in report.corrupt)
    assert report.missing == [{"sha256": missing, "size": 3002, "media_type": e.SAFETENSORS}]
    assert intact not in json.dumps(report.to_dict())
    assert report.orphans == [] and report.size_mismatch == []

    # Registering the same bytes again repairs a corrupt copy (the upload is verified on arrival)
    # and puts a missing one back.
    register(registry_core, data[0])
    assert [c["sha256"] for c in check_blobs(store, blobs).corrupt] == [truncated]
    register(registry_core, data[1])
    register(registry_core, data[2])
    assert_fsck_clean(store, blobs)


# -- gc ----------------------------------------------------------------------------------------


def test_gc_removes_old_leftovers_and_orphans_never_referenced_blobs(registry_core, assert_fsck_clean):
    store, blobs = registry_core.store, registry_core.blobs
    referenced = register(registry_core, os.urandom(2048))
    orphan = blobs.put(os.urandom(1500)).sha256  # bytes stored, the row never committed
    staged = leave_in_staging(blobs, "crashed.part", os.urandom(700))
    expected = {("orphan", orphan, 1500), ("staging", staged, 700)}

    # Just written: all of it could be an upload in flight.
    young = collect_garbage(store, blobs, apply=True)
    assert young.leftovers == [] and young.kept == len(expected)

    if not isinstance(blobs, FileBlobStore):  # an S3 multipart upload that nobody completes or aborts
        key = f"{blobs.prefix}staging/killed-mid-upload"  # (moto dates every upload 2010: never young)
        upload_id = blobs.client._create_multipart_upload(blobs.bucket, key, {})
        blobs.client._upload_part(blobs.bucket, key, os.urandom(1024), None, upload_id, 1)
        expected.add(("upload", "staging/killed-mid-upload", 1024))

    later = time.time() + 2 * HOUR
    dry = collect_garbage(store, blobs, now=later)
    assert {(x.kind, x.key, x.size) for x in dry.leftovers} == expected
    assert not any(x.removed for x in dry.leftovers) and dry.total_bytes == sum(s for _, _, s in expected)
    assert blobs.exists(orphan) and len(list(blobs.leftovers())) == len(expected) - 1

    done = collect_garbage(store, blobs, apply=True, now=later)
    assert {(x.kind, x.key) for x in done.leftovers if x.removed} == {(k, key) for k, key, _ in expected}
    assert not blobs.exists(orphan) and list(blobs.leftovers()) == []
    assert list(blobs.list()) == [referenced] and blobs.get(referenced)
    assert_fsck_clean(store, blobs)
    assert collect_garbage(store, blobs, now=later).leftovers == []


def test_gc_keeps_an_orphan_that_an_upload_claims_after_the_listing(registry_core, assert_fsck_clean):
    store, blobs = registry_core.store, registry_core.blobs
    data = os.urandom(1024)
    listed = blobs.stat(blobs.put(data).sha256)  # an orphan, as gc listed it
    register(registry_core, data)  # then an upload of the same content commits its row
    assert _delete_orphan(store, blobs, listed) is False
    assert blobs.exists(listed.key)
    assert_fsck_clean(store, blobs)


def test_gc_and_fsck_commands(db_url, tmp_path, capsys, monkeypatch, assert_fsck_clean):
    """Mixed ages on a file store through `poe registry gc` / `fsck`: the young stay."""
    monkeypatch.setenv("POE_HOME", str(tmp_path / "home"))
    blobs = FileBlobStore(tmp_path / "blobs")
    store = SqlRegistryStore(db_url)
    try:
        store.add_hierarchy(hierarchy_mod.builtin(FM))
        kept_sha = register(Registry(store, blobs), os.urandom(4096))
        age_file(blobs.root / blob_path(kept_sha), 3 * HOUR)  # old, but referenced
        old_orphan = blobs.put(os.urandom(2000)).sha256
        age_file(blobs.root / blob_path(old_orphan), 2 * HOUR)
        young_orphan = blobs.put(os.urandom(100)).sha256  # between "bytes stored" and "row committed"
        old_part = blobs.root / leave_in_staging(blobs, "a.part", os.urandom(3000))
        age_file(old_part, 2 * HOUR)
        young_part = blobs.root / leave_in_staging(blobs, "b.part", b"x")
    finally:
        store.close()
    where = ["--database-url", db_url, "--blob-url", blobs.url]

    assert main(["registry", "gc", *where]) == 0
    out = capsys.readouterr().out.splitlines()
    assert sorted(out[:-1]) == [f"would remove orphan {old_orphan} 2.0 KB (age 2.0h)",
                                "would remove staging staging/a.part 3.0 KB (age 2.0h)"]
    assert out[-1] == ("gc: would remove 2 leftover(s), 5.0 KB; 2 younger than the age or in use kept; "
                       "run with --apply to remove")
    assert old_part.exists() and blobs.exists(old_orphan)

    assert main(["registry", "fsck", *where]) == EXIT_FSCK_PROBLEMS == 3
    captured = capsys.readouterr()
    assert captured.out.startswith("fsck: 3 blobs, 6.2 KB verified: 1 blob(s) without rows (1 upload(s) in flight)")
    assert f"orphan: blob {old_orphan}" in captured.err

    assert main(["registry", "gc", "--apply", "--json", *where]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["applied"] and report["kept"] == 2 and report["total_bytes"] == 5000
    assert {x["key"] for x in report["leftovers"] if x["removed"]} == {old_orphan, "staging/a.part"}
    assert not old_part.exists() and young_part.exists()
    assert not blobs.exists(old_orphan) and blobs.exists(young_orphan) and blobs.exists(kept_sha)

    assert main(["registry", "fsck", *where, "--json"]) == 0
    details = json.loads(capsys.readouterr().out)
    assert details["clean"] and details["blobs_checked"] == 2
    assert [x["sha256"] for x in details["in_flight"]] == [young_orphan]

    path = blobs.root / blob_path(kept_sha)
    path.write_bytes(path.read_bytes()[:-1])
    assert main(["registry", "fsck", *where, "--json"]) == EXIT_FSCK_PROBLEMS
    assert [x["sha256"] for x in json.loads(capsys.readouterr().out)["corrupt"]] == [kept_sha]
    with pytest.raises(SystemExit) as exit_:
        main(["registry", "gc", "--older-than", "soon", *where])
    assert exit_.value.code == EXIT_USAGE and "'soon' is not a duration" in capsys.readouterr().err
    # A store that cannot be reached is not a finding: the unavailable status, distinct from problems found.
    unreachable = ["--database-url", "postgresql+psycopg://poe:poe@127.0.0.1:1/none", "--blob-url", blobs.url]
    assert main(["registry", "fsck", *unreachable]) == EXIT_UNAVAILABLE != EXIT_FSCK_PROBLEMS
    assert capsys.readouterr().err.startswith("poe: error: database unavailable")
    # Nothing but the blob truncated on purpose, and the young bytes of an upload "in flight".
    left = assert_fsck_clean(db_url, blobs.url, corrupt=[kept_sha], older_than=HOUR)
    assert [x["sha256"] for x in left.in_flight] == [young_orphan]


def test_gc_removes_run_directories_of_finished_jobs_only(store, tmp_path):
    runs = tmp_path / "extractions"
    states = {"done": e.JobState.SUCCEEDED, "broken": e.JobState.FAILED, "busy": e.JobState.RUNNING,
              "locked": e.JobState.CANCELLED}
    for job_id, state in states.items():
        store.create_job({"tasks": ["tops"]}, job_id=job_id)
        store.update_job(job_id, e.JobUpdate(state=state))
        (runs / job_id).mkdir(parents=True)
        (runs / job_id / "train.log").write_bytes(b"x" * 1000)
        (runs / job_id / ".lock").touch()
    (runs / "elsewhere").mkdir()  # a job this registry does not know
    (runs / ".staging-0a1b").mkdir()  # a start that died half-way
    (runs / ".staging-0a1b" / "oracle.torchscript").write_bytes(b"y" * 500)
    age_file(runs / ".staging-0a1b" / "oracle.torchscript", 2 * HOUR)
    blobs = FileBlobStore(tmp_path / "blobs")

    # Ended moments ago: kept for a post-mortem (default: a week).
    assert collect_garbage(store, blobs, runs_dir=runs).leftovers[0].key.endswith(".staging-0a1b")

    fd = os.open(runs / "locked" / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # an extractor still works in it
    try:
        report = collect_garbage(store, blobs, runs_dir=runs, keep_runs=60, now=time.time() + 120, apply=True)
    finally:
        os.close(fd)
    assert sorted(Path(x.key).name for x in report.leftovers if x.removed) == [".staging-0a1b", "broken", "done"]
    assert {x.size for x in report.leftovers} == {1000, 500}
    assert report.unknown_runs == [str(runs / "elsewhere")]
    assert sorted(p.name for p in runs.iterdir()) == ["busy", "elsewhere", "locked"]


def test_a_succeeded_job_drops_the_error_log_of_an_earlier_attempt(tmp_path):
    job = Job("resumed", None, tmp_path / "resumed", common_pb2.ExtractionJob())
    job.run.mkdir()
    for name in ("error.log", "train.log", "expert-tops.ckpt", "oracle.safetensors"):
        (job.run / name).write_text(name)
    clean_run_dir(job, "failed")
    assert (job.run / "error.log").exists()  # a failed job keeps everything for a post-mortem
    clean_run_dir(job, "succeeded")
    assert sorted(p.name for p in job.run.iterdir()) == ["train.log"]


# -- crashes -------------------------------------------------------------------------------------


def test_registry_start_up_sweeps_old_staging_files(tmp_path, sqlite_url, make_settings, poll, assert_fsck_clean):
    blobs = FileBlobStore(tmp_path / "blobs")
    old = blobs.root / leave_in_staging(blobs, "crashed.part", os.urandom(5000))
    age_file(old, 2 * HOUR)
    young = blobs.root / leave_in_staging(blobs, "uploading.part", os.urandom(10))
    host = create_server("127.0.0.1:0", make_settings(tmp_path, sqlite_url, blobs.url), ("registry",))
    host.start()
    try:
        assert poll(lambda: not old.exists(), timeout=10)
        assert young.exists()
    finally:
        host.stop(None).wait(30)
    assert sweep_leftovers(blobs, older_than=0) and not young.exists()
    assert_fsck_clean(sqlite_url, blobs.url)


def _import_killed_mid_upload(home: Path) -> list[Path]:
    """Run `poe registry import` (embedded registry) and SIGKILL it while a blob is being staged;
    returns the staging files left behind."""
    env = {k: v for k, v in os.environ.items() if k not in ("POE_DATABASE_URL", "POE_BLOB_URL", "POE_REGISTRY_ADDR")}
    command = [sys.executable, "-m", "poe.cli", "registry", "import", str(SHIPPED_POOL), "--target", "embedded"]
    proc = subprocess.Popen(command, env={**env, "POE_HOME": str(home)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    staging = home / "blobs" / "staging"
    try:
        while proc.poll() is None:
            try:
                if any(p.stat().st_size for p in staging.glob("*.part")):
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            except FileNotFoundError:  # not created yet, or committed under our eyes
                pass
            time.sleep(0.001)
    finally:
        if proc.poll() is None and proc.wait(60) is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the import finished before it could be killed"
    return list(staging.glob("*.part"))


def test_kill_9_during_import_then_gc_leaves_a_clean_store(tmp_path, monkeypatch, capsys, make_settings):
    home = tmp_path / "home"
    left = _import_killed_mid_upload(home)
    assert left and sum(p.stat().st_size for p in left) > 0

    monkeypatch.setenv("POE_HOME", str(home))
    for var in ("POE_DATABASE_URL", "POE_BLOB_URL", "POE_REGISTRY_ADDR"):
        monkeypatch.delenv(var, raising=False)
    settings = make_settings(tmp_path, f"sqlite:///{home / 'registry.sqlite3'}", f"file://{home / 'blobs'}")
    host = create_server("127.0.0.1:0", settings, ("registry",))  # a new registry on what the crash left
    host.start()
    try:
        with RegistryClient(f"127.0.0.1:{host.port}", timeout=20) as client:
            assert list(client.list_pools()) == []  # nothing half-published
            (home / "extractions" / "other-registrys-job").mkdir(parents=True)
            assert main(["registry", "gc", "--apply", "--older-than", "0"]) == 0
            out, err = capsys.readouterr()
            assert f"removed staging staging/{left[0].name}" in out
            # Embedded (SQLite under POE_HOME): the extractor's run directories are looked at too.
            assert f"kept run {home / 'extractions' / 'other-registrys-job'}: no such job" in err
            assert list((home / "blobs" / "staging").iterdir()) == []
            assert main(["registry", "fsck", "--older-than", "0"]) == 0  # no upload is in flight
            assert capsys.readouterr().out.endswith(": clean\n")
            pv, created = client.import_pool(SHIPPED_POOL)
            assert created and len(pv.experts) == 5
    finally:
        host.stop(None).wait(30)
    fsck = main(["registry", "fsck", "--json", "--older-than", "0"])
    report = json.loads(capsys.readouterr().out)
    assert fsck == 0 and report["blobs_checked"] == 7, report


# -- PostgreSQL connections cut under a serving registry -----------------------------------------


def _terminate_backends(conn) -> int:
    rows = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchall()
    return len(rows)


def _pool_version(pool: Pool, version: str, tmp_path: Path) -> Path:
    """`pool` as `version`, every weight shifted by it: each version uploads bytes of its own, so the
    blobs of an import that failed are not claimed later by another version's identical content."""
    directory = tmp_path / f"pool-{version}"
    if directory.exists():
        return directory
    shift = int(version) * 1e-3

    def shifted(state: dict) -> dict:
        return {k: t + shift if t.is_floating_point() else t for k, t in state.items()}

    experts = {task: dataclasses.replace(x, state=shifted(x.state)) for task, x in pool.experts.items()}
    return save_pool(dataclasses.replace(pool, version=version, library_state=shifted(pool.library_state),
                                         experts=experts, oracle_state=shifted(pool.oracle_state)), directory)


@pytest.mark.postgres
def test_postgres_backends_terminated_between_and_during_imports(pg_url, tmp_path, make_settings, random_pool, poll,
                                                                  assert_fsck_clean):
    import psycopg
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from sqlalchemy.engine import make_url

    conninfo = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    admin = psycopg.connect(conninfo, autocommit=True)
    settings = make_settings(tmp_path, pg_url, f"file://{tmp_path / 'blobs'}")
    host = create_server("127.0.0.1:0", settings, ("registry",))
    host.start()
    client = RegistryClient(f"127.0.0.1:{host.port}", timeout=20)
    outcomes: dict[str, str] = {}
    try:
        client.import_pool(_pool_version(random_pool, "1", tmp_path))
        # Between imports: every pooled connection of the registry is dead; the next import works.
        assert _terminate_backends(admin) >= 1
        pv, created = client.import_pool(_pool_version(random_pool, "2", tmp_path))
        assert created and len(pv.experts) == 5

        # During imports: the registry's backends are terminated every 100 ms.
        stop = threading.Event()
        terminated = []

        def chaos() -> None:
            while not stop.wait(0.1):
                terminated.append(_terminate_backends(admin))

        killer = threading.Thread(target=chaos, daemon=True)
        killer.start()
        try:
            for version in ("3", "4", "5"):
                try:
                    client.import_pool(_pool_version(random_pool, version, tmp_path))
                    outcomes[version] = "ok"
                except Unavailable:
                    outcomes[version] = "unavailable"
        finally:
            stop.set()
            killer.join(5)
        assert sum(terminated) >= 1
        # Before anything uploads the same bytes again, and once the health probes have finished the
        # undos that failed with a terminated connection: a failed import left no blob without its row.
        assert poll(lambda: host.runtimes["registry"].registry.pending_undos == 0)
        assert_fsck_clean(settings)

        for version in ("1", "2", "3", "4", "5"):  # a version is there whole, or not at all
            try:
                assert len(client.get_pool(f"test-pool@{version}").experts) == 5
            except NotFound:
                assert outcomes[version] == "unavailable"
        health = health_pb2_grpc.HealthStub(client.channel)
        assert poll(lambda: health.Check(health_pb2.HealthCheckRequest(service="poe.v1.Registry")).status
                    == health_pb2.HealthCheckResponse.SERVING)
        for version in ("3", "4", "5"):  # the same registry, no restart
            client.import_pool(_pool_version(random_pool, version, tmp_path))
        assert sorted(p.version for p in client.list_pools(name="test-pool")) == ["1", "2", "3", "4", "5"]
    finally:
        client.close()
        host.stop(None).wait(30)
        admin.close()

    # Imports that failed under the chaos left no bytes behind, and no row without its bytes.
    assert_fsck_clean(settings)


class _DatabaseGoesWithTheCommit(FileBlobStore):
    """A file blob store that runs `fault` (once) the moment an upload's bytes are committed, between
    them and the registry's database COMMIT: the one window a failed upload can leave bytes behind."""

    def __init__(self, root: Path, fault):
        super().__init__(root)
        self.fault = fault

    def stage(self, chunks):
        staged = super().stage(chunks)
        commit = staged._commit

        def commit_then_fault() -> None:
            commit()
            fault, self.fault = self.fault, None
            if fault is not None:
                fault()

        staged._commit = commit_then_fault
        return staged


@pytest.mark.postgres
def test_bytes_of_a_commit_lost_with_the_database_are_undone_when_it_is_back(pg_url, tmp_path, make_settings, poll,
                                                                              assert_fsck_clean):
    """The database goes away between an upload's bytes and its COMMIT, so the undo of the bytes
    fails too: the registry keeps the undo and finishes it once the database answers again, with
    no restart and no gc."""
    import psycopg
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from sqlalchemy.engine import make_url

    database = make_url(pg_url).database
    # From another database: a session cannot disallow connections to its own.
    admin = psycopg.connect(make_url(pg_url).set(drivername="postgresql", database="postgres")
                            .render_as_string(hide_password=False), autocommit=True)

    def database_goes() -> None:
        admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                      "WHERE datname = %s AND pid <> pg_backend_pid()", (database,))

    settings = make_settings(tmp_path, pg_url, f"file://{tmp_path / 'blobs'}")
    host = create_server("127.0.0.1:0", settings, ("registry",))
    registry = host.runtimes["registry"].registry
    registry.blobs = _DatabaseGoesWithTheCommit(tmp_path / "blobs", database_goes)
    host.start()
    client = RegistryClient(f"127.0.0.1:{host.port}", timeout=20, retries=0)
    health = health_pb2_grpc.HealthStub(client.channel)
    try:
        client.register_hierarchy(hierarchy_mod.builtin(FM))
        data = os.urandom(5000)
        with pytest.raises(Unavailable):
            client.register_library("lost", FM, {"depth": 10, "width": 1}, data)
        sha = hashlib.sha256(data).hexdigest()
        assert registry.blobs.exists(sha) and registry.pending_undos == 1  # no row, and nothing can ask yet

        admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        assert poll(lambda: registry.pending_undos == 0)  # the next health probe finished the undo
        assert not registry.blobs.exists(sha)
        assert poll(lambda: health.Check(health_pb2.HealthCheckRequest(service="poe.v1.Registry")).status
                    == health_pb2.HealthCheckResponse.SERVING)
        oracle, created = client.register_library("lost", FM, {"depth": 10, "width": 1}, data)
        assert created and client.download(oracle.blob.sha256) == data
    finally:
        admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        admin.close()
        client.close()
        host.stop(None).wait(30)
    assert assert_fsck_clean(settings).blobs_checked == 1
