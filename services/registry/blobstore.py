"""Content-addressed blob storage: one small interface, one implementation per URL scheme.

    store = open_blob_store("file:///var/lib/poe/blobs")     # FileBlobStore
    store = open_blob_store("s3://poe-blobs/prod", settings) # S3BlobStore (MinIO or any S3)
    info = store.put(data)          # -> BlobInfo(sha256, size); the sha256 is the key
    data = store.get(info.sha256)   # verified: a mismatch raises DataLoss, bad bytes never return

Keys are lower-case hex sha256 digests. Layout (same under a file root and an S3 prefix)::

    sha256/<first two hex digits>/<sha256>   committed blobs
    staging/<uuid>                           uploads in progress (never read as blobs)

Writes are two-phase so that a failed or interrupted upload leaves nothing visible: `stage()`
streams the bytes into `staging/` while hashing them, `StagedBlob.commit()` makes them visible under
their hash (an atomic rename on a filesystem, a server-side copy on S3), `discard()` drops them.
Committing always rewrites the object, so registering identical content again repairs a corrupted
copy. Every full read is hashed; `get_range(..., verify=False)` is the one raw read, for callers
that verify the assembled whole themselves (resumed downloads).

Connection failures map to `Unavailable`; a missing key is `NotFound`. On S3 the connect, read and
write timeouts are separate (`POE_S3_CONNECT_TIMEOUT`, `_READ_TIMEOUT`, `_WRITE_TIMEOUT`): a slow
link only has to keep making progress, while a dead endpoint or a black hole fails within one
timeout. Multipart uploads that an outage cut off cannot be aborted at that moment;
`abort_incomplete_uploads()` (run by an `UploadSweeper`) aborts them later.

For maintenance (`poe_services.registry.maintenance`: `poe registry gc`, `fsck`): `scan()` and
`stat()` give committed blobs with their size and last write, `leftovers()` what crashed uploads
left in `staging/` (on S3 also incomplete multipart uploads), `remove_leftover()` drops one, and
`digest()` hashes the stored bytes without judging them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING
from urllib.parse import urlparse

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import MaxRetryError, ProtocolError, ReadTimeoutError

from poe.engine.errors import DataLoss, InvalidArgument, NotFound, Unavailable

if TYPE_CHECKING:
    from poe.engine.config import Settings

CHUNK_SIZE = 1 << 20  # 1 MiB: read size, and the largest gRPC chunk the services send
S3_PART_SIZE = 8 << 20  # multipart part size (S3 needs >= 5 MiB for all but the last part)
SPOOL_BYTES = 32 << 20  # verified reads stay in memory up to this size, then spill to a temp file
S3_SEND_BLOCK = 64 << 10  # S3 requests go out in blocks of this size, each within the write timeout
log = logging.getLogger(__name__)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_key(sha256: str) -> str:
    if not isinstance(sha256, str) or not _SHA256.match(sha256):
        raise InvalidArgument(f"sha256: expected 64 lower-case hex digits, got {str(sha256)[:80]!r}")
    return sha256


def blob_path(sha256: str) -> str:
    """Relative key of a committed blob: sha256/ab/abcdef..."""
    return f"sha256/{sha256[:2]}/{sha256}"


@dataclass(frozen=True)
class BlobInfo:
    sha256: str
    size: int


@dataclass(frozen=True)
class StoredObject:
    """An object as maintenance sees it: a committed blob (kind "blob", key its sha256), a file or
    object in staging/ ("staging", key "staging/NAME") or an incomplete S3 multipart upload
    ("upload", key the object's path under the store, with its upload id)."""

    kind: str
    key: str
    size: int
    modified: float  # POSIX seconds of the last write (an upload: when it was started)
    upload_id: str = ""


class _Hasher:
    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.size = 0

    def update(self, data: bytes) -> None:
        self._h.update(data)
        self.size += len(data)

    @property
    def sha256(self) -> str:
        return self._h.hexdigest()


class _SourceError(Exception):
    """An exception raised by the caller's chunk iterator (an interrupted upload), carried through
    the store's own error mapping so that it reaches the caller unchanged."""

    def __init__(self, original: Exception):
        super().__init__(str(original))
        self.original = original


def _source(chunks: Iterable[bytes]) -> Iterator[bytes]:
    it = iter(chunks)
    while True:
        try:
            chunk = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise _SourceError(e) from e
        yield chunk


def _mismatch(sha256: str, got: str) -> DataLoss:
    return DataLoss(f"blob {sha256[:12]}...: stored bytes hash to {got[:12]}... (corrupted; not served)")


class StagedBlob(ABC):
    """Bytes that arrived completely and were hashed, not yet visible under their key."""

    def __init__(self, info: BlobInfo):
        self.info = info
        self.committed = False
        self.existed = False  # whether commit() replaced an object already under the key

    @property
    def sha256(self) -> str:
        return self.info.sha256

    @property
    def size(self) -> int:
        return self.info.size

    def commit(self) -> BlobInfo:
        """Make the bytes visible under their sha256 (idempotent; rewrites an existing copy)."""
        if not self.committed:
            self._commit()
            self.committed = True
        return self.info

    def discard(self) -> None:
        """Drop the staged bytes unless committed (safe to call more than once)."""
        if not self.committed:
            with contextlib.suppress(Exception):
                self._discard()

    @abstractmethod
    def _commit(self) -> None: ...

    @abstractmethod
    def _discard(self) -> None: ...

    def __enter__(self) -> StagedBlob:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


class BlobStore(ABC):
    """A content-addressed store of immutable blobs; see the module docstring."""

    url: str

    @abstractmethod
    def stage(self, chunks: Iterable[bytes]) -> StagedBlob:
        """Stream `chunks` into the staging area while hashing them; nothing becomes visible.

        If iterating `chunks` raises (an interrupted upload), the partial bytes are removed and
        the exception propagates.
        """

    def put_stream(self, chunks: Iterable[bytes]) -> BlobInfo:
        """Store a stream of bytes; returns its sha256 key and size."""
        with self.stage(chunks) as staged:
            return staged.commit()

    def put(self, data: bytes) -> BlobInfo:
        return self.put_stream(data[i:i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE))

    @abstractmethod
    def _read_chunks(self, sha256: str) -> Iterator[bytes]:
        """Raw bytes of a committed blob (NotFound when absent)."""

    def open(self, sha256: str) -> IO[bytes]:
        """A seekable file with the blob's bytes, verified against the key before it is returned."""
        check_key(sha256)
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        try:
            h = _Hasher()
            for chunk in self._read_chunks(sha256):
                h.update(chunk)
                spool.write(chunk)
            if h.sha256 != sha256:
                raise _mismatch(sha256, h.sha256)
            spool.seek(0)
            return spool
        except BaseException:
            spool.close()
            raise

    def get(self, sha256: str) -> bytes:
        """The blob's bytes, verified (DataLoss on mismatch)."""
        with self.open(sha256) as f:
            return f.read()

    def get_range(self, sha256: str, offset: int, length: int | None = None, *, verify: bool = True) -> bytes:
        """Bytes [offset, offset + length) of a blob (to the end when length is None).

        With verify (the default) the whole blob is read and hashed first, so a corrupted blob
        raises DataLoss even when the range itself looks fine. verify=False issues a real ranged
        read (S3 Range request, file seek) and is for callers that verify the assembled blob.
        """
        check_key(sha256)
        if offset < 0 or (length is not None and length < 0):
            raise InvalidArgument(f"range: offset and length must be >= 0 (got {offset}, {length})")
        if not verify:
            return self._read_range(sha256, offset, length)
        with self.open(sha256) as f:
            f.seek(offset)
            return f.read() if length is None else f.read(length)

    @abstractmethod
    def _read_range(self, sha256: str, offset: int, length: int | None) -> bytes: ...

    @abstractmethod
    def exists(self, sha256: str) -> bool: ...

    @abstractmethod
    def delete(self, sha256: str) -> bool:
        """Remove a blob; returns whether it existed."""

    @abstractmethod
    def list(self) -> Iterator[str]:
        """The keys (sha256) of all committed blobs."""

    @abstractmethod
    def scan(self) -> Iterator[StoredObject]:
        """All committed blobs with their size and last write."""

    @abstractmethod
    def stat(self, sha256: str) -> StoredObject | None:
        """A committed blob's size and last write; None when absent."""

    @abstractmethod
    def leftovers(self, uploads: bool = True) -> Iterator[StoredObject]:
        """What uploads left in staging/: in-flight ones and those of crashed processes alike
        (with `uploads`, S3's incomplete multipart uploads too)."""

    @abstractmethod
    def remove_leftover(self, obj: StoredObject) -> None:
        """Remove one of `leftovers()` (gone already is fine)."""

    def digest(self, sha256: str) -> BlobInfo:
        """sha256 and size of the bytes stored under the key, streamed and not judged (fsck compares)."""
        check_key(sha256)
        h = _Hasher()
        for chunk in self._read_chunks(sha256):
            h.update(chunk)
        return BlobInfo(h.sha256, h.size)

    @abstractmethod
    def ping(self) -> None:
        """Raise Unavailable unless the store can be read and written right now."""

    def abort_incomplete_uploads(self, older_than: float) -> list[str]:
        """Abort the incomplete multipart uploads under staging/ that this process abandoned and
        those of other processes started more than `older_than` seconds ago; returns their keys.
        Only S3 has such uploads (a file store's staging leftovers are `poe registry gc`'s)."""
        return []

    def abandoned_uploads(self) -> int:
        """How many of this process's failed uploads may still hold an incomplete multipart upload."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


# -- filesystem --------------------------------------------------------------------------------


class _FileStaged(StagedBlob):
    def __init__(self, store: FileBlobStore, info: BlobInfo, tmp: Path):
        super().__init__(info)
        self._store, self._tmp = store, tmp

    def _commit(self) -> None:
        final = self._store._path(self.sha256)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self.existed = final.exists()
            os.replace(self._tmp, final)  # atomic on one filesystem
        except OSError as e:
            raise Unavailable(f"blob store {self._store.url}: cannot write ({e})") from None

    def _discard(self) -> None:
        self._tmp.unlink(missing_ok=True)


class FileBlobStore(BlobStore):
    """Blobs as files under a root directory (the embedded default)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.url = f"file://{self.root}"
        try:
            (self.root / "staging").mkdir(parents=True, exist_ok=True)
            (self.root / "sha256").mkdir(exist_ok=True)
        except OSError as e:
            raise Unavailable(f"blob store {self.url}: cannot create it ({e})") from None

    def _path(self, sha256: str) -> Path:
        return self.root / blob_path(check_key(sha256))

    def stage(self, chunks: Iterable[bytes]) -> StagedBlob:
        tmp = self.root / "staging" / f"{uuid.uuid4().hex}.part"
        h = _Hasher()
        try:
            with open(tmp, "wb") as f:
                for chunk in _source(chunks):
                    h.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        except _SourceError as e:
            tmp.unlink(missing_ok=True)
            raise e.original from None
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise Unavailable(f"blob store {self.url}: cannot write ({e})") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return _FileStaged(self, BlobInfo(h.sha256, h.size), tmp)

    def _open_raw(self, sha256: str) -> IO[bytes]:
        try:
            return open(self._path(sha256), "rb")
        except FileNotFoundError:
            raise NotFound(f"blob {sha256[:12]}... not in {self.url}") from None
        except OSError as e:
            raise Unavailable(f"blob store {self.url}: cannot read ({e})") from None

    def _read_chunks(self, sha256: str) -> Iterator[bytes]:
        with self._open_raw(sha256) as f:
            while chunk := f.read(CHUNK_SIZE):
                yield chunk

    def _read_range(self, sha256: str, offset: int, length: int | None) -> bytes:
        with self._open_raw(sha256) as f:
            f.seek(offset)
            return f.read() if length is None else f.read(length)

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).is_file()

    def delete(self, sha256: str) -> bool:
        path = self._path(sha256)
        try:
            path.unlink()
            return True
        except FileNotFoundError:
            return False

    def list(self) -> Iterator[str]:
        for p in sorted((self.root / "sha256").glob("??/*")):
            if _SHA256.match(p.name):
                yield p.name

    def scan(self) -> Iterator[StoredObject]:
        for name in self.list():
            obj = self.stat(name)
            if obj is not None:  # None: deleted since it was listed
                yield obj

    def stat(self, sha256: str) -> StoredObject | None:
        try:
            st = self._path(sha256).stat()
        except FileNotFoundError:
            return None
        return StoredObject("blob", sha256, st.st_size, st.st_mtime)

    def leftovers(self, uploads: bool = True) -> Iterator[StoredObject]:
        for p in sorted((self.root / "staging").iterdir()):
            try:
                st = p.stat()
            except FileNotFoundError:  # committed or discarded meanwhile
                continue
            if p.is_file():
                yield StoredObject("staging", f"staging/{p.name}", st.st_size, st.st_mtime)

    def remove_leftover(self, obj: StoredObject) -> None:
        name = obj.key.removeprefix("staging/")
        if obj.kind != "staging" or not name or "/" in name or name.startswith("."):
            raise InvalidArgument(f"not a staging leftover of {self.url}: {obj.kind} {obj.key!r}")
        (self.root / "staging" / name).unlink(missing_ok=True)

    def ping(self) -> None:
        if not (self.root / "sha256").is_dir() or not (self.root / "staging").is_dir():
            raise Unavailable(f"blob store {self.url}: directory missing")
        if not os.access(self.root / "staging", os.W_OK):
            raise Unavailable(f"blob store {self.url}: not writable")


