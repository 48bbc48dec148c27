"""Thin gRPC servicer for poe.v1.Composer: convert messages, call the engine, convert back."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc

from poe.contract import execution_name, format_name, request_refs
from poe.engine.errors import Cancelled, PoeError
from poe.v1 import composer_pb2 as pb
from poe.v1 import composer_pb2_grpc
from poe_services import metrics
from poe_services.composer.engine import ComposerEngine, ComposeRequest, Composition, StageTimer

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Composer"].full_name  # "poe.v1.Composer"
CHUNK_BYTES = 1 << 20


def to_request(msg: pb.ComposeModelRequest | pb.DescribeCompositionRequest) -> ComposeRequest:
    """The request's fields, each checked against `poe.engine.limits` (InvalidArgument naming it)."""
    classes, tasks = request_refs(msg.classes, msg.tasks)
    return ComposeRequest(pool=msg.pool, classes=classes, tasks=tasks, execution=execution_name(msg.execution),
                          format=format_name(msg.format))


class ComposerServicer(composer_pb2_grpc.ComposerServicer):
    def __init__(self, engine: ComposerEngine):
        self.engine = engine

    def ComposeModel(self, request, context) -> Iterator[pb.ComposeModelResponse]:
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
            yield from self._stream(comp, timer)
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

    def _stream(self, comp: Composition, timer: StageTimer) -> Iterator[pb.ComposeModelResponse]:
        with timer.stage("stream"):
            yield pb.ComposeModelResponse(header=comp.header.to_message())
            data = memoryview(comp.data)
            for i in range(0, len(data), CHUNK_BYTES):
                chunk = bytes(data[i:i + CHUNK_BYTES])
                yield pb.ComposeModelResponse(chunk=chunk)
                metrics.BYTES_STREAMED.inc(len(chunk))

    def DescribeComposition(self, request, context) -> pb.DescribeCompositionResponse:
        return pb.DescribeCompositionResponse(header=self.engine.describe(to_request(request)).header.to_message())


def add_to_server(engine: ComposerEngine, server: grpc.Server) -> None:
    composer_pb2_grpc.add_ComposerServicer_to_server(ComposerServicer(engine), server)
