"""The one way to host services: a gRPC server carrying any of registry, composer and extractor.

`poe up` hosts all three on one port; `poe serve NAME` and `poe registry serve` host one (what
Kubernetes runs); tests and the embedded CLI targets build the same server. Every server gets the
same interceptors (metrics outside, then authentication, error mapping and backpressure inside),
grpc.health.v1 and server reflection.

Load: each hosted service has a budget of concurrent calls and one of concurrent streams, a write
that waits too long for its client is cancelled (`poe_services.backpressure`), and the pool has a
thread for every admitted call, so that a call is either served at once or refused at once with
RESOURCE_EXHAUSTED. Connections are closed after `max_connection_age` seconds (gracefully: calls
in flight get `max_connection_age_grace` more), so that clients connect again and new replicas
behind a Service or a DNS name get their share of the calls.

Health names: one per hosted service ("poe.v1.Registry", ...), set by its runtime; "" (the
overall health) is SERVING exactly when every hosted service is; "liveness" is SERVING while the
process answers. On stop every name turns NOT_SERVING, and stays so for a drain period while calls
are still served, before the port closes (`Host.stop` has the whole order).
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import replace
from typing import NoReturn, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from poe.client.base import CLIENT_TLS_SETTINGS, read_tls_files
from poe.engine.config import Secret, Settings
from poe.engine.errors import InvalidArgument, Unavailable, field_error
from poe_services.auth import AuthInterceptor, anonymous_role
from poe_services.backpressure import BackpressureInterceptor, Limits, WriteWatchdog
from poe_services.errors import ErrorInterceptor
from poe_services.metrics import MetricsInterceptor, serve_metrics
from poe_services.tokens import TokenVerifier

log = logging.getLogger(__name__)

SERVICES = ("registry", "composer", "extractor")
SERVICE_NAMES = {"registry": "poe.v1.Registry", "composer": "poe.v1.Composer", "extractor": "poe.v1.Extractor"}
# Blobs and composed models stream in chunks of at most 1 MiB; 8 MiB bounds any one message.
MAX_MESSAGE_BYTES = 8 << 20
SERVER_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                  ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """The gRPC options of every server: message sizes, and the age after which a connection is
    closed (POE_MAX_CONNECTION_AGE, 0: never) with the grace its calls get (POE_MAX_CONNECTION_AGE_GRACE).

    A client keeps its HTTP/2 connection for as long as it lives, so without an age the replicas an
    autoscaler adds would get no calls from clients that were already connected. At the age the
    server sends GOAWAY: new calls go over a new connection (the client resolves its target again),
    calls in flight go on for the grace period and are cut after it."""
    for name, value in (("POE_MAX_CONNECTION_AGE", settings.max_connection_age),
                        ("POE_MAX_CONNECTION_AGE_GRACE", settings.max_connection_age_grace)):
        if value < 0:
            raise InvalidArgument(f"{name}: must be >= 0 seconds (0: never), got {value:g}")
    options = list(SERVER_OPTIONS)
    if settings.max_connection_age > 0:
        options += [("grpc.max_connection_age_ms", max(1, round(settings.max_connection_age * 1000))),
                    ("grpc.max_connection_age_grace_ms", round(settings.max_connection_age_grace * 1000))]
    return options
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Health name for liveness probes: SERVING while the process answers gRPC. Readiness follows each
# service (a composer whose registry is down is NOT_SERVING); liveness must not, or an outage of
# the registry would restart every composer and extractor.
LIVENESS = "liveness"
# `run` exits at most this long after the shutdown's drain and grace periods, even when closing a
# runtime takes longer or a call's handler is stuck in application code (within the 2 s promised).
CLOSE_ALLOWANCE = 1.5


class HealthReporter(Protocol):
    """What a runtime reports its health through (HealthServicer has the same method)."""

    def set(self, service: str, status: int, /) -> None: ...


class ServiceRuntime(Protocol):
    """One hosted service. The host calls attach() while building the server, start() once it
    listens, begin_shutdown() before it stops accepting calls and close() after the last call.
    A runtime with background work that needs the server still open (a composer's recordings into a
    registry on the same server) also has `flush(timeout) -> bool`, called right after begin_shutdown()."""

    def attach(self, server: grpc.Server, health: HealthReporter, /) -> None:
        """Add the servicer to `server`; report the service's status through `health`."""

    def start(self) -> None:
        """The server is listening (a composer may now read from a registry on the same port)."""

    def begin_shutdown(self) -> None:
        """Refuse new work; in-flight calls may still finish."""

    def close(self) -> None:
        """Release everything (idempotent)."""