# -- S3 / MinIO ----------------------------------------------------------------------------------


class _WriteTimeout:
    """Sends a request in blocks, each within `write_timeout` seconds.

    urllib3 sends the whole request under the connect timeout (one sendall() per body), so an
    8 MiB part on a 1 MB/s link timed out after 3 s. Here the connect timeout bounds only the
    connect, and a send fails only when the link makes no progress for `write_timeout` seconds.
    """

    def __init__(self, *args, write_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.write_timeout = write_timeout

    def send(self, data) -> None:
        if self.sock is None:
            self.connect()  # as http.client would, under the connect timeout
        if not isinstance(data, (bytes, bytearray, memoryview)):
            return super().send(data)  # a file-like body (the minio SDK sends bytes)
        view = memoryview(data).cast("B")
        self.sock.settimeout(self.write_timeout)
        try:
            for start in range(0, len(view), S3_SEND_BLOCK):
                super().send(view[start:start + S3_SEND_BLOCK])
        finally:
            if self.sock is not None:
                self.sock.settimeout(self.timeout)


class _HTTPConnection(_WriteTimeout, HTTPConnection):
    pass


class _HTTPSConnection(_WriteTimeout, HTTPSConnection):
    pass


class _S3PoolManager(urllib3.PoolManager):
    """A PoolManager whose connections honour a write timeout (see _WriteTimeout)."""

    def __init__(self, *, write_timeout: float, **kwargs):
        super().__init__(**kwargs)
        self.write_timeout = write_timeout

    def _new_pool(self, scheme, host, port, request_context=None):
        pool = super()._new_pool(scheme, host, port, request_context)
        pool.ConnectionCls = _HTTPSConnection if scheme == "https" else _HTTPConnection
        pool.conn_kw["write_timeout"] = self.write_timeout
        return pool


class _S3Retry(urllib3.Retry):
    """Retries refused and dropped connections (a restarted server, a stale pooled connection), never
    a timeout after the request went out: a server that stayed silent for a whole read timeout, or
    stopped reading for a whole write timeout, is a black hole, and a retry only doubles the wait."""

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        stalled = isinstance(error, ReadTimeoutError) or (
            isinstance(error, ProtocolError) and any(isinstance(a, TimeoutError) for a in error.args))
        if stalled:
            raise MaxRetryError(_pool, url, error) from error
        return super().increment(method, url, response, error, _pool, _stacktrace)


class _ChunkReader(io.RawIOBase):
    """A read()-able view of an iterator of chunks that hashes what passes through."""

    def __init__(self, chunks: Iterable[bytes]):
        self._it = iter(chunks)
        self._buf = bytearray()
        self.hasher = _Hasher()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            chunk = next(self._it, None)
            if chunk is None:
                break
            self.hasher.update(chunk)
            self._buf += chunk
        if n < 0 or n >= len(self._buf):
            out = bytes(self._buf)
            self._buf.clear()
        else:
            out = bytes(self._buf[:n])
            del self._buf[:n]
        return out


class _S3Staged(StagedBlob):
    def __init__(self, store: S3BlobStore, info: BlobInfo, key: str):
        super().__init__(info)
        self._store, self._key = store, key

    def _commit(self) -> None:
        from minio.commonconfig import CopySource

        s = self._store
        final = s._key(self.sha256)
        with s._errors("commit"):
            self.existed = s.exists(self.sha256)
            s.client.copy_object(s.bucket, final, CopySource(s.bucket, self._key))
            s.client.remove_object(s.bucket, self._key)

    def _discard(self) -> None:
        self._store.client.remove_object(self._store.bucket, self._key)


class S3BlobStore(BlobStore):
    """Blobs as objects in an S3 bucket (MinIO in production, moto's server in tests).

    The bucket is created when missing (on first use, so that a service can start, report
    NOT_SERVING and recover while the object store is down). Uploads stream through multipart
    uploads of S3_PART_SIZE parts; an upload that fails is aborted by the minio SDK, or, when the
    store cannot be reached to abort it, by the next `abort_incomplete_uploads()`.

    Timeouts (seconds): `connect_timeout` for a TCP (and TLS) connect, `read_timeout` for each wait
    for the server's next bytes, `write_timeout` for each 64 KiB of a request to leave.
    """

    def __init__(self, bucket: str, prefix: str, endpoint: str, access_key: str = "", secret_key: str = "",
                 secure: bool = False, region: str = "", connect_timeout: float = 3.0, read_timeout: float = 10.0,
                 write_timeout: float = 10.0):
        from minio import Minio
        from minio.helpers import check_bucket_name

        if not bucket:
            raise InvalidArgument("blob URL: s3://BUCKET[/PREFIX] needs a bucket name")
        try:
            check_bucket_name(bucket)
        except ValueError as e:  # else it would surface at the first request, as an internal error
            raise InvalidArgument(f"blob URL s3://{bucket}: {e} (3-63 lower-case letters, digits, '.', '-')") from None
        for name, value in (("connect", connect_timeout), ("read", read_timeout), ("write", write_timeout)):
            if not value > 0:
                raise InvalidArgument(f"POE_S3_{name.upper()}_TIMEOUT: expected seconds > 0, got {value}")
        if endpoint.startswith(("http://", "https://")):
            parsed = urlparse(endpoint)
            secure, endpoint = parsed.scheme == "https", parsed.netloc
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint = endpoint
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        # Short timeouts and few retries: a dead endpoint must surface as UNAVAILABLE in seconds,
        # not after the SDK's default five minutes; a slow link only has to keep moving.
        http = _S3PoolManager(
            write_timeout=write_timeout, timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            maxsize=16,
            retries=_S3Retry(total=2, connect=1, backoff_factor=0.1, status_forcelist=[500, 502, 503, 504]))
        self.client = Minio(endpoint, access_key=access_key or None, secret_key=secret_key or None,
                            secure=secure, region=region or None, http_client=http)
        self._bucket_ready = False
        self._lock = threading.Lock()
        self._uploading: set[str] = set()  # staging keys of this process's uploads in flight
        self._abandoned: set[str] = set()  # ... and of those that failed: their multipart upload may be open

    def _key(self, sha256: str) -> str:
        return self.prefix + blob_path(check_key(sha256))

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        import urllib3.exceptions
        from minio.error import InvalidResponseError, S3Error, ServerError

        try:
            yield
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject"):
                raise NotFound(f"blob not in {self.url}") from None
            # NoSuchUpload: another replica's sweep aborted this upload (it took longer than
            # POE_S3_STALE_UPLOAD_AGE); the client may retry.
            if e.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket",
                          "NoSuchUpload"):
                raise Unavailable(f"blob store {self.url} at {self.endpoint}: {what}: {e.code} ({e.message})") from None
            raise
        except (urllib3.exceptions.HTTPError, ServerError, InvalidResponseError, OSError) as e:
            cause = e.reason if isinstance(e, MaxRetryError) and e.reason is not None else e  # the timeout or refusal
            reason = str(cause).splitlines()[0][:200]
            raise Unavailable(f"blob store {self.url} at {self.endpoint} unreachable ({what}: {reason})") from None

    def _ensure_bucket(self) -> None:
        from minio.error import S3Error

        if self._bucket_ready:
            return
        with self._errors("create bucket"):
            if not self.client.bucket_exists(self.bucket):
                try:
                    self.client.make_bucket(self.bucket)
                except S3Error as e:  # another process created it first
                    if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
        self._bucket_ready = True

    def stage(self, chunks: Iterable[bytes]) -> StagedBlob:
        self._ensure_bucket()
        key = f"{self.prefix}staging/{uuid.uuid4().hex}"
        reader = _ChunkReader(_source(chunks))
        with self._lock:
            self._uploading.add(key)
        try:
            with self._errors("upload"):
                self.client.put_object(self.bucket, key, reader, length=-1, part_size=S3_PART_SIZE,
                                       num_parallel_uploads=1)
        except BaseException as e:
            # The SDK aborts the multipart upload, unless the store is unreachable: then the next
            # abort_incomplete_uploads() does, whatever the upload's age.
            with self._lock:
                self._abandoned.add(key)
            if isinstance(e, _SourceError):  # nothing is visible
                raise e.original from None
            raise
        finally:
            with self._lock:
                self._uploading.discard(key)
        return _S3Staged(self, BlobInfo(reader.hasher.sha256, reader.hasher.size), key)

    def _get(self, sha256: str, offset: int = 0, length: int | None = None):
        with self._errors("read"):
            return self.client.get_object(self.bucket, self._key(sha256), offset=offset, length=length or 0)

    def _read_chunks(self, sha256: str) -> Iterator[bytes]:
        resp = self._get(sha256)
        try:
            with self._errors("read"):
                yield from resp.stream(CHUNK_SIZE)
        finally:
            resp.close()
            resp.release_conn()

    def _read_range(self, sha256: str, offset: int, length: int | None) -> bytes:
        if length == 0:
            return b""
        resp = self._get(sha256, offset, length)
        try:
            with self._errors("read"):
                return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    def exists(self, sha256: str) -> bool:
        try:
            with self._errors("stat"):
                self.client.stat_object(self.bucket, self._key(sha256))
            return True
        except NotFound:
            return False

    def delete(self, sha256: str) -> bool:
        existed = self.exists(sha256)
        with self._errors("delete"):
            self.client.remove_object(self.bucket, self._key(sha256))
        return existed

    def list(self) -> Iterator[str]:
        with self._errors("list"):
            for obj in self.client.list_objects(self.bucket, prefix=f"{self.prefix}sha256/", recursive=True):
                name = obj.object_name.rsplit("/", 1)[-1]
                if _SHA256.match(name):
                    yield name

    def scan(self) -> Iterator[StoredObject]:
        with self._errors("list"):
            for obj in self.client.list_objects(self.bucket, prefix=f"{self.prefix}sha256/", recursive=True):
                name = obj.object_name.rsplit("/", 1)[-1]
                if _SHA256.match(name):
                    yield StoredObject("blob", name, obj.size or 0, obj.last_modified.timestamp())

    def stat(self, sha256: str) -> StoredObject | None:
        try:
            with self._errors("stat"):
                st = self.client.stat_object(self.bucket, self._key(sha256))
        except NotFound:
            return None
        return StoredObject("blob", sha256, st.size or 0, st.last_modified.timestamp())

    def leftovers(self, uploads: bool = True) -> Iterator[StoredObject]:
        self._ensure_bucket()
        with self._errors("list staging"):
            for obj in self.client.list_objects(self.bucket, prefix=f"{self.prefix}staging/", recursive=True):
                yield StoredObject("staging", obj.object_name[len(self.prefix):], obj.size or 0,
                                   obj.last_modified.timestamp())
        # A process killed during a multipart upload leaves the upload open (its parts are stored
        # and billed, but no object exists); a commit of more than 5 GiB copies in parts too.
        for area in ("staging/", "sha256/") if uploads else ():
            for up in self._open_uploads(self.prefix + area):
                yield StoredObject("upload", up.object_name[len(self.prefix):],
                                   self._upload_size(up.object_name, up.upload_id),
                                   up.initiated_time.timestamp() if up.initiated_time else 0.0, up.upload_id)

    def _open_uploads(self, prefix: str) -> Iterator:
        key_marker = upload_id_marker = None
        while True:
            with self._errors("list uploads"):
                page = self.client._list_multipart_uploads(self.bucket, prefix=prefix, key_marker=key_marker,
                                                           upload_id_marker=upload_id_marker)
            yield from page.uploads
            if not page.is_truncated or not page.uploads:
                return
            # minio 7.2 never fills next_upload_id_marker: continue after the last upload listed
            key_marker = page.next_key_marker or page.uploads[-1].object_name
            upload_id_marker = page.uploads[-1].upload_id

    def _upload_size(self, object_name: str, upload_id: str) -> int:
        size, marker = 0, None
        while True:
            with self._errors("list parts"):
                page = self.client._list_parts(self.bucket, object_name, upload_id, part_number_marker=marker)
            size += sum(p.size or 0 for p in page.parts)
            if not page.is_truncated or not page.parts:
                return size
            marker = str(page.parts[-1].part_number)

    def remove_leftover(self, obj: StoredObject) -> None:
        from minio.error import S3Error

        if obj.kind == "staging" and obj.key.startswith("staging/"):
            with self._errors("delete"):
                self.client.remove_object(self.bucket, self.prefix + obj.key)
        elif obj.kind == "upload" and obj.upload_id:
            try:
                with self._errors("abort upload"):
                    self.client._abort_multipart_upload(self.bucket, self.prefix + obj.key, obj.upload_id)
            except S3Error as e:
                if e.code != "NoSuchUpload":  # completed or aborted meanwhile
                    raise
        else:
            raise InvalidArgument(f"not a staging leftover of {self.url}: {obj.kind} {obj.key!r}")

    def abandoned_uploads(self) -> int:
        with self._lock:
            return len(self._abandoned)

    def abort_incomplete_uploads(self, older_than: float) -> list[str]:
        # Own failed uploads go whatever their age (their process knows they are dead); those of other
        # processes only once older than `older_than` by the server's clock, since they may be in flight.
        self._ensure_bucket()
        with self._lock:
            abandoned = set(self._abandoned)
        cutoff = time.time() - older_than
        aborted = []
        for up in self._open_uploads(f"{self.prefix}staging/"):
            with self._lock:
                in_flight = up.object_name in self._uploading
            stale = up.initiated_time is not None and up.initiated_time.timestamp() < cutoff
            if up.object_name in abandoned or (stale and not in_flight):
                key = up.object_name[len(self.prefix):]
                started = up.initiated_time.timestamp() if up.initiated_time else 0.0
                self.remove_leftover(StoredObject("upload", key, 0, started, up.upload_id))
                aborted.append(key)
        with self._lock:
            self._abandoned -= abandoned  # all listed: those not seen had been aborted already
        return aborted

    def ping(self) -> None:
        self._bucket_ready = False  # re-check: the bucket may have been deleted
        self._ensure_bucket()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client._http.clear()


