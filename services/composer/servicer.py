"""Thin gRPC servicer for poe.v1.Composer: convert messages, call the engine, convert back."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc

from poe.contract import execution_name, format_name, request_refs
from poe.engine.errors import Cancelled, PoeError
from poe.v1 import composer_pb2 as pb
from poe_services import metrics
from poe_services.composer.engine import ComposerEngine, ComposeRequest, Composition, StageTimer

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Composer"].full_name  # "poe.v1.Composer"
CHUNK_BYTES = 1 << 20
# ComposeModelResponse's `chunk` (field 2, length-delimited) on the wire: this tag, the length as a
# varint, the bytes. Written by hand so that a model's bytes are copied once, not three times.
_CHUNK_TAG = b"\x12"


def to_request(msg: pb.ComposeModelRequest | pb.DescribeCompositionRequest) -> ComposeRequest:
    """The request's fields, each checked against `poe.engine.limits` (InvalidArgument naming it)."""
    classes, tasks = request_refs(msg.classes, msg.tasks)
    return ComposeRequest(pool=msg.pool, classes=classes, tasks=tasks, execution=execution_name(msg.execution),
                          format=format_name(msg.format))


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def response_messages(comp: Composition) -> Iterator[bytes]:
    """ComposeModel's responses, serialized: the header, then the model in chunks of at most
    CHUNK_BYTES (one for every model of the shipped pools)."""
    yield pb.ComposeModelResponse(header=comp.header.to_message()).SerializeToString()
    data = memoryview(comp.data)
    for i in range(0, len(data), CHUNK_BYTES):
        chunk = data[i:i + CHUNK_BYTES]
        yield b"".join((_CHUNK_TAG, _varint(len(chunk)), chunk))


def _serialize(response: bytes | pb.ComposeModelResponse) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


class ComposerServicer:
    def __init__(self, engine: ComposerEngine):
        self.engine = engine

    def ComposeModel(self, request, context) -> Iterator[bytes]:
        t0 = time.perf_counter()
        metrics.COMPOSE_IN_FLIGHT.inc()
        code, comp, fmt = "OK", None, "unknown"
        timer = StageTimer()

        def check() -> None:
            if not context.is_active():
                raise Cancelled("cancelled by the client")

        try:
            req = to_request(request)
            fmt = req.format
            comp = self.engine.compose(req, timer, check)
            with timer.stage("stream"):
                yield from response_messages(comp)
                metrics.BYTES_STREAMED.inc(len(comp.data))
        except PoeError as e:
            code = e.code
            raise
        except GeneratorExit:
            code = "CANCELLED"
            raise
        except BaseException:
            code = "INTERNAL"
            raise
        finally:
            metrics.COMPOSE_IN_FLIGHT.dec()
            cache = "none" if comp is None else "hit" if comp.header.cache_hit else "miss"
            metrics.record_compose(code, cache, fmt, time.perf_counter() - t0)  # failures are timed too

    def DescribeComposition(self, request, context) -> pb.DescribeCompositionResponse:
        return pb.DescribeCompositionResponse(header=self.engine.describe(to_request(request)).header.to_message())


def add_to_server(engine: ComposerEngine, server: grpc.Server) -> None:
    """As the generated add_ComposerServicer_to_server, but ComposeModel's responses are bytes
    already serialized (`response_messages`)."""
    servicer = ComposerServicer(engine)
    handlers = {
        "ComposeModel": grpc.unary_stream_rpc_method_handler(
            servicer.ComposeModel, request_deserializer=pb.ComposeModelRequest.FromString,
            response_serializer=_serialize),
        "DescribeComposition": grpc.unary_unary_rpc_method_handler(
            servicer.DescribeComposition, request_deserializer=pb.DescribeCompositionRequest.FromString,
            response_serializer=pb.DescribeCompositionResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
