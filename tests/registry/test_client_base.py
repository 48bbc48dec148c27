"""What the three clients share (poe.client.base.GrpcClient): retries as gRPC's service config,
deadlines, existing channels and default targets, and the ComposeModel header they return.

The servers here are real gRPC servers whose handlers fail with UNAVAILABLE on purpose: the only
way to make a service unavailable on cue for exactly n attempts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import Counter
from concurrent import futures

import grpc
import pytest

from poe.client import Composer, ExtractorClient, RegistryClient
from poe.client.base import GrpcClient
from poe.contract import ComposeHeader
from poe.engine.errors import InvalidArgument, Unavailable
from poe.v1 import composer_pb2 as cpb
from poe.v1 import composer_pb2_grpc, registry_pb2_grpc
from poe.v1 import registry_pb2 as r

MODEL = b"model bytes"
HEADER = ComposeHeader(model_id="0123456789abcdef", pool="p@1", classes=("Sandal", "Bag"), class_ids=(5, 8),
                       tasks=("footwear", "bags"), expert_ids=(3, 4), params=1234, flops=5678, size=len(MODEL),
                       sha256=hashlib.sha256(MODEL).hexdigest(), format="safetensors", execution="reference",
                       input_shape=(1, 28, 28), expected_accuracy=0.93, cache_hit=True,
                       metadata={"classes": ["Sandal", "Bag"], "pool": "p@1"})


class Flaky:
    """Fails the first `failures` calls of every method with UNAVAILABLE; counts every attempt."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: Counter[str] = Counter()

    def attempt(self, method: str, context) -> None:
        self.calls[method] += 1
        if self.calls[method] <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")


class FlakyRegistry(Flaky, registry_pb2_grpc.RegistryServicer):
    def GetPool(self, request, context):
        self.attempt("GetPool", context)
        return r.GetPoolResponse(pool=r.PoolVersion(name=request.pool, version="1"))

    def DeletePoolAlias(self, request, context):
        self.attempt("DeletePoolAlias", context)
        return r.DeletePoolAliasResponse()


class FlakyComposer(Flaky, composer_pb2_grpc.ComposerServicer):
    def ComposeModel(self, request, context):
        self.attempt("ComposeModel", context)
        yield cpb.ComposeModelResponse(header=HEADER.to_message())
        yield cpb.ComposeModelResponse(chunk=MODEL)

    def DescribeComposition(self, request, context):
        self.attempt("DescribeComposition", context)
        time.sleep(float(request.pool or 0))  # the pool field says how long to take
        return cpb.DescribeCompositionResponse(header=dataclasses.replace(HEADER, size=0, sha256="").to_message())


@pytest.fixture
def serve():
    """serve(failures) -> (target, FlakyRegistry, FlakyComposer) on one server on port 0."""
    servers = []

    def start(failures: int):
        server = grpc.server(futures.ThreadPoolExecutor(4))
        registry, composer = FlakyRegistry(failures), FlakyComposer(failures)
        registry_pb2_grpc.add_RegistryServicer_to_server(registry, server)
        composer_pb2_grpc.add_ComposerServicer_to_server(composer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}", registry, composer

    yield start
    for server in servers:
        server.stop(None)


def test_reads_and_compose_model_are_retried_while_unavailable(serve):
    target, registry, composer = serve(failures=2)
    with RegistryClient(target) as reg, Composer(target) as c:
        assert reg.get_pool("p").name == "p"
        result = c.compose(["Sandal", "Bag"])
    assert registry.calls["GetPool"] == 3 and composer.calls["ComposeModel"] == 3
    assert result.header == HEADER and result.data == MODEL


def test_writes_are_not_retried(serve):
    target, registry, _ = serve(failures=1)
    with RegistryClient(target) as reg, pytest.raises(Unavailable, match="restarting"):
        reg.delete_alias("p", "stable")
    assert registry.calls["DeletePoolAlias"] == 1


def test_retries_stop_after_the_configured_attempts(serve):
    target, registry, composer = serve(failures=100)
    with RegistryClient(target, retries=2) as reg, pytest.raises(Unavailable, match=f"registry at {target}"):
        reg.get_pool("p")
    assert registry.calls["GetPool"] == 3
    with Composer(target, retries=0) as c, pytest.raises(Unavailable):
        c.compose(["Bag"])
    assert composer.calls["ComposeModel"] == 1


def test_a_deadline_is_per_client_and_per_call_and_is_not_retried(serve):
    target, _, composer = serve(failures=0)
    with Composer(target) as c:
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match="deadline exceeded"):
            c.describe(["Bag"], pool="2", timeout=0.3)
        assert time.monotonic() - t0 < 1.5
        assert c.describe(["Bag"], pool="0.4").size == 0  # the client's default (30 s) leaves time
    with Composer(target, timeout=0.3) as c, pytest.raises(Unavailable, match="deadline exceeded"):
        c.describe(["Bag"], pool="2")
    assert composer.calls["DescribeComposition"] == 3


def test_an_existing_channel_is_used_and_left_open(serve):
    target, _, composer = serve(failures=0)
    with grpc.insecure_channel(target) as channel:
        with Composer(channel=channel) as c:
            assert c.compose(["Bag"]).data == MODEL
        with Composer(channel=channel) as c:  # still open after the first client closed
            assert c.describe(["Bag"]).model_id == HEADER.model_id


def test_default_targets_come_from_the_settings(serve, monkeypatch):
    target, _, _ = serve(failures=0)
    monkeypatch.setenv("POE_REGISTRY_ADDR", target)
    monkeypatch.setenv("POE_COMPOSER_ADDR", target)
    monkeypatch.setenv("POE_EXTRACTOR_ADDR", "127.0.0.1:1")
    with RegistryClient() as reg, Composer() as c, ExtractorClient() as ex:
        assert reg.target == c.target == target and ex.target == "127.0.0.1:1"
        assert reg.get_pool("p").name == "p" and c.compose(["Bag"]).header == HEADER


def test_retryable_methods_must_exist_and_writes_are_not_among_them():
    with pytest.raises(TypeError, match="no method GetPools"):
        type("Typo", (RegistryClient,), {"RETRYABLE": ("GetPools",)})
    for client in (RegistryClient, Composer, ExtractorClient):
        retried = set(client.RETRYABLE)
        assert retried <= set(client.SERVICE.methods_by_name)
        assert not {m for m in retried if m.startswith(("Register", "Create", "Update", "Delete", "Put", "Set",
                                                         "Publish", "Start", "Cancel"))}
    config = Composer.service_config(retries=9)
    assert config["methodConfig"][0]["retryPolicy"]["maxAttempts"] == 5
    assert Composer.service_config(retries=0) == {} and GrpcClient.RETRYABLE == ()


def test_compose_header_round_trips_through_its_message():
    message = HEADER.to_message()
    assert message.format == cpb.MODEL_FORMAT_SAFETENSORS and message.execution == cpb.EXECUTION_REFERENCE
    assert ComposeHeader.from_message(message) == HEADER
    bare = ComposeHeader.from_message(cpb.ComposedModelHeader(model_id="m"))
    assert (bare.format, bare.execution, bare.metadata, bare.classes) == ("torchscript", "fused", {}, ())
    with pytest.raises(InvalidArgument) as info:
        ComposeHeader.from_message(cpb.ComposedModelHeader(format=42))
    assert info.value.field == "header.format"
    with pytest.raises(InvalidArgument) as info:
        dataclasses.replace(HEADER, execution="fast")
    assert info.value.field == "execution"