def open_blob_store(url: str, settings: Settings | None = None) -> BlobStore:
    """The store for a `file://DIR` or `s3://BUCKET[/PREFIX]` URL (S3 endpoint and keys from settings)."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        path = (parsed.netloc + parsed.path) if parsed.netloc not in ("", "localhost") else parsed.path
        if not path:
            raise InvalidArgument(f"blob URL {url!r}: file:// needs a directory")
        return FileBlobStore(path)
    if parsed.scheme == "s3":
        if settings is None:
            from poe.engine.config import settings as current

            settings = current()
        return S3BlobStore(parsed.netloc, parsed.path, settings.s3_endpoint, settings.s3_access_key,
                           settings.s3_secret_key.reveal(), settings.s3_secure, settings.s3_region,
                           connect_timeout=settings.s3_connect_timeout, read_timeout=settings.s3_read_timeout,
                           write_timeout=settings.s3_write_timeout)
    raise InvalidArgument(f"blob URL {url!r}: expected file://DIR or s3://BUCKET[/PREFIX] (POE_BLOB_URL)")


class UploadSweeper:
    """Runs `store.abort_incomplete_uploads(older_than)` in a thread: every `interval` seconds (never
    when 0), whenever `wake()` asks (the registry does each time it turns SERVING: at start-up and
    when the store is back after an outage), and every RETRY_SECONDS while this process has failed
    uploads to abort or the last sweep could not reach the store."""

    RETRY_SECONDS = 10.0

    def __init__(self, store: BlobStore, interval: float, older_than: float):
        self.store, self.interval, self.older_than = store, interval, older_than
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def start(self) -> None:
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._run, name="blob-upload-sweep", daemon=True)
            self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def sweep(self) -> list[str]:
        aborted = self.store.abort_incomplete_uploads(self.older_than)
        if aborted:
            log.warning("blob store %s: aborted %d incomplete multipart upload(s): %s", self.store.url,
                        len(aborted), ", ".join(aborted[:20]) + (" ..." if len(aborted) > 20 else ""))
        return aborted

    def _next_wait(self) -> float | None:
        waits = [self.interval] if self.interval > 0 else []
        if self._failing or self.store.abandoned_uploads():
            waits.append(self.RETRY_SECONDS)
        return min(waits, default=None)

    def _run(self) -> None:
        while True:
            self._wake.wait(self._next_wait())
            if self._stop.is_set():
                return
            self._wake.clear()
            try:
                self.sweep()
                self._failing = False
            except Exception as err:
                if not self._failing:  # once per outage, not every retry
                    log.warning("blob store %s: incomplete uploads not swept (retrying every %.0f s): %s",
                                self.store.url, self.RETRY_SECONDS, err, exc_info=not isinstance(err, Unavailable))
                self._failing = True
