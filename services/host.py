"""One gRPC server hosting any of the three services (DESIGN.md, "Addresses").

`poe up` hosts registry, composer and extractor on one port; `poe serve NAME` hosts one (what
Kubernetes runs). Every server gets the same interceptors (metrics outside, error mapping inside),
grpc.health.v1 (per service, and "" for the whole server) and server reflection.
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
from poe.engine.errors import InvalidArgument, Unavailable
from poe_services.errors import ErrorInterceptor
from poe_services.metrics import MetricsInterceptor, serve_metrics

log = logging.getLogger(__name__)

SERVICES = ("registry", "composer", "extractor")
SERVICE_NAMES = {"registry": "poe.v1.Registry", "composer": "poe.v1.Composer", "extractor": "poe.v1.Extractor"}
GRPC_OPTIONS = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Health name for liveness probes: SERVING while the process answers gRPC. Readiness follows each
# service (a composer whose registry is down is NOT_SERVING); liveness must not, or an outage of
# the registry would restart every composer and extractor.
LIVENESS = "liveness"


class Host:
    """A started-or-not server and the runtimes it hosts."""

    def __init__(self, server: grpc.Server, port: int, runtimes: dict, health_servicer: health.HealthServicer):
        self.server, self.port, self.runtimes, self.health = server, port, runtimes, health_servicer
        self._overall = threading.Thread(target=self._watch_overall, name="health-overall", daemon=True)
        self._stop = threading.Event()

    def start(self) -> None:
        self.server.start()
        for rt in self.runtimes.values():
            if hasattr(rt, "start"):
                rt.start()
        self._overall.start()

    def _watch_overall(self) -> None:
        # "" is SERVING only while every hosted service is.
        while not self._stop.wait(0.2):
            statuses = []
            for name in self.runtimes:
                try:
                    resp = self.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAMES[name]), None)
                    statuses.append(resp.status)
                except Exception:
                    statuses.append(NOT_SERVING)
            self.health.set("", SERVING if all(s == SERVING for s in statuses) else NOT_SERVING)

    def stop(self, grace: float | None = 10.0) -> threading.Event:
        """NOT_SERVING first, then stop accepting and let in-flight streams finish within `grace`."""
        self._stop.set()
        self.health.set("", NOT_SERVING)
        for rt in self.runtimes.values():
            rt.begin_shutdown()
        stopped = self.server.stop(grace)

        def close() -> None:
            stopped.wait()
            for rt in self.runtimes.values():
                rt.close()

        threading.Thread(target=close, name="host-close", daemon=True).start()
        return stopped


def create_server(address: str, settings: Settings, services: tuple[str, ...] = SERVICES, *,
                  registry_target: str | None = None, migrate: bool | None = None, warm: bool = True,
                  max_workers: int = 32) -> Host:
    """A server bound to `address` (port 0 picks a free one) hosting `services`; not started.

    Composer and extractor reach the registry at `registry_target`, or on this very server when
    it hosts the registry, else at settings.registry_addr.
    """
    unknown = [s for s in services if s not in SERVICES]
    if unknown or not services:
        raise InvalidArgument(f"services: expected some of {', '.join(SERVICES)}, got {', '.join(unknown) or 'none'}")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="poe-rpc"),
                         interceptors=[MetricsInterceptor(), ErrorInterceptor()], options=GRPC_OPTIONS)
    port = server.add_insecure_port(address)
    if not port:
        raise Unavailable(f"cannot listen on {address}")
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("", NOT_SERVING)
    health_servicer.set(LIVENESS, SERVING)
    if registry_target is None and "registry" in services:
        registry_target = f"127.0.0.1:{port}"
    runtimes: dict = {}
    try:
        if "registry" in services:
            from poe_services.registry.server import RegistryRuntime

            runtimes["registry"] = RegistryRuntime(settings, migrate=migrate)
        if "composer" in services:
            from poe_services.composer.runtime import ComposerRuntime

            runtimes["composer"] = ComposerRuntime(settings, registry_target, warm=warm)
        if "extractor" in services:
            from poe_services.extractor.runtime import ExtractorRuntime

            runtimes["extractor"] = ExtractorRuntime(settings, registry_target)
        for rt in runtimes.values():
            rt.attach(server, health_servicer)
    except BaseException:
        for rt in runtimes.values():
            rt.close()
        raise
    names = [SERVICE_NAMES[s] for s in runtimes]
    reflection.enable_server_reflection(
        (*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    return Host(server, port, runtimes, health_servicer)


def run(settings: Settings, services: tuple[str, ...], port: int, metrics_port: int | None, host: str = "[::]",
        grace: float = 10.0, migrate: bool | None = None, banner=print) -> int:
    """Serve until SIGTERM/SIGINT: NOT_SERVING, then drain in-flight calls for up to `grace` s."""
    h = create_server(f"{host}:{port}", settings, services, migrate=migrate)
    bound_metrics = serve_metrics(metrics_port) if metrics_port is not None else None
    h.start()
    names = ", ".join(SERVICE_NAMES[s] for s in h.runtimes)
    banner(f"poe: {names} on {host}:{h.port}" + (f"; metrics on :{bound_metrics}/metrics" if bound_metrics else ""))
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(0.5):
        pass
    banner("poe: stopping (draining in-flight calls)")
    h.stop(grace).wait()
    return 0
