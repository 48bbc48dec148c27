"""The composer as a hosted service (poe_services.host): engine, health (NOT_SERVING until warm), shutdown."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import grpc
import torch
from grpc_health.v1 import health_pb2

from poe.client.registry import RegistryClient
from poe.engine.config import Settings
from poe.engine.errors import NotFound, PoeError
from poe_services.composer.engine import ComposerEngine
from poe_services.composer.servicer import SERVICE_NAME, add_to_server

if TYPE_CHECKING:
    from poe_services.host import HealthReporter

log = logging.getLogger(__name__)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ComposerRuntime:
    """Owns the engine and its registry client; reports SERVING once the default pool is warm
    (or known not to exist: other pools can still be served)."""

    def __init__(self, settings: Settings, registry_target: str | None = None, warm: bool = True):
        self.settings = settings
        if settings.composer_threads > 0:
            # Composing concatenates small tensors, which intra-op threads do not speed up; with
            # several threads, their spin-waits compete with the gRPC threads (measured with
            # `poe bench compose`: about 10% more compositions/s, and steadier, with one).
            torch.set_num_threads(settings.composer_threads)
        self.registry = RegistryClient(registry_target or settings.registry_addr, timeout=30.0)
        self.engine = ComposerEngine(self.registry, settings)
        self._warm = warm
        self._stop = threading.Event()
        self.ready = threading.Event()
        self.health: HealthReporter | None = None
        self.closed = False

    def attach(self, server: grpc.Server, health: HealthReporter, /) -> None:
        """Add the Composer servicer to `server`; report "poe.v1.Composer" through `health`."""
        add_to_server(self.engine, server)
        self.health = health
        self._set(NOT_SERVING)

    def start(self) -> None:
        """Warm up in the background (call after the server has started: in `poe up` the registry
        this composer reads from is served by the same server)."""
        threading.Thread(target=self._warm_up, name="composer-warm", daemon=True).start()

    def _set(self, status) -> None:
        if self.health is not None:
            self.health.set(SERVICE_NAME, status)

    def _warm_up(self) -> None:
        delay = 0.2
        while not self._stop.is_set():
            try:
                if self._warm:
                    view = self.engine.warm()
                    log.info("composer: warm (%s, %d experts)", view.ref, len(view.pool.experts))
                else:
                    self.registry.wait_ready(timeout=5.0)
                break
            except NotFound as e:
                log.warning("composer: default pool not warmed: %s", e)
                break
            except PoeError as e:
                log.info("composer: waiting for the registry (%s)", e)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
        if not self._stop.is_set():
            self.ready.set()
            self._set(SERVING)

    def begin_shutdown(self) -> None:
        self._stop.set()
        self._set(NOT_SERVING)

    def close(self) -> None:
        self.begin_shutdown()
        if not self.closed:
            self.closed = True
            self.engine.close()
            self.registry.close()
