"""ComposeModel's responses are serialized by hand (one copy of the model's bytes): they must be
exactly what protobuf would send, in chunks of at most CHUNK_BYTES, over a real server too."""

import hashlib
import os

import grpc
import pytest

from poe.client.composer import Composer
from poe.contract import ComposeHeader
from poe.v1 import composer_pb2 as pb
from poe.v1 import composer_pb2_grpc
from poe_services.composer import servicer
from poe_services.composer.engine import Composition


def _composition(size: int) -> Composition:
    data = os.urandom(size)
    header = ComposeHeader(model_id="m1", pool="p@1", classes=("a", "b"), class_ids=(0, 1), tasks=("t",),
                           expert_ids=(3,), params=10, flops=20, size=size, sha256=hashlib.sha256(data).hexdigest(),
                           metadata={"classes": ["a", "b"]})
    return Composition(header, data)


@pytest.mark.parametrize("size,chunk", [(1, 1 << 20), (127, 64), (128, 128), (300_000, 1 << 20),
                                        ((1 << 20) + 1, 1 << 20), (5 * 16_384 + 7, 16_384)])
def test_messages_are_protobufs_serialization(monkeypatch, size, chunk):
    monkeypatch.setattr(servicer, "CHUNK_BYTES", chunk)
    comp = _composition(size)
    messages = list(servicer.response_messages(comp))
    expected = [pb.ComposeModelResponse(header=comp.header.to_message())]
    expected += [pb.ComposeModelResponse(chunk=comp.data[i:i + chunk]) for i in range(0, size, chunk)]
    assert messages == [m.SerializeToString() for m in expected]
    parsed = [pb.ComposeModelResponse.FromString(m) for m in messages]
    assert ComposeHeader.from_message(parsed[0].header) == comp.header
    assert all(m.WhichOneof("payload") == "chunk" and len(m.chunk) <= chunk for m in parsed[1:])
    assert b"".join(m.chunk for m in parsed[1:]) == comp.data


def test_a_model_streams_in_many_chunks_over_grpc(stack, monkeypatch):
    _, target = stack
    with Composer(target, retries=0) as c:
        whole = c.compose(["Trouser", "Bag"])
    monkeypatch.setattr(servicer, "CHUNK_BYTES", 1000)
    with grpc.insecure_channel(target) as channel:
        stub = composer_pb2_grpc.ComposerStub(channel)
        messages = list(stub.ComposeModel(pb.ComposeModelRequest(classes=["Trouser", "Bag"])))
    assert messages[0].WhichOneof("payload") == "header" and messages[0].header.cache_hit
    chunks = [m.chunk for m in messages[1:]]
    assert len(chunks) == -(-whole.header.size // 1000) and all(len(x) <= 1000 for x in chunks)
    assert b"".join(chunks) == whole.data
    with Composer(target, retries=0) as c:  # the client's size and sha256 checks pass over many chunks
        again = c.compose(["Trouser", "Bag"])
    assert again.data == whole.data and again.header.cache_hit
