"""The registry (and a composer behind it) while the S3 server misbehaves: moto's real S3 server
behind a TCP proxy, written here, that can pass, cut every connection, refuse new ones, swallow
them (a black hole) or throttle the link to N bytes/s."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from urllib.parse import urlparse

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from poe.client.registry import RegistryClient
from poe.engine import hierarchy as hierarchy_mod
from poe.engine.errors import Unavailable
from poe_services.host import create_server
from poe_services.registry.blobstore import S3_PART_SIZE, S3BlobStore, blob_path

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
KEYS = ("test-access", "test-secret")


class FaultProxy:
    """Forwards 127.0.0.1:<port> to `target` (threads; at most MAX_CONNECTIONS at once, two threads
    each). Faults: `cut()` drops every open connection, `refuse()` stops listening (new connections
    are refused), `blackhole()` accepts connections and never reads or answers, `throttle(rate)`
    forwards at most `rate` bytes/s each way (one link shared by all connections), `passing()`
    listens on the same port again and forwards at full speed."""

    MAX_CONNECTIONS = 32

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.port = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._blackhole = False
        self._rate = 0
        self._link_free = {"up": 0.0, "down": 0.0}  # when each direction of the link is idle again
        self.passing()

    # -- faults ---------------------------------------------------------------------------------

    def passing(self) -> None:
        self._blackhole, self._rate = False, 0
        self._listen()

    def throttle(self, rate: int) -> None:
        self._blackhole, self._rate = False, rate
        self._listen()

    def blackhole(self) -> None:
        self._blackhole = True
        self._listen()

    def refuse(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            _shut(listener)  # wakes the blocked accept()

    def cut(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, set()
        for s in conns:
            _shut(s)

    def outage(self) -> None:
        self.refuse()
        self.cut()

    def close(self) -> None:
        self.outage()
        for t in self._threads:
            t.join(timeout=5)

    # -- plumbing -------------------------------------------------------------------------------

    def _listen(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", self.port))  # the same port again after refuse()
            s.listen(16)
            self.port = s.getsockname()[1]
            self._listener = s
        self._spawn(self._accept, s)

    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                refused = listener is not self._listener or len(self._conns) >= 2 * self.MAX_CONNECTIONS
            if refused:
                client.close()
                continue
            if self._blackhole:  # hold it open, read nothing, answer nothing
                with self._lock:
                    self._conns.add(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, upstream}
            self._spawn(self._pump, client, upstream, "up")
            self._spawn(self._pump, upstream, client, "down")

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while True:
                rate = self._rate
                data = src.recv(min(65536, max(4096, rate // 50)) if rate else 65536)
                if not data:
                    break
                if rate:
                    self._pace(direction, len(data), rate)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                _shut(s)
            with self._lock:
                self._conns -= {src, dst}

    def _pace(self, direction: str, n: int, rate: int) -> None:
        with self._lock:
            now = time.monotonic()
            done = max(now, self._link_free[direction]) + n / rate
            self._link_free[direction] = done
        time.sleep(done - now)


def _shut(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture
def s3_proxy(moto_endpoint):
    target = urlparse(moto_endpoint)
    proxy = FaultProxy(target.hostname, target.port)
    yield proxy
    proxy.close()


@pytest.fixture
def s3_direct(moto_endpoint):
    """A client straight at moto, to look behind the registry's back."""
    import boto3

    return boto3.client("s3", endpoint_url=moto_endpoint, aws_access_key_id=KEYS[0], aws_secret_access_key=KEYS[1],
                        region_name="us-east-1")


def stored_keys(s3, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []))


