"""The registry as a hosted service (poe_services.host): database engine, blob store, health.

Health is NOT_SERVING while the database or the blob store does not answer (probed every
`POE_REGISTRY_HEALTH_INTERVAL` seconds) and during shutdown. A probe that finds both answering
also finishes the undos of uploads whose COMMIT failed and whose undo failed too (core.Registry).

Start-up refuses (FailedPrecondition naming `poe registry migrate`) when the database schema is
not current, unless settings.registry_auto_migrate (POE_REGISTRY_AUTO_MIGRATE) or `migrate=True`
asks to migrate first. When the database is unreachable at start-up the registry starts anyway,
NOT_SERVING, and checks the schema as soon as the database answers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2

from poe.engine.config import Settings
from poe.engine.errors import FailedPrecondition, Unavailable
from poe.v1 import registry_pb2_grpc
from poe_services.auth import UploadQuota
from poe_services.registry import db
from poe_services.registry.blobstore import UploadSweeper, open_blob_store
from poe_services.registry.core import Registry
from poe_services.registry.maintenance import sweep_leftovers
from poe_services.registry.servicer import SERVICE_NAME, RegistryServicer
from poe_services.registry.sqlstore import SqlRegistryStore

if TYPE_CHECKING:
    from poe_services.host import HealthReporter

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class RegistryRuntime:
    """Store, blob store and health monitor of one registry instance (a host ServiceRuntime)."""

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
        # Aborts multipart uploads an S3 outage cut off: woken each time the registry turns SERVING.
        self._upload_sweeper = UploadSweeper(blobs, settings.s3_upload_sweep_interval, settings.s3_stale_upload_age)
        self.health: HealthReporter | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: int | None = None
        self._pool_listeners: list[Callable[[], None]] = []
        self.closed = False

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
                self._upload_sweeper.wake()  # at start-up, and after an outage that may have cut uploads off
            elif self._stop.is_set():
                log.info("registry: NOT_SERVING: shutting down")
            else:
                log.warning("registry: NOT_SERVING: %s", "; ".join(problems))
            self._last = status
        if status == SERVING and self.registry.pending_undos:
            self.registry.finish_undos()  # blobs of uploads whose COMMIT and undo both failed
        if self.health is not None:
            self.health.set(SERVICE_NAME, status)
        return status == SERVING

    def on_pools_changed(self, listener: Callable[[], None]) -> None:
        """Call `listener` after each publication or alias move, once committed, in the RPC's thread
        and before its answer (so a listener may hold the answer back until it has acted on it)."""
        self._pool_listeners.append(listener)

    def _pools_changed(self) -> None:
        for listener in self._pool_listeners:
            try:
                listener()
            except Exception:  # a listener's failure never fails the publication, which is committed
                log.exception("registry: a pools-changed listener failed")

    def attach(self, server: grpc.Server, health: HealthReporter, /) -> None:
        """Add the Registry servicer to `server`; report "poe.v1.Registry" through `health`."""
        registry_pb2_grpc.add_RegistryServicer_to_server(
            RegistryServicer(self.registry, UploadQuota(self.settings.upload_quota_bytes), self._pools_changed),
            server)
        self.health = health
        self.check_health()

    def start(self) -> None:
        """Probe the database and the blob store every POE_REGISTRY_HEALTH_INTERVAL seconds."""
        log.info("registry: database %s, blobs %s", db.redact(self.settings.database_url), self.settings.blob_url)
        # Leftovers of uploads that a crash interrupted (older than an hour: never one in flight).
        threading.Thread(target=sweep_leftovers, args=(self.registry.blobs,), name="registry-sweep",
                         daemon=True).start()
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._monitor, name="registry-health", daemon=True)
            self._thread.start()
            self._upload_sweeper.start()

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
            self.health.set(SERVICE_NAME, NOT_SERVING)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._upload_sweeper.stop()

    def close(self) -> None:
        """begin_shutdown(), then release the database and blob store connections."""
        self.begin_shutdown()
        if not self.closed:
            self.closed = True
            self.registry.close()
