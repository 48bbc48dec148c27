"""Storage maintenance of a registry: garbage collection (`poe registry gc`) and a consistency check
(`poe registry fsck`), plus the sweep of crashed uploads' leftovers at registry start-up.

Both work directly on the metadata store and the blob store (no RPC) and are safe while registries
serve, because nothing is removed that a row refers to or that is younger than an age:

- An upload writes its bytes to staging/, makes them visible under their sha256 and only then
  commits the rows that refer to them (`core.Registry._upload`). Bytes without a row are therefore
  normal for an upload in flight; only those older than the age are orphans (a process killed
  between the two steps, or before it could finish the undo of a failed COMMIT).
- gc lists the stored bytes before it reads the rows, and just before deleting an orphan it looks
  again: a row committed since, or bytes rewritten by an upload of the same content since (a new
  modification time), keep the blob.
- fsck reads the rows before it lists the bytes, so a row committed meanwhile never looks like a
  row without bytes.

What gc removes: staging leftovers and incomplete S3 multipart uploads older than the age, orphan
blobs older than the age, and (given the extractor's run directory) the run directories of
extraction jobs that ended (succeeded, failed, cancelled) longer ago than `keep_runs`. By default
it only reports (`apply=False`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from poe.engine.errors import NotFound, PoeError
from poe.engine.names import JOB_ID
from poe_services.registry.blobstore import BlobStore, StoredObject
from poe_services.registry.store import RegistryStore

log = logging.getLogger(__name__)

DEFAULT_AGE = 3600.0  # leftovers younger than this may belong to an upload in flight
DEFAULT_KEEP_RUNS = 7 * 86400.0  # run directories of finished jobs: kept for post-mortems this long


@dataclass(frozen=True)
class Leftover:
    """One thing gc removes (or would): kind "staging", "upload" (incomplete S3 multipart upload),
    "orphan" (blob bytes no row refers to) or "run" (an extraction run directory)."""

    kind: str
    key: str
    size: int
    age: float  # seconds
    removed: bool = False
    error: str = ""


@dataclass
class GcReport:
    applied: bool
    older_than: float
    leftovers: list[Leftover] = field(default_factory=list)
    kept: int = 0  # younger than the age, or in use after all: left alone
    runs_dir: str | None = None
    unknown_runs: list[str] = field(default_factory=list)  # run directories of jobs this registry does not know

    @property
    def total_bytes(self) -> int:
        return sum(x.size for x in self.leftovers)

    @property
    def failed(self) -> list[Leftover]:
        return [x for x in self.leftovers if x.error]

    def to_dict(self) -> dict:
        return {"applied": self.applied, "older_than_s": self.older_than, "total_bytes": self.total_bytes,
                "kept": self.kept, "runs_dir": self.runs_dir, "unknown_runs": self.unknown_runs,
                "leftovers": [asdict(x) for x in self.leftovers]}


@dataclass
class FsckReport:
    blobs_checked: int = 0
    bytes_checked: int = 0
    corrupt: list[dict] = field(default_factory=list)  # stored bytes hash to something else (flipped, truncated)
    missing: list[dict] = field(default_factory=list)  # rows without bytes
    size_mismatch: list[dict] = field(default_factory=list)  # right hash, row records another size
    orphans: list[dict] = field(default_factory=list)  # bytes without rows, older than the age
    in_flight: list[dict] = field(default_factory=list)  # bytes without rows, younger: uploads committing

    @property
    def problems(self) -> int:
        return len(self.corrupt) + len(self.missing) + len(self.size_mismatch) + len(self.orphans)

    @property
    def clean(self) -> bool:
        return self.problems == 0

    def to_dict(self) -> dict:
        return {"clean": self.clean, "blobs_checked": self.blobs_checked, "bytes_checked": self.bytes_checked,
                "corrupt": self.corrupt, "missing": self.missing, "size_mismatch": self.size_mismatch,
                "orphans": self.orphans, "in_flight": self.in_flight}


# -- gc ------------------------------------------------------------------------------------------


def collect_garbage(store: RegistryStore, blobs: BlobStore, *, older_than: float = DEFAULT_AGE,
                    apply: bool = False, runs_dir: Path | None = None, keep_runs: float = DEFAULT_KEEP_RUNS,
                    now: float | None = None) -> GcReport:
    """Find (and with `apply`, remove) what crashes and finished jobs left behind; see the module
    docstring. `now` is the time ages are measured from (default: the clock)."""
    now = time.time() if now is None else now
    report = GcReport(apply, older_than, runs_dir=str(runs_dir) if runs_dir else None)

    def take(item: Leftover, remove: Callable[[], bool]) -> None:
        if not apply:
            report.leftovers.append(item)
            return
        try:
            if not remove():  # changed since it was listed: in use after all
                report.kept += 1
                return
            item = Leftover(item.kind, item.key, item.size, item.age, removed=True)
        except (PoeError, OSError) as e:
            item = Leftover(item.kind, item.key, item.size, item.age, error=str(e))
        report.leftovers.append(item)

    for obj in blobs.leftovers():
        age = now - obj.modified
        if age < older_than:
            report.kept += 1
            continue
        take(Leftover(obj.kind, obj.key, obj.size, age), _remover(blobs.remove_leftover, obj))

    # The bytes first, then the rows (module docstring).
    stored = list(blobs.scan())
    recorded = {b.sha256 for b in store.all_blobs()}
    for obj in stored:
        if obj.key in recorded:
            continue
        age = now - obj.modified
        if age < older_than:
            report.kept += 1
            continue
        take(Leftover("orphan", obj.key, obj.size, age), lambda obj=obj: _delete_orphan(store, blobs, obj))

    if runs_dir is not None:
        _stale_runs(store, runs_dir, older_than, keep_runs, now, report, take)
    return report


def _remover(remove: Callable[[StoredObject], None], obj: StoredObject) -> Callable[[], bool]:
    def run() -> bool:
        remove(obj)
        return True

    return run


def _delete_orphan(store: RegistryStore, blobs: BlobStore, listed: StoredObject) -> bool:
    """Delete the bytes unless a row refers to them now or they were rewritten since listed."""
    current = blobs.stat(listed.key)
    if current is None:
        return True  # gone already
    if current.modified != listed.modified or store.blob_referenced(listed.key):
        return False
    blobs.delete(listed.key)
    return True


def _stale_runs(store: RegistryStore, runs_dir: Path, older_than: float, keep_runs: float, now: float,
                report: GcReport, take: Callable[[Leftover, Callable[[], bool]], None]) -> None:
    """Run directories of jobs that ended `keep_runs` ago, and `.staging-*` directories of starts
    that died half-way (older than `older_than`). Directories of jobs the registry does not know
    are only reported: they may belong to another registry."""
    if not runs_dir.is_dir():
        return
    for path in sorted(runs_dir.iterdir()):
        if not path.is_dir():
            continue
        if path.name.startswith(".staging-"):
            age = now - _newest_mtime(path)
            if age < older_than:
                report.kept += 1
                continue
        elif JOB_ID.match(path.name):
            try:
                job = store.get_job(path.name)
            except NotFound:
                report.unknown_runs.append(str(path))
                continue
            if not job.state.terminal:
                continue
            age = now - job.updated_at.timestamp()
            if age < keep_runs:
                report.kept += 1
                continue
        else:
            continue
        take(Leftover("run", str(path), _tree_size(path), age), lambda path=path: _remove_run(path))


def _remove_run(path: Path) -> bool:
    """rmtree under the run directory's lock (an extractor holds it while it works on the job)."""
    lock = path / ".lock"
    try:
        fd = os.open(lock, os.O_RDWR) if lock.exists() else None
    except FileNotFoundError:
        fd = None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
        shutil.rmtree(path)
        return True
    finally:
        if fd is not None:
            os.close(fd)


