"""Blob stores: the filesystem store and the S3 store against moto's server (through the minio SDK)."""

from __future__ import annotations

import hashlib
import io
import os
import time

import pytest

from poe.engine.config import Settings
from poe.engine.errors import DataLoss, InvalidArgument, NotFound, Unavailable
from poe_services.registry.blobstore import S3_PART_SIZE, FileBlobStore, S3BlobStore, blob_path, open_blob_store


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def corrupt(store, key: str, data: bytes) -> None:
    """Overwrite a stored blob behind the store's back."""
    if isinstance(store, FileBlobStore):
        (store.root / blob_path(key)).write_bytes(data)
    else:
        store.client.put_object(store.bucket, store._key(key), io.BytesIO(data), len(data))


def staging_names(store) -> list[str]:
    if isinstance(store, FileBlobStore):
        return [p.name for p in (store.root / "staging").iterdir()]
    return [o.object_name for o in store.client.list_objects(store.bucket, prefix=f"{store.prefix}staging/",
                                                            recursive=True)]


def test_put_get_is_content_addressed(blob_store):
    data = os.urandom(3000)
    info = blob_store.put(data)
    assert info.sha256 == sha(data) and info.size == 3000
    assert blob_store.get(info.sha256) == data
    assert blob_store.exists(info.sha256)
    assert blob_store.put(data) == info  # idempotent
    empty = blob_store.put(b"")
    assert empty.sha256 == sha(b"") and blob_store.get(empty.sha256) == b""
    assert sorted(blob_store.list()) == sorted([info.sha256, empty.sha256])
    assert blob_store.delete(info.sha256) and not blob_store.delete(info.sha256)
    assert not blob_store.exists(info.sha256)
    with pytest.raises(NotFound):
        blob_store.get(info.sha256)
    with pytest.raises(InvalidArgument, match="sha256"):
        blob_store.get("../../etc/passwd")
    assert staging_names(blob_store) == []


def test_corrupted_blob_raises_data_loss_and_returns_nothing(blob_store):
    data = b"weights" * 1000
    key = blob_store.put(data).sha256
    corrupt(blob_store, key, b"weightz" * 1000)
    with pytest.raises(DataLoss, match="corrupted"):
        blob_store.get(key)
    with pytest.raises(DataLoss):
        blob_store.open(key)
    with pytest.raises(DataLoss):
        blob_store.get_range(key, 0, 10)  # verified ranges check the whole blob
    assert blob_store.get_range(key, 0, 7, verify=False) == b"weightz"  # the raw read is raw
    blob_store.put(data)  # re-putting identical content repairs it
    assert blob_store.get(key) == data


def test_ranged_reads(blob_store):
    data = bytes(range(256)) * 40
    key = blob_store.put(data).sha256
    assert blob_store.get_range(key, 100, 50) == data[100:150]
    assert blob_store.get_range(key, 10_000) == data[10_000:]
    assert blob_store.get_range(key, 100, 50, verify=False) == data[100:150]
    assert blob_store.get_range(key, 10_200, verify=False) == data[10_200:]
    assert blob_store.get_range(key, 5, 0, verify=False) == b""
    with pytest.raises(InvalidArgument):
        blob_store.get_range(key, -1, 5)


def test_interrupted_stage_leaves_nothing(blob_store):
    def chunks():
        yield b"a" * 1000
        yield b"b" * 1000
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        blob_store.stage(chunks())
    assert list(blob_store.list()) == [] and staging_names(blob_store) == []


def test_staged_blob_is_invisible_until_commit(blob_store):
    staged = blob_store.stage([b"x" * 10, b"y" * 10])
    assert staged.sha256 == sha(b"x" * 10 + b"y" * 10) and staged.size == 20
    assert not blob_store.exists(staged.sha256) and list(blob_store.list()) == []
    staged.commit()
    assert blob_store.get(staged.sha256) == b"x" * 10 + b"y" * 10 and not staged.existed
    staged.discard()  # no-op after commit
    assert blob_store.exists(staged.sha256)
    other = blob_store.stage([b"never committed"])
    other.discard()
    assert not blob_store.exists(other.sha256) and staging_names(blob_store) == []
    again = blob_store.stage([b"x" * 10, b"y" * 10])
    again.commit()
    assert again.existed


def test_s3_streamed_multipart_upload_and_abort(s3_store, moto_endpoint):
    import boto3

    big = os.urandom(S3_PART_SIZE + 123_457)  # two parts
    chunks = (big[i:i + (1 << 20)] for i in range(0, len(big), 1 << 20))
    info = s3_store.put_stream(chunks)
    assert info.sha256 == sha(big) and s3_store.get(info.sha256) == big
    edge = S3_PART_SIZE - 10
    assert s3_store.get_range(info.sha256, edge, 20, verify=False) == big[edge:edge + 20]

    def interrupted():
        for i in range(0, S3_PART_SIZE + (2 << 20), 1 << 20):  # past the first part, then fail
            yield big[i:i + (1 << 20)] if i < len(big) else b"z" * (1 << 20)
        raise ConnectionError("gone")

    with pytest.raises(ConnectionError):
        s3_store.stage(interrupted())
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id="x", aws_secret_access_key="x",
                      region_name="us-east-1")
    assert s3.list_multipart_uploads(Bucket=s3_store.bucket).get("Uploads", []) == []  # aborted
    assert list(s3_store.list()) == [info.sha256] and staging_names(s3_store) == []


def test_s3_bucket_created_when_missing(moto_endpoint, bucket):
    store = S3BlobStore(bucket, "", moto_endpoint, "k", "s")
    assert not store.client.bucket_exists(bucket)
    store.ping()
    assert store.client.bucket_exists(bucket)
    key = store.put(b"hello").sha256
    names = [o.object_name for o in store.client.list_objects(bucket, recursive=True)]
    assert names == [f"sha256/{key[:2]}/{key}"]


def test_s3_unreachable_is_unavailable_quickly():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = S3BlobStore("bucket", "", f"http://127.0.0.1:{port}", "k", "s")
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="unreachable"):
        store.ping()
    with pytest.raises(Unavailable):
        store.put(b"data")
    with pytest.raises(Unavailable):
        store.get("0" * 64)
    assert time.monotonic() - t0 < 10


def test_file_store_unavailable_when_directory_is_gone(tmp_path):
    store = FileBlobStore(tmp_path / "blobs")
    store.ping()
    (tmp_path / "blobs").rename(tmp_path / "moved")
    with pytest.raises(Unavailable, match="missing"):
        store.ping()
    with pytest.raises(Unavailable):
        store.put(b"data")


def test_open_blob_store_by_url(tmp_path, moto_endpoint):
    store = open_blob_store(f"file://{tmp_path}/b")
    assert isinstance(store, FileBlobStore) and store.root == (tmp_path / "b").resolve()
    cfg = Settings.from_env({"POE_S3_ENDPOINT": moto_endpoint, "POE_S3_ACCESS_KEY": "a", "POE_S3_SECRET_KEY": "b"})
    s3 = open_blob_store("s3://my-bucket/some/prefix", cfg)
    assert isinstance(s3, S3BlobStore) and (s3.bucket, s3.prefix) == ("my-bucket", "some/prefix/")
    key = s3.put(b"through the url").sha256
    assert s3.get(key) == b"through the url"
    for bad in ("ftp://x", "s3://", "file://"):
        with pytest.raises(InvalidArgument):
            open_blob_store(bad, cfg)
