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

Connection failures map to `Unavailable`; a missing key is `NotFound`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING
from urllib.parse import urlparse

from poe.engine.errors import DataLoss, InvalidArgument, NotFound, Unavailable

if TYPE_CHECKING:
    from poe.engine.config import Settings

CHUNK_SIZE = 1 << 20  # 1 MiB: read size, and the largest gRPC chunk the services send
S3_PART_SIZE = 8 << 20  # multipart part size (S3 needs >= 5 MiB for all but the last part)
SPOOL_BYTES = 32 << 20  # verified reads stay in memory up to this size, then spill to a temp file
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
    def ping(self) -> None:
        """Raise Unavailable unless the store can be read and written right now."""

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

    def ping(self) -> None:
        if not (self.root / "sha256").is_dir() or not (self.root / "staging").is_dir():
            raise Unavailable(f"blob store {self.url}: directory missing")
        if not os.access(self.root / "staging", os.W_OK):
            raise Unavailable(f"blob store {self.url}: not writable")


# -- S3 / MinIO ----------------------------------------------------------------------------------


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
    uploads of S3_PART_SIZE parts; an upload that fails is aborted by the minio SDK.
    """

    def __init__(self, bucket: str, prefix: str, endpoint: str, access_key: str = "", secret_key: str = "",
                 secure: bool = False, region: str = "", connect_timeout: float = 3.0, read_timeout: float = 60.0):
        import urllib3
        from minio import Minio

        if not bucket:
            raise InvalidArgument("blob URL: s3://BUCKET[/PREFIX] needs a bucket name")
        if endpoint.startswith(("http://", "https://")):
            parsed = urlparse(endpoint)
            secure, endpoint = parsed.scheme == "https", parsed.netloc
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint = endpoint
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        # Short timeouts and few retries: a dead endpoint must surface as UNAVAILABLE in seconds,
        # not after the SDK's default five minutes.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout), maxsize=16,
            retries=urllib3.Retry(total=2, connect=1, backoff_factor=0.1, status_forcelist=[500, 502, 503, 504]))
        self.client = Minio(endpoint, access_key=access_key or None, secret_key=secret_key or None,
                            secure=secure, region=region or None, http_client=http)
        self._bucket_ready = False

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
            if e.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket"):
                raise Unavailable(f"blob store {self.url} at {self.endpoint}: {what}: {e.code} ({e.message})") from None
            raise
        except (urllib3.exceptions.HTTPError, ServerError, InvalidResponseError, OSError) as e:
            reason = str(e).splitlines()[0][:200]
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
        try:
            with self._errors("upload"):
                self.client.put_object(self.bucket, key, reader, length=-1, part_size=S3_PART_SIZE,
                                       num_parallel_uploads=1)
        except _SourceError as e:  # the multipart upload was aborted by the SDK; nothing is visible
            raise e.original from None
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
                           settings.s3_secret_key, settings.s3_secure, settings.s3_region)
    raise InvalidArgument(f"blob URL {url!r}: expected file://DIR or s3://BUCKET[/PREFIX] (POE_BLOB_URL)")
