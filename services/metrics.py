"""Every Prometheus metric the services export, defined in one place.

Names carry the `poe_` prefix and base units; labels have low cardinality (never a class list or a
model id). The dashboard (deploy/grafana) and the alert rules (deploy/prometheus) use exactly these
names; a test scrapes a live composer and checks every PromQL expression against them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# 1 ms .. 10 s, roughly x2 per bucket.
LATENCY_BUCKETS = (0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

COMPOSE_DURATION = Histogram(
    "poe_compose_duration_seconds",
    "ComposeModel latency from request to last byte streamed.",
    ["cache", "format"],  # cache: hit | miss
    buckets=LATENCY_BUCKETS,
)
COMPOSE_STAGE_DURATION = Histogram(
    "poe_compose_stage_duration_seconds",
    "Time spent in each stage of ComposeModel.",
    ["stage"],  # resolve | fetch | consolidate | serialize | stream
    buckets=LATENCY_BUCKETS,
)
COMPOSE_REQUESTS = Counter(
    "poe_compose_requests_total",
    "ComposeModel requests by final gRPC status code.",
    ["code"],
)
COMPOSE_IN_FLIGHT = Gauge(
    "poe_compose_in_flight_requests",
    "ComposeModel requests being served right now.",
)
CACHE_HITS = Counter(
    "poe_compose_cache_hits_total",
    "Composer cache hits.",
    ["cache"],  # model | tensor
)
CACHE_MISSES = Counter(
    "poe_compose_cache_misses_total",
    "Composer cache misses.",
    ["cache"],  # model | tensor
)
CACHE_BYTES = Gauge(
    "poe_compose_cache_bytes",
    "Bytes held by the composer's in-memory caches.",
    ["cache"],  # model | tensor | template
)
COMPOSE_DEGRADED_POOLS = Gauge(
    "poe_compose_degraded_pools",
    "Pool versions with a library or expert blob that failed its last fetch (corrupt or missing).",
)
COMPOSE_BLOB_ERRORS = Counter(
    "poe_compose_blob_errors_total",
    "Blob fetches from the registry that failed for good: the blob is corrupt or missing.",
    ["kind"],  # data_loss | not_found
)
for _kind in ("data_loss", "not_found"):  # exported at 0, so that increase() sees the first error
    COMPOSE_BLOB_ERRORS.labels(_kind)
COMPOSE_RECORDINGS_QUEUED = Gauge(
    "poe_compose_recordings_queued",
    "Composed files waiting to be recorded in the registry (or being sent now).",
)
COMPOSE_RECORDINGS = Counter(
    "poe_compose_recordings_total",
    "Composed files handed to the registry recorder, by outcome.",
    ["outcome"],  # recorded | failed (the registry refused or was unreachable) | dropped (queue full, stopping)
)
for _outcome in ("recorded", "failed", "dropped"):  # exported at 0, so that increase() sees the first one
    COMPOSE_RECORDINGS.labels(_outcome)
BYTES_STREAMED = Counter(
    "poe_compose_streamed_bytes_total",
    "Model bytes streamed to ComposeModel clients.",
)
GRPC_HANDLED = Counter(
    "poe_grpc_server_handled_total",
    "RPCs completed by the server, by service, method and gRPC status code.",
    ["service", "method", "code"],
)
GRPC_DURATION = Histogram(
    "poe_grpc_server_handling_seconds",
    "RPC latency as seen by the server, until the last response message is sent.",
    ["service", "method"],
    buckets=LATENCY_BUCKETS,
)
EXTRACTION_JOBS = Gauge(
    "poe_extraction_jobs",
    "Extraction jobs known to this extractor, by state.",
    ["state"],  # queued | running | succeeded | failed | cancelled
)
EXTRACTION_PROGRESS = Gauge(
    "poe_extraction_progress_ratio",
    "Progress of the running extraction jobs, mean over jobs, in [0, 1].",
)


def serve_metrics(port: int, addr: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY) -> int:
    """Start the /metrics HTTP endpoint in a daemon thread; returns the bound port (port 0 picks one)."""
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server.server_address[1]


ALL_METRIC_NAMES = (
    "poe_compose_duration_seconds", "poe_compose_stage_duration_seconds", "poe_compose_requests_total",
    "poe_compose_in_flight_requests", "poe_compose_cache_hits_total", "poe_compose_cache_misses_total",
    "poe_compose_cache_bytes", "poe_compose_streamed_bytes_total", "poe_compose_recordings_queued",
    "poe_compose_recordings_total", "poe_compose_degraded_pools",
    "poe_compose_blob_errors_total", "poe_grpc_server_handled_total",
    "poe_grpc_server_handling_seconds", "poe_extraction_jobs", "poe_extraction_progress_ratio",
)


# -- per-RPC metrics for every service ------------------------------------------------------------

def _split_method(full: str) -> tuple[str, str]:
    # "/poe.v1.Composer/ComposeModel" -> ("poe.v1.Composer", "ComposeModel")
    service, _, method = full.lstrip("/").partition("/")
    return service, method


def _code_name(context) -> str:
    code = context.code()
    return "OK" if code is None else code.name


class MetricsInterceptor(grpc.ServerInterceptor):
    """Server interceptor recording poe_grpc_server_handled_total and _handling_seconds.

    A server-streaming RPC is timed until its response iterator is exhausted (or fails), not
    until the handler returns its generator. Install it *outside* the error interceptor, so that
    the status code it reads from the context is the one the client receives.
    """

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = _split_method(handler_call_details.method)
        if service.startswith("grpc."):  # health checks and reflection stay out
            return handler
        if handler.unary_unary:
            return handler._replace(unary_unary=_timed_unary(handler.unary_unary, service, method))
        if handler.stream_unary:
            return handler._replace(stream_unary=_timed_unary(handler.stream_unary, service, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=_timed_stream(handler.unary_stream, service, method))
        if handler.stream_stream:
            return handler._replace(stream_stream=_timed_stream(handler.stream_stream, service, method))
        return handler


def _record(service: str, method: str, code: str, seconds: float) -> None:
    GRPC_HANDLED.labels(service, method, code).inc()
    GRPC_DURATION.labels(service, method).observe(seconds)


@contextmanager
def _timed(service: str, method: str, context) -> Iterator[None]:
    """Count and time one call, with the status code the client receives."""
    t0 = time.perf_counter()
    code = None
    try:
        yield
    except GeneratorExit:  # the client cancelled mid-stream
        code = "CANCELLED"
        raise
    except BaseException:
        code = _code_name(context) if context.code() is not None else "UNKNOWN"
        raise
    finally:
        _record(service, method, code or _code_name(context), time.perf_counter() - t0)


def _timed_unary(behavior, service: str, method: str):
    def handler(request, context):
        with _timed(service, method, context):
            return behavior(request, context)

    return handler


def _timed_stream(behavior, service: str, method: str):
    def handler(request, context):
        with _timed(service, method, context):
            yield from behavior(request, context)

    return handler
