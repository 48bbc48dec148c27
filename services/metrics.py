"""Every Prometheus metric the services export, defined in one place.

Product metrics carry the `poe_` prefix and base units. The per-RPC metrics follow the gRPC
ecosystem's convention (go-grpc-prometheus, py-grpc-prometheus): `grpc_server_started_total`,
`grpc_server_handled_total` and `grpc_server_handling_seconds`, labelled `grpc_type`,
`grpc_service`, `grpc_method` and `grpc_code`, so that stock gRPC dashboards work on them too.
Labels have low cardinality (never a class list or a model id), and none is named like a label
that Prometheus or the Prometheus Operator attaches to every series of a target (RESERVED_LABELS):
such a label would be renamed to `exported_*` at scrape time and break every query.

The dashboard (deploy/helm/poe/files/poe-dashboard.json) and the alert rules
(deploy/prometheus/alerts.yaml) use exactly these names; tests/deploy evaluates every expression
of both in a real Prometheus that scrapes a live server.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app

# 1 ms .. 10 s, roughly x2 per bucket.
LATENCY_BUCKETS = (0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Target labels that Prometheus (job, instance) and the Prometheus Operator (namespace, service,
# pod, container, endpoint) set; no metric here may use them.
RESERVED_LABELS = frozenset({"job", "instance", "namespace", "service", "pod", "container", "endpoint"})

# poe_build_info{version} 1: every PoE process exports it, so dashboards list PoE pods by it
# whatever the scrape job is called.
BUILD_INFO = Info("poe_build", "The poe-suite version this process runs.")
try:
    BUILD_INFO.info({"version": importlib.metadata.version("poe-suite")})
except importlib.metadata.PackageNotFoundError:  # running from a tree that is not installed
    BUILD_INFO.info({"version": "unknown"})

COMPOSE_DURATION = Histogram(
    "poe_compose_duration_seconds",
    "ComposeModel latency from request to last byte streamed, or to the error; failures included.",
    # cache: hit | miss | none (failed before a model was found); grpc_code: the final status
    ["cache", "format", "grpc_code"],
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
    ["grpc_code"],
)
# Gauges say how to add up over the processes of `poe serve composer --processes N` (prometheus_client's
# multiprocess mode; ignored in a single process): livesum over the living ones, max for a count any
# process sees, all for one series per process.
COMPOSE_IN_FLIGHT = Gauge(
    "poe_compose_in_flight_requests",
    "ComposeModel requests being served right now.",
    multiprocess_mode="livesum",
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
    multiprocess_mode="all",  # one series per process (`pid`): each has caches of its own, each bounded
)
COMPOSE_DEGRADED_POOLS = Gauge(
    "poe_compose_degraded_pools",
    "Pool versions with a library or expert blob that failed its last fetch (corrupt or missing).",
    multiprocess_mode="max",
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
    multiprocess_mode="livesum",
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
COMPOSE_TEMPLATE_MISSES = Counter(
    "poe_compose_template_misses_total",
    "Compositions that waited for a model export (no template of their format and tensor layout yet); "
    "warm-up makes these 0.",
    ["format"],  # torchscript | pt2 | onnx
)
for _format in ("torchscript", "pt2", "onnx"):  # exported at 0, so that increase() sees the first one
    COMPOSE_TEMPLATE_MISSES.labels(_format)
# The per-RPC metrics (grpc_type: unary | client_stream | server_stream | bidi_stream). Unlike
# py-grpc-prometheus, the histogram has grpc_code too: failed calls are timed, and their latency
# can be told apart from that of the successful ones.
GRPC_STARTED = Counter(
    "grpc_server_started_total",
    "RPCs started on the server.",
    ["grpc_type", "grpc_service", "grpc_method"],
)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, whatever their status.",
    ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
)
GRPC_DURATION = Histogram(
    "grpc_server_handling_seconds",
    "RPC latency as seen by the server, until the last response message is sent or the call fails.",
    ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
    buckets=LATENCY_BUCKETS,
)
STREAM_WRITE_CANCELS = Counter(
    "poe_grpc_stream_write_cancels_total",
    "Calls cancelled because a response message could not be written in time (the client stopped "
    "reading): after POE_STREAM_WRITE_TIMEOUT, or at once when a slow reader finds every stream taken.",
    ["grpc_service", "grpc_method", "reason"],  # reason: timeout | overload
)
EXTRACTION_JOBS = Gauge(
    "poe_extraction_jobs",
    "Extraction jobs this extractor holds right now, by state.",
    ["state"],  # queued | running
)
EXTRACTION_JOBS_FINISHED = Counter(
    "poe_extraction_jobs_finished_total",
    "Extraction jobs this extractor finished since it started, by outcome.",
    ["state"],  # succeeded | failed | cancelled
)
for _state in ("queued", "running"):  # exported at 0 before the first job
    EXTRACTION_JOBS.labels(_state)
for _state in ("succeeded", "failed", "cancelled"):  # exported at 0, so that increase() sees the first one
    EXTRACTION_JOBS_FINISHED.labels(_state)
EXTRACTION_PROGRESS = Gauge(
    "poe_extraction_progress_ratio",
    "Progress of the running extraction jobs, mean over jobs, in [0, 1].",
)


# Seconds a /metrics connection may take for its TLS handshake and for each read of its request.
METRICS_SOCKET_TIMEOUT = 10.0


class _MetricsServer(ThreadingMixIn, WSGIServer):
    """/metrics over HTTP, or HTTPS when `tls` is set. The TLS handshake runs in each connection's
    own thread, with a timeout: prometheus_client's TLS server shakes hands in the thread that
    accepts connections, so one client that connects and sends nothing stalls every scrape."""

    daemon_threads = True
    tls: ssl.SSLContext | None = None

    def get_request(self):
        conn, peer = self.socket.accept()
        conn.settimeout(METRICS_SOCKET_TIMEOUT)
        if self.tls is not None:
            conn = self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        return conn, peer

    def handle_error(self, request, client_address) -> None:
        # A refused handshake (plaintext on the HTTPS port, no client certificate) is the client's
        # failure, not the server's: no traceback on stderr.
        logging.getLogger(__name__).debug("/metrics: connection from %s failed", client_address[0], exc_info=True)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:
        pass


def serve_metrics(port: int, addr: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY, *,
                  certfile: str | os.PathLike | None = None, keyfile: str | os.PathLike | None = None,
                  client_cafile: str | os.PathLike | None = None) -> int:
    """Start the /metrics endpoint in a daemon thread on `addr` ("[::]" and "::" for every IPv6 and
    IPv4 address); returns the bound port (port 0 picks one). With `certfile` and `keyfile` it serves
    HTTPS; with `client_cafile` too, only clients presenting a certificate that CA signed."""
    addr = addr.strip("[]")
    family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("MetricsServer", (_MetricsServer,), {"address_family": family})
    if certfile is not None:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(certfile, keyfile)
        if client_cafile is not None:
            tls.verify_mode = ssl.CERT_REQUIRED
            tls.load_verify_locations(cafile=client_cafile)
        server_class.tls = tls
    server = make_server(addr, port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="poe-metrics", daemon=True).start()
    return server.server_address[1]


PRODUCT_METRIC_NAMES = (
    "poe_build_info",
    "poe_compose_duration_seconds", "poe_compose_stage_duration_seconds", "poe_compose_requests_total",
    "poe_compose_in_flight_requests", "poe_compose_cache_hits_total", "poe_compose_cache_misses_total",
    "poe_compose_cache_bytes", "poe_compose_streamed_bytes_total", "poe_compose_template_misses_total",
    "poe_compose_recordings_queued",
    "poe_compose_recordings_total", "poe_compose_degraded_pools", "poe_compose_blob_errors_total",
    "poe_extraction_jobs", "poe_extraction_jobs_finished_total", "poe_extraction_progress_ratio",
    "poe_grpc_stream_write_cancels_total",
)
GRPC_METRIC_NAMES = ("grpc_server_started_total", "grpc_server_handled_total", "grpc_server_handling_seconds")
ALL_METRIC_NAMES = PRODUCT_METRIC_NAMES + GRPC_METRIC_NAMES


def record_compose(grpc_code: str, cache: str, fmt: str, seconds: float) -> None:
    """Count and time one finished ComposeModel call, failed or not."""
    COMPOSE_REQUESTS.labels(grpc_code).inc()
    COMPOSE_DURATION.labels(cache, fmt, grpc_code).observe(seconds)


# -- per-RPC metrics for every service ------------------------------------------------------------

# Handler attribute of grpc.RpcMethodHandler -> grpc_type, as go-grpc-prometheus names them.
_RPC_TYPES = (("unary_unary", "unary"), ("stream_unary", "client_stream"),
              ("unary_stream", "server_stream"), ("stream_stream", "bidi_stream"))


def _split_method(full: str) -> tuple[str, str]:
    # "/poe.v1.Composer/ComposeModel" -> ("poe.v1.Composer", "ComposeModel")
    service, _, method = full.lstrip("/").partition("/")
    return service, method


def _code_name(context) -> str:
    code = context.code()
    return "OK" if code is None else code.name


class MetricsInterceptor(grpc.ServerInterceptor):
    """Server interceptor recording grpc_server_started_total, _handled_total and _handling_seconds.

    A response-streaming RPC is timed until its response iterator is exhausted (or fails), not
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
        for attr, rpc_type in _RPC_TYPES:
            behavior = getattr(handler, attr)
            if behavior is not None:
                wrap = _timed_stream if handler.response_streaming else _timed_unary
                return handler._replace(**{attr: wrap(behavior, (rpc_type, service, method))})
        return handler


@contextmanager
def _timed(rpc: tuple[str, str, str], context) -> Iterator[None]:
    """Count and time one call, with the status code the client receives."""
    GRPC_STARTED.labels(*rpc).inc()
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
        code = code or _code_name(context)
        GRPC_HANDLED.labels(*rpc, code).inc()
        GRPC_DURATION.labels(*rpc, code).observe(time.perf_counter() - t0)


def _timed_unary(behavior, rpc: tuple[str, str, str]):
    def handler(request, context):
        with _timed(rpc, context):
            return behavior(request, context)

    return handler


def _timed_stream(behavior, rpc: tuple[str, str, str]):
    def handler(request, context):
        with _timed(rpc, context):
            yield from behavior(request, context)

    return handler