class ServerHealth:
    """The runtimes' HealthReporter: forwards each service's status to the grpc health servicer
    and keeps the overall health ("") SERVING exactly when every hosted service is."""

    def __init__(self, servicer: health.HealthServicer, services: Iterable[str]):
        self.servicer = servicer
        self._lock = threading.Lock()
        self._statuses = dict.fromkeys(services, NOT_SERVING)
        self._shutting_down = False
        for name in self._statuses:
            servicer.set(name, NOT_SERVING)
        servicer.set(health.OVERALL_HEALTH, NOT_SERVING)
        servicer.set(LIVENESS, SERVING)

    def set(self, service: str, status: int, /) -> None:
        if service in (health.OVERALL_HEALTH, LIVENESS):
            raise ValueError(f"health name {service!r} belongs to the host, not to a service")
        with self._lock:
            if self._shutting_down:
                return
            self._statuses[service] = status
            self.servicer.set(service, status)
            overall = SERVING if all(s == SERVING for s in self._statuses.values()) else NOT_SERVING
            self.servicer.set(health.OVERALL_HEALTH, overall)

    def enter_graceful_shutdown(self) -> None:
        """Every name (liveness included) NOT_SERVING for good; later sets are ignored."""
        with self._lock:
            self._shutting_down = True
            self.servicer.enter_graceful_shutdown()


class Host:
    """A built server and the runtimes it hosts (in start order). Not started yet."""

    def __init__(self, server: grpc.Server, port: int, runtimes: dict[str, ServiceRuntime],
                 server_health: ServerHealth, executor: futures.ThreadPoolExecutor | None = None,
                 verifier: TokenVerifier | None = None, watchdog: WriteWatchdog | None = None,
                 limits: Limits | None = None):
        self.server, self.port, self.runtimes, self.health = server, port, runtimes, server_health
        self.executor = executor  # the server's RPC threads
        self.verifier = verifier  # the bearer tokens this server accepts
        self.watchdog = watchdog  # cancels writes to clients that stopped reading
        self.limits = limits  # the budgets of concurrent calls and streams per service
        self._lock = threading.Lock()
        self._closed: threading.Event | None = None

    def issue_token(self, role: str, name: str = "in-process") -> str:
        """A token this server accepts for as long as it runs, known nowhere else: for a command
        that starts a server only to call it itself (`poe registry import --local`, benchmarks)."""
        if self.verifier is None:
            raise RuntimeError("this host checks no tokens")
        return self.verifier.add_memory_token(role, name)

    def start(self) -> None:
        self.server.start()
        if self.watchdog is not None:
            self.watchdog.start()
        for runtime in self.runtimes.values():
            runtime.start()

    def stop(self, grace: float | None = 10.0, drain: float = 0.0) -> threading.Event:
        """Shut down within `drain` + `grace` seconds, in this order:

        1. every health name NOT_SERVING (done when this returns; the rest runs in the background);
        2. `drain` s of serving calls as before, so that readiness probes and client-side health
           checks see NOT_SERVING while the port is still open;
        3. each runtime's begin_shutdown(), dependents first, and its flush(): a composer sends its
           queued recordings while a registry on this same server still accepts calls (flushing
           takes at most half of `grace`, so that in-flight calls keep the other half);
        4. no new calls; calls in flight get what is left of `grace`, then are cancelled (a stream
           whose client stopped reading included). `grace` None: no drain, no flush, every call
           cancelled at once;
        5. the runtimes closed, dependents first, and the idle RPC threads ended.

        Returns an event set once everything is closed (the same event on every call)."""
        with self._lock:
            if self._closed is not None:
                return self._closed
            self._closed = closed = threading.Event()
        self.health.enter_graceful_shutdown()
        threading.Thread(target=self._shut_down, args=(grace, max(0.0, drain), closed), name="host-stop",
                         daemon=True).start()
        return closed

    def _shut_down(self, grace: float | None, drain: float, closed: threading.Event) -> None:
        try:
            if grace is not None and drain:
                time.sleep(drain)
            now = time.monotonic()
            deadline = now + max(0.0, grace or 0.0)
            flushed_by = now + max(0.0, grace or 0.0) / 2
            dependents_first = list(reversed(self.runtimes.items()))
            for name, runtime in dependents_first:
                _quietly(name, "begin_shutdown", runtime.begin_shutdown)
                flush = getattr(runtime, "flush", None)
                if flush is not None and grace:
                    done = _quietly(name, "flush", lambda f=flush: f(max(0.0, flushed_by - time.monotonic())))
                    if done is False:
                        log.warning("%s: background work not finished within half the grace period", name)
            self.server.stop(None if grace is None else max(0.0, deadline - time.monotonic())).wait()
            for name, runtime in dependents_first:
                _quietly(name, "close", runtime.close)
            if self.watchdog is not None:
                self.watchdog.stop()
            if self.executor is not None:
                self.executor.shutdown(wait=False, cancel_futures=True)
        finally:
            closed.set()

    def __enter__(self) -> Host:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop(None).wait()


