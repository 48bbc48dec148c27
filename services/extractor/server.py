"""Running the extractor alone: `create_server(address, settings) -> (server, port)` and `serve()`.

`poe serve extractor` and `poe up` host it through `poe_services.host` instead; both attach the
same `ExtractorRuntime`. The extractor reaches the registry at `registry_target` (default
POE_REGISTRY_ADDR). Health is NOT_SERVING until the registry answers and the unfinished jobs it
lists have been queued for resumption, while the registry is unreachable, and during shutdown.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from poe.client.registry import RegistryClient
from poe.engine.config import Settings
from poe.engine.errors import Unavailable
from poe_services.errors import ErrorInterceptor
from poe_services.extractor.runtime import SERVICE_NAME, ExtractorRuntime
from poe_services.metrics import MetricsInterceptor

log = logging.getLogger(__name__)
GRPC_OPTIONS = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]


def create_server(address: str, settings: Settings, *, registry_target: str | RegistryClient | None = None,
                  max_workers: int = 16) -> tuple[grpc.Server, int]:
    """An extractor server bound to `address` (port 0: any free port), not started yet.

    Returns (server, port). `server.stop(grace)` stops the workers too (their jobs stay RUNNING and
    resume in the next extractor); the event it returns is set once they are gone.
    """
    runtime = ExtractorRuntime(settings, registry_target)
    try:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="extractor"),
                             interceptors=[MetricsInterceptor(), ErrorInterceptor()], options=GRPC_OPTIONS)
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        port = server.add_insecure_port(address)
        if not port:
            raise Unavailable(f"cannot listen on {address}")
        runtime.attach(server, health_servicer, overall=True)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    except BaseException:
        runtime.close()
        raise
    grpc_start, grpc_stop = server.start, server.stop

    def start() -> None:
        grpc_start()
        runtime.start()

    def stop(grace: float | None = None) -> threading.Event:
        runtime.begin_shutdown()
        stopped = grpc_stop(grace)
        done = threading.Event()

        def close() -> None:
            stopped.wait()
            try:
                runtime.close()
            finally:
                done.set()

        threading.Thread(target=close, name="extractor-close", daemon=True).start()
        return done

    server.start = start  # type: ignore[method-assign]
    server.stop = stop  # type: ignore[method-assign]
    server.extractor_runtime = runtime  # type: ignore[attr-defined]
    return server, port


def serve(settings: Settings, port: int = 50051, host: str = "[::]", grace: float = 10.0,
          registry_target: str | None = None) -> int:
    """Run the extractor until SIGTERM/SIGINT; returns an exit status."""
    server, bound = create_server(f"{host}:{port}", settings, registry_target=registry_target)
    server.start()
    log.info("extractor listening on %s:%d (registry %s, runs in %s)", host, bound,
             registry_target or settings.registry_addr, settings.home / "extractions")
    print(f"poe.v1.Extractor listening on port {bound}", flush=True)
    done = threading.Event()

    def on_signal(signum, _frame) -> None:
        log.info("extractor: signal %d, stopping (running jobs resume on the next start)", signum)
        done.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    while not done.wait(1.0):
        pass
    server.stop(grace).wait()
    return 0
