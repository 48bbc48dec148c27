"""The registry's core: metadata store + blob store, with the upload and download protocol.

Upload (`register`): the spec is checked first; the bytes are streamed into the blob
store's staging area while hashed; the declared sha256 (required) and size must match what
arrived; then the store records the rows and, inside that same transaction after the rows are
flushed, the staged bytes are committed under their hash. So:

- an interrupted or mismatching upload leaves no row and no blob (the staging copy is dropped);
- a rejected record (NotFound, AlreadyExists, ...) leaves no blob either;
- only if the final database COMMIT itself fails after the blob was committed is the blob deleted
  again, and only when this upload created it and no row references it. When that undo fails too
  (the database or the blob store went away with the COMMIT), it is kept and retried by
  `finish_undos()`, which the registry runtime calls on every health probe that finds both back:
  the bytes do not wait for a `poe registry gc` as an orphan.

Registering identical content again returns the existing record and rewrites the (verified) bytes,
which repairs a blob that was corrupted at rest.

Download: the blob must be registered (NotFound otherwise); the whole blob is read and verified
before the first byte is returned (DataLoss otherwise; a registered blob missing from the store is
DataLoss too).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

from poe.engine.architectures import check_oracle_upload
from poe.engine.errors import DataLoss, NotFound, Unavailable, field_error, within
from poe_services.registry import entities as e
from poe_services.registry import validation as v
from poe_services.registry.blobstore import CHUNK_SIZE, BlobStore, StoredObject
from poe_services.registry.store import RegistryStore

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BLOB_BYTES = 8 << 30  # refuse uploads beyond 8 GiB (a pool's weights are megabytes)


def media_type_for(fmt: str) -> str:
    return e.TORCHSCRIPT if fmt.startswith("torchscript") else "application/octet-stream"


class Registry:
    def __init__(self, store: RegistryStore, blobs: BlobStore):
        self.store = store
        self.blobs = blobs
        # Blobs whose undo failed: sha256 -> the stored object as it was then (None if unknown).
        self._undos: dict[str, StoredObject | None] = {}
        self._undos_lock = threading.Lock()

    # -- uploads ---------------------------------------------------------------------------------

    def register(self, spec: e.ArtifactSpec, sha256: str, size: int,
                 chunks: Iterable[bytes]) -> tuple[e.Artifact, bool]:
        """Record an oracle, library, expert or composed model (the kind of `spec`) with its uploaded bytes."""
        check, add = {
            e.OracleSpec: (v.check_oracle_spec, self.store.add_oracle),
            e.LibrarySpec: (v.check_library_spec, self.store.add_library),
            e.ExpertSpec: (v.check_expert_spec, self.store.add_expert),
            e.ComposedModelSpec: (v.check_composed_spec, self.store.add_composed_model),
        }[type(spec)]
        check(spec)  # before a byte of the upload is read
        if isinstance(spec, e.OracleSpec):  # weights of a known architecture, never a program
            chunks = check_oracle_upload(spec.config, chunks)
        media_type = media_type_for(spec.format) if isinstance(spec, e.ComposedModelSpec) else e.SAFETENSORS
        return self._upload(lambda blob, hook: add(spec, blob, hook), sha256, size, chunks, media_type)

    def _upload(self, add: Callable[[e.Blob, Callable[[], object]], tuple[T, bool]], sha256: str, size: int,
                chunks: Iterable[bytes], media_type: str) -> tuple[T, bool]:
        v.sha256(sha256, "sha256")
        v.non_negative(size, "size")
        staged = self.blobs.stage(_bounded(chunks, size))
        try:
            blob = _checked(staged, sha256, size, media_type)
            try:
                entity, created = add(blob, staged.commit)
            except BaseException:
                if staged.committed and not staged.existed:
                    self._undo_blob(blob.sha256)
                raise
            if not created and getattr(entity, "blob", None) is not None and entity.blob.sha256 == blob.sha256:
                staged.commit()  # identical bytes, verified on arrival: rewriting repairs a corrupted copy
            return entity, created
        finally:
            staged.discard()

    def register_composed_models(self, uploads: Sequence[tuple[e.ComposedModelSpec, str, int, bytes]],
                                 field: str = "models") -> list[tuple[e.ComposedModel, bool]]:
        """Record several composed models, each (spec, declared sha256, declared size, bytes), in
        one transaction: all or none. Errors name the entry (`models[2].sha256: ...`)."""
        for i, (spec, sha256, size, _) in enumerate(uploads):
            with within(f"{field}[{i}]"):
                v.check_composed_spec(spec)
                v.sha256(sha256, "sha256")
                v.non_negative(size, "size")
        staged: list = []
        try:
            blobs = []
            for i, (spec, sha256, size, data) in enumerate(uploads):
                staged.append(self.blobs.stage([data]))
                with within(f"{field}[{i}]"):
                    blobs.append(_checked(staged[-1], sha256, size, media_type_for(spec.format)))

            def commit_all() -> None:
                for s in staged:
                    s.commit()

            specs = [u[0] for u in uploads]
            try:
                results = self.store.add_composed_models(list(zip(specs, blobs, strict=True)), commit_all)
            except BaseException:
                for s, b in zip(staged, blobs, strict=True):
                    if s.committed and not s.existed:
                        self._undo_blob(b.sha256)
                raise
            for (entity, created), s, b in zip(results, staged, blobs, strict=True):
                if not created and entity.blob.sha256 == b.sha256:
                    s.commit()  # identical bytes, verified on arrival: rewriting repairs a corrupted copy
            return results
        finally:
            for s in staged:
                s.discard()

    def _undo_blob(self, sha256: str) -> None:
        try:
            if not self.store.blob_referenced(sha256):
                self.blobs.delete(sha256)
            return
        except Exception:
            log.warning("could not undo blob %s after a failed commit; retrying once the registry serves again",
                        sha256, exc_info=True)
        try:
            seen = self.blobs.stat(sha256)
        except Exception:  # the blob store is what failed
            seen = None
        with self._undos_lock:
            self._undos[sha256] = seen

    def finish_undos(self) -> int:
        """Retry the undos of blobs whose commit and undo both failed (see the module docstring);
        returns how many are still pending. Bytes rewritten since (an upload of the same content)
        or referenced by a row by now are kept, as `poe registry gc` would."""
        with self._undos_lock:
            pending = dict(self._undos)
        for sha256, seen in pending.items():
            try:
                current = self.blobs.stat(sha256)
                if current is not None and (seen is None or current.modified == seen.modified) \
                        and not self.store.blob_referenced(sha256):
                    self.blobs.delete(sha256)
            except Exception as err:  # still away: the next probe tries again
                log.debug("undo of blob %s still failing: %s", sha256, err)
                continue
            with self._undos_lock:
                del self._undos[sha256]
            log.info("registry: undid blob %s of a failed commit", sha256)
        with self._undos_lock:
            return len(self._undos)

    @property
    def pending_undos(self) -> int:
        with self._undos_lock:
            return len(self._undos)

    # -- downloads -------------------------------------------------------------------------------

    def download(self, sha256: str, offset: int = 0, length: int = 0) -> tuple[e.Blob, Iterator[tuple[int, bytes]]]:
        """The blob's record and an iterator of (offset, chunk <= 1 MiB); verified before returning."""
        v.sha256(sha256, "sha256")
        blob = self.store.get_blob(sha256)
        if offset < 0 or offset > blob.size:
            raise field_error("offset", f"must be in [0, {blob.size}], got {offset}")
        if length < 0:
            raise field_error("length", f"must be >= 0, got {length}")
        try:
            f = self.blobs.open(sha256)  # reads and verifies the whole blob
        except NotFound:
            raise DataLoss(f"blob {sha256[:12]}... is registered but missing from the blob store") from None
        end = blob.size if length == 0 else min(blob.size, offset + length)

        def chunks() -> Iterator[tuple[int, bytes]]:
            with f:
                f.seek(offset)
                pos = offset
                while pos < end:
                    data = f.read(min(CHUNK_SIZE, end - pos))
                    if not data:
                        raise DataLoss(f"blob {sha256[:12]}... ended early at byte {pos}")
                    yield pos, data
                    pos += len(data)

        return blob, chunks()

    # -- health ----------------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Why the registry cannot serve right now (empty when it can)."""
        out = []
        for what, ping in (("database", self.store.ping), ("blob store", self.blobs.ping)):
            try:
                ping()
            except Unavailable as err:
                out.append(str(err))
            except Exception as err:  # a probe must never kill the health loop
                out.append(f"{what}: {type(err).__name__}: {err}")
        return out

    def close(self) -> None:
        self.store.close()
        self.blobs.close()


def _checked(staged, sha256: str, size: int, media_type: str) -> e.Blob:
    """The blob of staged bytes, after checking them against the declared size and sha256."""
    if size and staged.size != size:
        raise field_error("size", f"declared {size} bytes, received {staged.size}")
    if staged.sha256 != sha256:
        raise field_error("sha256", f"declared {sha256[:12]}..., the bytes received hash to "
                                    f"{staged.sha256[:12]}... (corrupted or truncated upload)")
    return e.Blob(staged.sha256, staged.size, media_type)


def _bounded(chunks: Iterable[bytes], declared: int) -> Iterator[bytes]:
    """Pass chunks through, failing early once more bytes arrive than declared or allowed."""
    limit = declared if declared else MAX_BLOB_BYTES
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > limit:
            if declared:
                raise field_error("size", f"declared {declared} bytes, received more")
            raise field_error("size", f"blob larger than {MAX_BLOB_BYTES} bytes")
        yield chunk