def open_uploads(s3, bucket: str) -> list[str]:
    return sorted(u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


class Stack:
    """A started server (registry, optionally the composer) whose blob store is s3://BUCKET/blobs
    reached through the proxy; a registry client without retries, and health."""

    def __init__(self, settings, services=("registry",)):
        self.settings = settings
        self.host = create_server("127.0.0.1:0", settings, services, warm=False)
        self.host.start()
        self.target = f"127.0.0.1:{self.host.port}"
        self.registry = RegistryClient(self.target, timeout=60, retries=0)
        self.health = health_pb2_grpc.HealthStub(self.registry.channel)

    def status(self, service: str = "poe.v1.Registry"):
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def close(self) -> None:
        self.registry.close()
        self.host.stop(None).wait(30)


@pytest.fixture
def stack(tmp_path, sqlite_url, bucket, s3_proxy, make_settings, poll):
    """stack(services=("registry",), **POE_env) -> a SERVING Stack with the fashion-mnist hierarchy."""
    started: list[Stack] = []

    def start(services=("registry",), **env) -> Stack:
        settings = make_settings(tmp_path, sqlite_url, f"s3://{bucket}/blobs",
                                 POE_S3_ENDPOINT=f"http://127.0.0.1:{s3_proxy.port}", **env)
        started.append(Stack(settings, services))
        assert poll(lambda: started[-1].status() == SERVING)
        started[-1].registry.register_hierarchy(hierarchy_mod.builtin("fashion-mnist"))
        return started[-1]

    yield start
    for s in started:
        s.close()


def expect_unavailable(call, *args, within: float) -> Unavailable:
    """Run call(*args): it must fail with the status UNAVAILABLE within `within` seconds."""
    t0 = time.monotonic()
    with pytest.raises(Unavailable) as info:
        call(*args)
    assert info.value.grpc_code == grpc.StatusCode.UNAVAILABLE, info.value
    assert time.monotonic() - t0 < within, f"took {time.monotonic() - t0:.1f} s: {info.value}"
    return info.value


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the registry while S3 fails -----------------------------------------------------------------

def test_outage_before_an_upload(stack, s3_proxy, s3_direct, bucket, poll, assert_fsck_clean):
    reg = stack()
    s3_proxy.outage()
    data = os.urandom(3 << 20)
    err = expect_unavailable(reg.registry.register_library, "o", "fashion-mnist", {}, data, within=5)
    assert "blob store" in str(err)
    assert poll(lambda: reg.status() == NOT_SERVING)
    assert stored_keys(s3_direct, bucket) == [] and open_uploads(s3_direct, bucket) == []

    s3_proxy.passing()  # the same registry, not restarted
    assert poll(lambda: reg.status() == SERVING)
    oracle, created = reg.registry.register_library("o", "fashion-mnist", {}, data)
    assert created and reg.registry.download(oracle.blob.sha256) == data
    assert assert_fsck_clean(reg.settings).blobs_checked == 1


def test_outage_during_an_upload_leaves_nothing_and_the_upload_is_aborted_after(stack, s3_proxy, s3_direct,
                                                                                   bucket, poll, assert_fsck_clean):
    # Only this registry's own failed upload qualifies for the sweep: moto dates every upload 2010,
    # which is younger than this age.
    reg = stack(POE_S3_STALE_UPLOAD_AGE=str(1e10))
    s3_proxy.throttle(4_000_000)
    data = os.urandom(S3_PART_SIZE + (1 << 20))  # two parts
    failure: list[BaseException] = []

    def upload():
        try:
            reg.registry.register_library("o", "fashion-mnist", {}, data)
        except BaseException as e:
            failure.append(e)

    uploader = threading.Thread(target=upload)
    uploader.start()
    assert poll(lambda: open_uploads(s3_direct, bucket) != [], timeout=20)  # parts are on their way
    time.sleep(0.5)
    s3_proxy.outage()
    uploader.join(30)
    assert failure and isinstance(failure[0], Unavailable), failure
    assert failure[0].grpc_code == grpc.StatusCode.UNAVAILABLE
    assert not any(k.startswith("blobs/sha256/") for k in stored_keys(s3_direct, bucket))
    assert len(open_uploads(s3_direct, bucket)) == 1  # the SDK could not abort it: S3 was unreachable

    s3_proxy.passing()
    assert poll(lambda: reg.status() == SERVING)
    assert poll(lambda: open_uploads(s3_direct, bucket) == [], timeout=15)
    oracle, created = reg.registry.register_library("o", "fashion-mnist", {}, data)
    assert created and oracle.blob.sha256 == sha(data)
    assert assert_fsck_clean(reg.settings).blobs_checked == 1


def test_outage_after_an_upload_keeps_the_blob_complete(stack, s3_proxy, s3_direct, bucket, poll, assert_fsck_clean):
    reg = stack()
    data = os.urandom(S3_PART_SIZE + 4096)
    oracle, _ = reg.registry.register_library("o", "fashion-mnist", {}, data)
    s3_proxy.outage()
    expect_unavailable(reg.registry.download, oracle.blob.sha256, within=5)
    key = f"blobs/{blob_path(sha(data))}"
    assert stored_keys(s3_direct, bucket) == [key]  # committed, nothing left in staging/
    assert open_uploads(s3_direct, bucket) == []
    assert s3_direct.get_object(Bucket=bucket, Key=key)["Body"].read() == data

    s3_proxy.passing()
    assert poll(lambda: reg.status() == SERVING)
    assert reg.registry.download(oracle.blob.sha256) == data  # verified against its sha256 by both ends
    assert assert_fsck_clean(reg.settings).blobs_checked == 1


def test_slow_link_upload_of_more_than_a_part(stack, s3_proxy, assert_fsck_clean):
    reg = stack()
    s3_proxy.throttle(1_000_000)  # 1 MB/s: each 8 MiB part takes over 8 s to send
    data = os.urandom(S3_PART_SIZE + (512 << 10))
    t0 = time.monotonic()
    oracle, created = reg.registry.register_library("o", "fashion-mnist", {}, data)
    assert created and time.monotonic() - t0 > 8
    s3_proxy.passing()
    assert reg.registry.download(oracle.blob.sha256) == data
    assert assert_fsck_clean(reg.settings).blobs_checked == 1


def test_cold_compose_during_an_outage(stack, s3_proxy, pool_dir, poll, assert_fsck_clean):
    from poe.client import Composer

    s = stack(("registry", "composer"), POE_DEFAULT_POOL="test-pool", POE_RECORD_COMPOSITIONS="false")
    s.registry.import_pool(pool_dir)
    s3_proxy.outage()
    with Composer(s.target, retries=0) as composer:
        expect_unavailable(composer.compose, ["Sandal", "Sneaker"], within=15)
        s3_proxy.passing()
        assert poll(lambda: s.status() == SERVING)
        result = composer.compose(["Sandal", "Sneaker"])
    assert list(result.header.classes) == ["Sandal", "Sneaker"] and sha(result.data) == result.header.sha256
    # Nothing recorded (POE_RECORD_COMPOSITIONS=false): no upload in flight; the pool's 7 blobs are whole.
    assert assert_fsck_clean(s.settings).blobs_checked == 7


# -- the store itself ----------------------------------------------------------------------------

def test_dead_endpoints_fail_within_one_timeout(s3_proxy, bucket):
    store = S3BlobStore(bucket, "blobs", f"http://127.0.0.1:{s3_proxy.port}", *KEYS,
                        connect_timeout=1, read_timeout=1, write_timeout=1)
    try:
        store.ping()  # creates the bucket while the link is fine
        for fault in (s3_proxy.refuse, s3_proxy.blackhole):
            s3_proxy.cut()
            fault()
            for call, args in ((store.ping, ()), (store.put, (os.urandom(6 << 20),)), (store.get, ("0" * 64,))):
                t0 = time.monotonic()
                with pytest.raises(Unavailable, match="unreachable"):
                    call(*args)
                assert time.monotonic() - t0 < 3, (fault.__name__, call.__name__)
    finally:
        store.close()


def test_sweep_spares_uploads_in_flight_and_young_ones(s3_proxy, s3_direct, bucket, poll):
    store = S3BlobStore(bucket, "blobs", f"http://127.0.0.1:{s3_proxy.port}", *KEYS)
    try:
        store.ping()
        crashed = s3_direct.create_multipart_upload(Bucket=bucket, Key="blobs/staging/crashed")["UploadId"]
        s3_direct.create_multipart_upload(Bucket=bucket, Key="other-app/upload")
        # moto dates every upload 2010: "younger" than this age, older than an hour
        assert store.abort_incomplete_uploads(older_than=1e10) == []
        s3_proxy.throttle(4_000_000)
        data = os.urandom(S3_PART_SIZE + (1 << 20))
        done: list[str] = []
        uploader = threading.Thread(target=lambda: done.append(store.put(data).sha256))
        uploader.start()
        assert poll(lambda: len(open_uploads(s3_direct, bucket)) == 3, timeout=20)
        assert store.abort_incomplete_uploads(older_than=0) == ["staging/crashed"]  # not the one in flight
        uploader.join(30)
        assert done == [sha(data)] and store.get(done[0]) == data
        assert open_uploads(s3_direct, bucket) == ["other-app/upload"]  # outside the store's staging/
        with pytest.raises(Exception, match="NoSuchUpload"):
            s3_direct.abort_multipart_upload(Bucket=bucket, Key="blobs/staging/crashed", UploadId=crashed)
    finally:
        store.close()