def _quietly(name: str, what: str, call: Callable[[], object]) -> object:
    """call(), logging instead of raising: one runtime's failure must not stop the others' shutdown."""
    try:
        return call()
    except Exception:
        log.exception("%s: %s failed", name, what)
        return None


def _make_runtime(name: str, settings: Settings, registry_target: str | None, migrate: bool | None,
                  warm: bool) -> ServiceRuntime:
    if name == "registry":
        from poe_services.registry.runtime import RegistryRuntime

        return RegistryRuntime(settings, migrate=migrate)
    if name == "composer":
        from poe_services.composer.runtime import ComposerRuntime

        return ComposerRuntime(settings, registry_target, warm=warm)
    from poe_services.extractor.runtime import ExtractorRuntime

    return ExtractorRuntime(settings, registry_target)


# Seconds a publication (or alias move) on a server that also hosts the composer waits for the
# composer to warm what changed: about 1 s for the shipped pool on 2 cores; a pool too large to
# warm in this time finishes warming in the background.
PUBLISH_WARM_WAIT = 10.0

SERVER_TLS_SETTINGS = ("POE_TLS_CLIENT_CA", "POE_TLS_SERVER_CERT", "POE_TLS_SERVER_KEY")


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS of the gRPC port: None (plaintext) without POE_TLS_SERVER_CERT and POE_TLS_SERVER_KEY;
    with POE_TLS_CLIENT_CA too, every client must present a certificate that CA signed (mutual TLS).
    A missing, unreadable or wrong file is an InvalidArgument naming its setting."""
    if settings.tls_server_cert is None and settings.tls_server_key is None:
        if settings.tls_client_ca is not None:
            raise InvalidArgument("POE_TLS_CLIENT_CA is set but POE_TLS_SERVER_CERT and POE_TLS_SERVER_KEY are not: "
                                  "client certificates are only checked over TLS")
        return None
    client_ca, cert, key = read_tls_files(settings.tls_client_ca, settings.tls_server_cert, settings.tls_server_key,
                                          SERVER_TLS_SETTINGS)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def in_process_client_tls(settings: Settings) -> dict:
    """The client TLS settings (Settings fields) with which the composer and extractor hosted on a
    server reach the registry on that same server, at 127.0.0.1:PORT.

    Plaintext when the port is. With TLS: the server's certificate is checked against POE_TLS_CA,
    or, without it, against the server's own certificate file (enough for a self-signed
    certificate, or a chain file that ends with its root); under mutual TLS they present
    POE_TLS_CERT/POE_TLS_KEY, or else the server's own certificate (then it must be signed by
    POE_TLS_CLIENT_CA and allowed for client authentication); the name checked is
    POE_TLS_SERVER_NAME, or else 127.0.0.1 when the certificate lists it, else its first DNS name.
    A TLS handshake in memory tries this out, so that a combination that could never connect is an
    InvalidArgument at start instead of a composer that never becomes ready."""
    if settings.tls_server_cert is None:
        return {"tls_ca": None, "tls_cert": None, "tls_key": None, "tls_server_name": ""}
    read_tls_files(settings.tls_ca, settings.tls_cert, settings.tls_key, CLIENT_TLS_SETTINGS)
    ca = settings.tls_ca or settings.tls_server_cert
    cert, key = None, None
    if settings.tls_cert is not None:
        cert, key = settings.tls_cert, settings.tls_key
    elif settings.tls_client_ca is not None:
        cert, key = settings.tls_server_cert, settings.tls_server_key
    peer = _handshake_in_memory(settings, ca, cert, key)
    name = settings.tls_server_name
    if not name:
        names = peer.get("subjectAltName", ())
        dns = [value for kind, value in names if kind == "DNS" and "*" not in value]
        if ("IP Address", "127.0.0.1") not in names and dns:
            name = dns[0]
    return {"tls_ca": ca, "tls_cert": cert, "tls_key": key, "tls_server_name": name}


def _handshake_in_memory(settings: Settings, ca, cert, key) -> dict:
    """A TLS handshake between this server's certificate and the in-process clients' settings,
    through memory buffers; the server's certificate as the client verified it."""
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(settings.tls_server_cert, settings.tls_server_key)
    if settings.tls_client_ca is not None:
        server_side.verify_mode = ssl.CERT_REQUIRED
        server_side.load_verify_locations(cafile=settings.tls_client_ca)
    client_side = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_side.check_hostname = bool(settings.tls_server_name)  # else a name is picked from the certificate
    client_side.load_verify_locations(cafile=ca)
    if cert is not None:
        client_side.load_cert_chain(cert, key)
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_in, server_in = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_side.wrap_bio(client_in, to_server, server_hostname=settings.tls_server_name or None)
    server = server_side.wrap_bio(server_in, to_client, server_side=True)
    pending = {"client": client, "server": server}
    for _ in range(6):  # TLS 1.3 needs two round trips
        for side, end in list(pending.items()):
            try:
                end.do_handshake()
                del pending[side]
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as e:
                raise _in_process_tls_error(settings, side, e) from None
        server_in.write(to_server.read())
        client_in.write(to_client.read())
        if not pending:
            return client.getpeercert()
    raise RuntimeError("the TLS handshake in memory did not finish")