def _walk_files(path: Path) -> Iterator[os.stat_result]:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                yield os.stat(os.path.join(root, name))


def _tree_size(path: Path) -> int:
    return sum(st.st_size for st in _walk_files(path))


def _newest_mtime(path: Path) -> float:
    return max((st.st_mtime for st in _walk_files(path)), default=path.stat().st_mtime)


# -- fsck ----------------------------------------------------------------------------------------


def check_blobs(store: RegistryStore, blobs: BlobStore, *, older_than: float = DEFAULT_AGE,
                now: float | None = None, progress: Callable[[int, int], None] | None = None) -> FsckReport:
    """Hash every stored blob (streaming), and match the stored bytes against the rows.

    `progress(done, total)` is called after each blob. Bytes without rows younger than
    `older_than` are uploads in flight, listed but not problems.
    """
    now = time.time() if now is None else now
    report = FsckReport()
    rows = {b.sha256: b for b in store.all_blobs()}  # the rows first (module docstring)
    stored = {o.key: o for o in blobs.scan()}
    for i, (sha256, obj) in enumerate(sorted(stored.items()), 1):
        try:
            got = blobs.digest(sha256)
        except NotFound:  # removed since listed (a gc): judged below by the rows alone
            del stored[sha256]
            continue
        report.blobs_checked += 1
        report.bytes_checked += got.size
        row = rows.get(sha256)
        if got.sha256 != sha256:
            report.corrupt.append({"sha256": sha256, "hashes_to": got.sha256, "stored_size": got.size,
                                   "recorded_size": row.size if row else None, "referenced": row is not None})
        elif row is not None and row.size != got.size:
            report.size_mismatch.append({"sha256": sha256, "stored_size": got.size, "recorded_size": row.size})
        if row is None:
            entry = {"sha256": sha256, "size": got.size, "age_s": round(now - obj.modified, 1)}
            (report.in_flight if now - obj.modified < older_than else report.orphans).append(entry)
        if progress is not None:
            progress(i, len(stored))
    for sha256, row in rows.items():
        if sha256 not in stored and not blobs.exists(sha256):
            report.missing.append({"sha256": sha256, "size": row.size, "media_type": row.media_type})
    return report


# -- start-up ------------------------------------------------------------------------------------


def sweep_leftovers(blobs: BlobStore, older_than: float = DEFAULT_AGE, now: float | None = None) -> list[Leftover]:
    """Remove files and objects in staging/ older than `older_than`: what uploads of crashed
    processes left. Run by the registry at start-up (incomplete S3 multipart uploads are the
    `blobstore.UploadSweeper`'s); never raises (logs instead)."""
    try:
        now = time.time() if now is None else now
        removed = []
        for obj in blobs.leftovers(uploads=False):
            age = now - obj.modified
            if age < older_than:
                continue
            try:
                blobs.remove_leftover(obj)
                removed.append(Leftover(obj.kind, obj.key, obj.size, age, removed=True))
            except (PoeError, OSError) as e:
                log.warning("registry: could not remove %s %s: %s", obj.kind, obj.key, e)
        if removed:
            log.info("registry: removed %d leftover(s) of crashed uploads from %s (%s)", len(removed), blobs.url,
                     human_bytes(sum(x.size for x in removed)))
        return removed
    except Exception as e:  # the store may be down at start-up; the next start (or gc) tries again
        log.warning("registry: sweeping staging leftovers of %s failed: %s", blobs.url, e)
        return []


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def human_age(seconds: float) -> str:
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.1f}{unit}"
    return f"{max(0.0, seconds):.0f}s"
