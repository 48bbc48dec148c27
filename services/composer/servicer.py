"""Thin gRPC servicer for poe.v1.Composer: convert messages, call the engine, convert back."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc

from poe.engine.errors import Cancelled, PoeError
from poe.v1 import composer_pb2 as pb
from poe.v1 import composer_pb2_grpc
from poe_services import metrics
from poe_services.composer.engine import ComposerEngine, ComposeRequest, Composition, StageTimer

SERVICE_NAME = "poe.v1.Composer"
CHUNK_BYTES = 1 << 20

_EXECUTIONS = {pb.EXECUTION_UNSPECIFIED: "fused", pb.EXECUTION_FUSED: "fused", pb.EXECUTION_REFERENCE: "reference"}
_FORMATS = {pb.MODEL_FORMAT_UNSPECIFIED: "torchscript", pb.MODEL_FORMAT_TORCHSCRIPT: "torchscript",
            pb.MODEL_FORMAT_SAFETENSORS: "safetensors"}
_EXECUTION_ENUM = {"fused": pb.EXECUTION_FUSED, "reference": pb.EXECUTION_REFERENCE}
_FORMAT_ENUM = {"torchscript": pb.MODEL_FORMAT_TORCHSCRIPT, "safetensors": pb.MODEL_FORMAT_SAFETENSORS}


def to_request(msg) -> ComposeRequest:
    from poe.engine.errors import field_error

    if msg.execution not in _EXECUTIONS:
        raise field_error("execution", f"unknown value {msg.execution}")
    if msg.format not in _FORMATS:
        raise field_error("format", f"unknown value {msg.format}")
    return ComposeRequest(pool=msg.pool, classes=tuple(c for c in msg.classes if c.strip()),
                          tasks=tuple(t for t in msg.tasks if t.strip()),
                          execution=_EXECUTIONS[msg.execution], format=_FORMATS[msg.format])


def to_header(h: dict) -> pb.ComposedModelHeader:
    return pb.ComposedModelHeader(
        model_id=h["model_id"], pool=h["pool"], classes=h["classes"], class_ids=h["class_ids"], tasks=h["tasks"],
        expert_ids=h["expert_ids"], params=h["params"], flops=h["flops"], size=h["size"], sha256=h["sha256"],
        format=_FORMAT_ENUM[h["format"]], execution=_EXECUTION_ENUM[h["execution"]], input_shape=h["input_shape"],
        expected_accuracy=h["expected_accuracy"], cache_hit=h["cache_hit"], metadata_json=h["metadata_json"])


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
            metrics.COMPOSE_REQUESTS.labels(code).inc()
            if code == "OK" and comp is not None:
                metrics.COMPOSE_DURATION.labels("hit" if comp.header["cache_hit"] else "miss", fmt).observe(
                    time.perf_counter() - t0)

    def _stream(self, comp: Composition, timer: StageTimer) -> Iterator[pb.ComposeModelResponse]:
        with timer.stage("stream"):
            yield pb.ComposeModelResponse(header=to_header(comp.header))
            data = memoryview(comp.data)
            for i in range(0, len(data), CHUNK_BYTES):
                chunk = bytes(data[i:i + CHUNK_BYTES])
                yield pb.ComposeModelResponse(chunk=chunk)
                metrics.BYTES_STREAMED.inc(len(chunk))

    def DescribeComposition(self, request, context) -> pb.DescribeCompositionResponse:
        return pb.DescribeCompositionResponse(header=to_header(self.engine.describe(to_request(request)).header))


def add_to_server(engine: ComposerEngine, server: grpc.Server) -> None:
    composer_pb2_grpc.add_ComposerServicer_to_server(ComposerServicer(engine), server)
