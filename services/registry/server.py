"""Running the registry: `create_server(address, settings) -> (server, port)` and `serve()`.

`RegistryRuntime` owns the database engine, the blob store and the health monitor and can attach
the servicer to any grpc.Server (so `poe up` can host all services on one port);
`create_server` builds a standalone server with the error interceptor, grpc.health.v1 and
server reflection. Health is NOT_SERVING while the database or the blob store does not answer
(probed every `POE_REGISTRY_HEALTH_INTERVAL` seconds) and during shutdown.

Start-up refuses (FailedPrecondition naming `poe registry migrate`) when the database schema is
not current, unless settings.registry_auto_migrate (POE_REGISTRY_AUTO_MIGRATE) or `migrate=True`
asks to migrate first. When the database is unreachable at start-up the server starts anyway,
NOT_SERVING, and checks the schema as soon as the database answers.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from poe.engine.config import Settings
from poe.engine.errors import FailedPrecondition, Unavailable
from poe.v1 import registry_pb2_grpc
from poe_services.errors import ErrorInterceptor
from poe_services.registry import db
from poe_services.registry.blobstore import open_blob_store
from poe_services.registry.core import Registry
from poe_services.registry.servicer import SERVICE_NAME, RegistryServicer
from poe_services.registry.sqlstore import SqlRegistryStore

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
GRPC_OPTIONS = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]


class RegistryRuntime:
    """Store, blob store and health monitor of one registry instance."""

    def __init__(self, settings: Settings, *, migrate: bool | None = None):
        self.settings = settings
        self.engine = db.make_engine(settings.database_url)
        self._schema_ok = False
        try:
            if settings.registry_auto_migrate if migrate is None else migrate:
                db.upgrade(self.engine)
            self._check_schema()
        except Unavailable as err:
            log.warning("registry: database not reachable at start-up (%s); NOT_SERVING until it is", err)
        except BaseException:
            self.engine.dispose()
            raise
        try:
            blobs = open_blob_store(settings.blob_url, settings)
        except BaseException:
            self.engine.dispose()
            raise
        self.registry = Registry(SqlRegistryStore(self.engine, require_current=False), blobs)
        self.health: health.HealthServicer | None = None
        self._services: tuple[str, ...] = ()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: int | None = None
        self._closed = False

    def _check_schema(self) -> None:
        db.require_current_schema(self.engine)
        self._schema_ok = True

    def problems(self) -> list[str]:
        out = self.registry.problems()
        if not out and not self._schema_ok:
            try:
                self._check_schema()
            except (FailedPrecondition, Unavailable) as err:
                out.append(str(err))
        return out

    def check_health(self) -> bool:
        """Probe now and publish the status; returns whether the registry can serve."""
        problems = self.problems()
        status = NOT_SERVING if problems or self._stop.is_set() else SERVING
        if status != self._last:
            if status == SERVING:
                log.info("registry: SERVING")
            elif self._stop.is_set():
                log.info("registry: NOT_SERVING: shutting down")
            else:
                log.warning("registry: NOT_SERVING: %s", "; ".join(problems))
            self._last = status
        if self.health is not None:
            for name in self._services:
                self.health.set(name, status)
        return status == SERVING

    def attach(self, server: grpc.Server, health_servicer: health.HealthServicer, *, overall: bool = False) -> None:
        """Add the Registry servicer to `server` and report its health through `health_servicer`
        (under "poe.v1.Registry", and under "" too when `overall`)."""
        registry_pb2_grpc.add_RegistryServicer_to_server(RegistryServicer(self.registry), server)
        self.health = health_servicer
        self._services = (SERVICE_NAME, "") if overall else (SERVICE_NAME,)
        self.check_health()
        self._thread = threading.Thread(target=self._monitor, name="registry-health", daemon=True)
        self._thread.start()

    def _monitor(self) -> None:
        interval = max(0.05, self.settings.registry_health_interval)
        while not self._stop.wait(interval):
            try:
                self.check_health()
            except Exception:
                log.exception("registry: health probe failed")

    def begin_shutdown(self) -> None:
        """Report NOT_SERVING from now on and stop probing."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self.health is not None:
            for name in self._services:
                self.health.set(name, NOT_SERVING)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def close(self) -> None:
        """begin_shutdown(), then release the database and blob store connections."""
        self.begin_shutdown()
        if not self._closed:
            self._closed = True
            self.registry.close()


def create_server(address: str, settings: Settings, *, migrate: bool | None = None,
                  max_workers: int = 16) -> tuple[grpc.Server, int]:
    """A registry server bound to `address` (port 0: any free port), not started yet.

    Returns (server, port). `server.stop()` also closes the database and blob store.
    """
    runtime = RegistryRuntime(settings, migrate=migrate)
    try:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="registry"),
                             interceptors=[ErrorInterceptor()], options=GRPC_OPTIONS)
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        runtime.attach(server, health_servicer, overall=True)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
        port = server.add_insecure_port(address)
    except BaseException:
        runtime.close()
        raise
    if not port:
        runtime.close()
        raise Unavailable(f"cannot listen on {address}")
    grpc_stop = server.stop

    def stop(grace: float | None = None) -> threading.Event:
        # NOT_SERVING first, then stop accepting and let in-flight calls finish within `grace`,
        # then close the database and blob store connections.
        runtime.begin_shutdown()
        stopped = grpc_stop(grace)
        threading.Thread(target=lambda: (stopped.wait(), runtime.close()), name="registry-close",
                         daemon=True).start()
        return stopped

    server.stop = stop  # type: ignore[method-assign]
    server.registry_runtime = runtime  # type: ignore[attr-defined]
    return server, port


def serve(settings: Settings, port: int = 50051, host: str = "[::]", grace: float = 10.0,
          migrate: bool | None = None) -> int:
    """Run the registry until SIGTERM/SIGINT; returns an exit status."""
    server, bound = create_server(f"{host}:{port}", settings, migrate=migrate)
    server.start()
    log.info("registry listening on %s:%d (database %s, blobs %s)", host, bound,
             db.redact(settings.database_url), settings.blob_url)
    print(f"poe.v1.Registry listening on port {bound}", flush=True)
    done = threading.Event()

    def on_signal(signum, _frame) -> None:
        log.info("registry: signal %d, draining for up to %.0f s", signum, grace)
        done.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    while not done.wait(1.0):
        pass
    server.stop(grace).wait()
    return 0