def _in_process_tls_error(settings: Settings, side: str, error: ssl.SSLError) -> InvalidArgument:
    reason = getattr(error, "verify_message", None) or error.reason or str(error)
    where = "the composer and extractor on this server reach its registry over TLS at 127.0.0.1"
    if side == "client":
        trusted = f"POE_TLS_CA ({settings.tls_ca})" if settings.tls_ca else "the certificate itself (no POE_TLS_CA)"
        name = f" as {settings.tls_server_name} (POE_TLS_SERVER_NAME)" if settings.tls_server_name else ""
        return InvalidArgument(f"POE_TLS_SERVER_CERT: {where}, and cannot verify its certificate{name} with {trusted}: "
                               f"{reason}; set POE_TLS_CA to the CA that signed it"
                               + (" and POE_TLS_SERVER_NAME to a name it holds" if name else ""))
    shown = f"POE_TLS_CERT ({settings.tls_cert})" if settings.tls_cert else \
        "the server's own certificate (no POE_TLS_CERT)"
    return InvalidArgument(f"POE_TLS_CLIENT_CA: {where} presenting {shown}, which the client CA refuses: {reason}; "
                           "set POE_TLS_CERT and POE_TLS_KEY to a client certificate that POE_TLS_CLIENT_CA signed")


def create_server(address: str, settings: Settings, services: Iterable[str] = SERVICES, *,
                  registry_target: str | None = None, migrate: bool | None = None, warm: bool = True,
                  reuse_port: bool = False) -> Host:
    """A server bound to `address` (port 0 picks a free one) hosting `services`; not started.

    Composer and extractor reach the registry at `registry_target`, or on this very server when
    it hosts the registry, else at settings.registry_addr. `migrate` (registry): bring the schema
    to head first (default settings.registry_auto_migrate). `warm` (composer): load the default
    pool before reporting SERVING. Calls and streams at once per service: POE_MAX_CONCURRENT_CALLS
    and POE_MAX_CONCURRENT_STREAMS; the pool has a thread for each (`Limits.threads`). `reuse_port`:
    the port may be bound by other processes too (SO_REUSEPORT; `run_processes`).
    """
    services = tuple(dict.fromkeys(services))
    unknown = [s for s in services if s not in SERVICES]
    if unknown or not services:
        raise field_error("services", f"expected some of {', '.join(SERVICES)}, got {', '.join(unknown) or 'none'}")
    services = tuple(s for s in SERVICES if s in services)  # the registry first: the others may read from it
    credentials = server_credentials(settings)
    in_process = registry_target is None and "registry" in services and len(services) > 1
    in_process_tls = in_process_client_tls(settings) if in_process else {}
    limits = Limits((SERVICE_NAMES[s] for s in services), settings.max_concurrent_calls,
                    settings.max_concurrent_streams)
    watchdog = WriteWatchdog(settings.stream_write_timeout)
    # gRPC turns SO_REUSEPORT on by default (Linux): a second server on a port in use would share it
    # silently instead of failing to listen.
    options = server_options(settings) + [("grpc.so_reuseport", 1 if reuse_port else 0)]
    # A thread for every call the budgets admit; gRPC refuses any call beyond that number at once
    # (RESOURCE_EXHAUSTED) instead of queueing it for a thread.
    executor = futures.ThreadPoolExecutor(max_workers=limits.threads, thread_name_prefix="poe-rpc")
    # Metrics outside (refused calls are counted too), then authentication, then error mapping,
    # then the budgets (only authorized calls take a place; a refusal is mapped like any error).
    verifier = TokenVerifier(settings.tokens_file)
    auth = AuthInterceptor(verifier, anonymous_role(settings, address))
    interceptors = [MetricsInterceptor(), auth, ErrorInterceptor(), BackpressureInterceptor(limits, watchdog)]
    server = grpc.server(executor, interceptors=interceptors, options=options,
                         maximum_concurrent_rpcs=limits.threads)
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # "Failed to bind": newer grpcio raises instead of returning 0
        port = 0
    if not port:
        raise Unavailable(f"cannot listen on {address}")
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server_health = ServerHealth(servicer, (SERVICE_NAMES[s] for s in services))
    if registry_target is None and "registry" in services:
        registry_target = f"127.0.0.1:{port}"
        if not settings.service_token and len(services) > 1:
            # The composer and extractor hosted here call this registry as `service`: with a token
            # that lives as long as this process and is never written anywhere.
            settings = replace(settings, service_token=Secret(verifier.add_memory_token("service", "in-process")))
        settings = replace(settings, **in_process_tls)
    runtimes: dict[str, ServiceRuntime] = {}
    try:
        for name in services:
            runtimes[name] = _make_runtime(name, settings, registry_target, migrate, warm)
        for runtime in runtimes.values():
            runtime.attach(server, server_health)
        if in_process and "composer" in runtimes:
            # Without this the composer would learn of a pool imported here only at its next poll, and
            # the first requests for it would wait for TorchScript. The publication's answer waits for
            # the warm-up (bounded), so that `poe registry import` returns with the pool warm.
            composer = runtimes["composer"]
            runtimes["registry"].on_pools_changed(lambda: composer.look_now(wait=PUBLISH_WARM_WAIT))
    except BaseException:
        for runtime in reversed(runtimes.values()):
            runtime.close()
        server.stop(None)
        executor.shutdown(wait=False)
        raise
    reflection.enable_server_reflection(
        (*(SERVICE_NAMES[s] for s in services), health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return Host(server, port, runtimes, server_health, executor, verifier, watchdog, limits)


def run(settings: Settings, services: Iterable[str], port: int, metrics_port: int | None, host: str = "[::]",
        grace: float = 10.0, migrate: bool | None = None, banner: Callable[[str], None] = print,
        drain: float = 0.0, reuse_port: bool = False) -> NoReturn:
    """Serve until SIGTERM/SIGINT, then stop (`Host.stop`: NOT_SERVING, `drain` s still serving, then
    in-flight calls get up to `grace` s) and end the process with status 0, at most `drain` + `grace`
    + CLOSE_ALLOWANCE s after the signal. What is still running then (a runtime's close, a handler
    stuck in application code) does not hold the process: it exits without waiting for it.

    `metrics_port`: where /metrics listens (0: any free port; None: not at all), on the same `host`
    as gRPC and, when the server has a certificate, over HTTPS with it (client certificates
    required under mutual TLS).
    """
    hosted = create_server(f"{host}:{port}", settings, services, migrate=migrate, reuse_port=reuse_port)
    bound_metrics = None
    if metrics_port is not None:
        try:
            bound_metrics = serve_metrics(metrics_port, host, certfile=settings.tls_server_cert,
                                          keyfile=settings.tls_server_key, client_cafile=settings.tls_client_ca)
        except OSError as e:
            hosted.stop(0).wait()
            raise Unavailable(f"cannot serve /metrics on port {metrics_port}: {e}") from e
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: done.set())
    hosted.start()
    names = ", ".join(SERVICE_NAMES[s] for s in hosted.runtimes)
    tls = settings.tls_server_cert is not None
    banner(f"poe: {names} listening on {host}:{hosted.port}"
           + (" (mutual TLS)" if tls and settings.tls_client_ca else " (TLS)" if tls else "")
           + (f"; metrics on :{bound_metrics}/metrics{' (HTTPS)' if tls else ''}" if bound_metrics is not None else ""))
    # A short wait, not one long one: Python runs signal handlers between bytecodes of the main thread.
    while not done.wait(0.5):
        pass
    deadline = time.monotonic() + drain + grace + CLOSE_ALLOWANCE
    banner(f"poe: stopping: NOT_SERVING{f', serving {drain:g} s more' if drain else ''}, then in-flight calls get "
           f"up to {grace:g} s")
    closed = hosted.stop(grace, drain=drain)
    stuck = _wait_for_threads(closed, deadline)
    if stuck:
        log.warning("poe: exiting %.1f s after the grace period without waiting for: %s", CLOSE_ALLOWANCE,
                    ", ".join(stuck))
    # Without the interpreter's finalization: it would join the threads still stuck in a call, and
    # daemon threads still inside torch (a warm-up) can abort it ("terminate called without an
    # active exception"). Everything was closed in order above.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _wait_for_threads(closed: threading.Event, deadline: float) -> list[str]:
    """Wait until the host is closed and every thread the interpreter's exit would join has ended, at
    most until `deadline`; the names of what is still running then."""
    pending = [] if closed.wait(max(0.0, deadline - time.monotonic())) else ["closing the services"]
    # ThreadPoolExecutor workers (the RPC handlers) are joined at exit even when they are daemons,
    # as they are when gRPC's polling thread starts them.
    pool_workers = set(getattr(futures.thread, "_threads_queues", {}))
    others = [t for t in threading.enumerate()
              if t is not threading.current_thread() and (not t.daemon or t in pool_workers)]
    for t in others:
        t.join(max(0.0, deadline - time.monotonic()))
    return pending + [f"thread {t.name}" for t in others if t.is_alive()]


def run_processes(settings: Settings, services: Iterable[str], port: int, metrics_port: int | None,
                  processes: int, host: str = "[::]", grace: float = 10.0, migrate: bool | None = None,
                  banner: Callable[[str], None] = print, drain: float = 0.0) -> NoReturn:
    """`processes` servers of `services` on one port, each a process of its own (its own engine,
    caches, warm-up, health and GIL), until SIGTERM/SIGINT; the composer's way past one Python
    process's GIL on one machine (`poe serve composer --processes N`).

    The port is shared with SO_REUSEPORT: the kernel spreads *connections* across the processes, so
    one client (one connection) is served by one process, and many clients by all. Each process
    reports its own health on the shared port; a probe's connection reaches one of them. /metrics is
    served here, in the parent, with every process's metrics added up (prometheus_client's
    multiprocess mode; gauges carry a `pid` label). When a process ends on its own, the others are
    stopped and this exits with status 1, so that the orchestrator restarts the whole set. On
    SIGTERM/SIGINT each process stops as `run` does (drain, grace) and this exits with status 0."""
    import multiprocessing
    import shutil
    import socket
    import tempfile

    from prometheus_client import CollectorRegistry, multiprocess

    from poe_services.metrics import BUILD_INFO

    if processes < 1:
        raise InvalidArgument(f"--processes: must be >= 1, got {processes}")
    if port == 0:  # a port of 0 cannot be shared: pick one for all of them
        family = socket.getaddrinfo(host.strip("[]"), 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        with socket.socket(family) as s:
            s.bind((host.strip("[]"), 0))
            port = s.getsockname()[1]
    metrics_dir = tempfile.mkdtemp(prefix="poe-metrics-")
    # Read by prometheus_client when the children import it: their metrics go to files in metrics_dir.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    ctx = multiprocessing.get_context("spawn")
    children = [ctx.Process(target=_run_child, name=f"poe-server-{i}", daemon=False,
                            args=(settings, tuple(services), port, host, grace, migrate, drain))
                for i in range(processes)]
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: done.set())
    code = 0
    try:
        for child in children:
            child.start()
        bound_metrics = None
        if metrics_port is not None:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=metrics_dir)
            registry.register(BUILD_INFO)  # an Info lives in this process only
            try:
                bound_metrics = serve_metrics(metrics_port, host, registry, certfile=settings.tls_server_cert,
                                              keyfile=settings.tls_server_key, client_cafile=settings.tls_client_ca)
            except OSError as e:
                raise Unavailable(f"cannot serve /metrics on port {metrics_port}: {e}") from e
        banner(f"poe: {processes} processes of {', '.join(SERVICE_NAMES[s] for s in services)} sharing {host}:{port} "
               f"(pids {', '.join(str(c.pid) for c in children)})"
               + (f"; metrics of all on :{bound_metrics}/metrics" if bound_metrics is not None else ""))
        while not done.wait(0.5):
            ended = [c for c in children if c.exitcode is not None]
            if ended:
                log.error("poe: server process %s ended (exit code %s): stopping the others",
                          ended[0].pid, ended[0].exitcode)
                code = 1
                break
    finally:
        for child in children:
            if child.pid is not None and child.exitcode is None:
                os.kill(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + drain + grace + CLOSE_ALLOWANCE + 1.0
        for child in children:
            if child.pid is not None:
                child.join(max(0.0, deadline - time.monotonic()))
                if child.exitcode is None:
                    log.warning("poe: server process %s did not stop in time: killed", child.pid)
                    child.kill()
                    child.join(5)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run_child(settings: Settings, services: tuple[str, ...], port: int, host: str, grace: float,
               migrate: bool | None, drain: float) -> NoReturn:
    """One process of `run_processes`: `run` on the shared port, without /metrics of its own."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(settings, services, port, None, host=host, grace=grace, migrate=migrate, drain=drain, reuse_port=True,
        banner=lambda msg: print(f"[pid {os.getpid()}] {msg}", flush=True))
