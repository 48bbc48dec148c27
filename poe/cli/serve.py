"""`poe serve NAME` and `poe up`: run services (one per process in Kubernetes, all in one locally).

Every command that serves (these two and `poe registry serve`) goes through
poe_services.host.run: one server builder, one signal loop.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from poe.cli.registry import _add_storage_flags, _settings
from poe.engine.errors import InvalidArgument

# Seconds a server keeps serving after turning NOT_SERVING on SIGTERM. In Kubernetes (`poe serve`),
# one readiness probe period of the chart (5 s), so that the kubelet and the balancers see the pod
# go before its port closes; `poe up` has nobody balancing across it.
SERVE_DRAIN = 5.0
UP_DRAIN = 0.0


def run_services(args: argparse.Namespace, services: tuple[str, ...], migrate: bool | None,
                 default_drain: float = SERVE_DRAIN, processes: int = 1) -> int:
    """Host `services` with the flags of add_serve_flags until SIGTERM/SIGINT, in `processes`
    processes sharing the port when more than one."""
    from poe_services.host import run, run_processes

    cfg = _with_server_tls(_settings(args), args)
    drain = args.drain if args.drain is not None else \
        cfg.shutdown_drain if cfg.shutdown_drain is not None else default_drain
    if drain < 0:
        raise InvalidArgument(f"--drain (POE_SHUTDOWN_DRAIN): must be >= 0 seconds, got {drain:g}")
    grace = args.grace if args.grace is not None else cfg.shutdown_grace
    if grace < 0:
        raise InvalidArgument(f"--grace (POE_SHUTDOWN_GRACE): must be >= 0 seconds, got {grace:g}")
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if processes > 1:
        return run_processes(cfg, services, args.port, args.metrics_port, processes, host=args.host, grace=grace,
                             drain=drain, migrate=migrate, banner=lambda msg: print(msg, flush=True))
    return run(cfg, services, args.port, args.metrics_port, host=args.host, grace=grace, drain=drain,
               migrate=migrate, banner=lambda msg: print(msg, flush=True))


def _with_server_tls(cfg, args: argparse.Namespace):
    """`cfg` with the server TLS flags given (a flag wins over its POE_TLS_* variable)."""
    given = {"tls_server_cert": args.tls_server_cert, "tls_server_key": args.tls_server_key,
             "tls_client_ca": args.tls_client_ca}
    return replace(cfg, **{name: Path(value).expanduser() for name, value in given.items() if value})


def cmd_serve(args: argparse.Namespace) -> int:
    from poe_services.host import SERVICES

    services = SERVICES if args.service == "all" else (args.service,)
    if args.processes < 1 or (args.processes > 1 and args.service != "composer"):
        raise InvalidArgument(f"--processes: the composer runs in 1 or more processes, every other service in one; "
                              f"got {args.processes} for {args.service}")
    return run_services(args, services, True if args.migrate else None, processes=args.processes)


def cmd_up(args: argparse.Namespace) -> int:
    from poe_services.tokens import bootstrap_admin_token

    cfg = _settings(args)
    embedded = cfg.database_url.startswith("sqlite")
    cfg.home.mkdir(parents=True, exist_ok=True)
    written = bootstrap_admin_token(cfg)
    if written is not None:
        print(f"poe up: admin token written to {written} (owner-only); the CLI on this machine uses it",
              file=sys.stderr, flush=True)
    print(f"poe up: state in {cfg.home} ({'embedded SQLite' if embedded else 'external database'}, "
          f"blobs {cfg.blob_url})", file=sys.stderr, flush=True)
    # The embedded database belongs to this process: bring its schema to head on start.
    return run_services(args, ("registry", "composer", "extractor"), True if (embedded or args.migrate) else None,
                        default_drain=UP_DRAIN)


def add_serve_flags(p: argparse.ArgumentParser, default_host: str = "[::]") -> None:
    """The flags of every command that serves."""
    p.add_argument("--port", type=int, default=50051,
                   help="gRPC port for every hosted service (default 50051; 0 picks a free one)")
    p.add_argument("--metrics-port", type=int, default=9464,
                   help="Prometheus /metrics port (default 9464; 0 picks a free one)")
    where = "all interfaces" if default_host == "[::]" else default_host
    p.add_argument("--host", default=default_host,
                   help=f"address to listen on (default {where}; anonymous callers may read only on a loopback "
                        "address, see POE_ANONYMOUS_ROLE)")
    p.add_argument("--grace", type=float, default=None,
                   help="seconds in-flight calls may take on shutdown, after the drain; then they are cancelled "
                        "(default POE_SHUTDOWN_GRACE, else 10)")
    p.add_argument("--drain", type=float, default=None,
                   help="seconds to keep serving after turning NOT_SERVING on SIGTERM, so that probes and balancers "
                        f"see it first (default POE_SHUTDOWN_DRAIN, else {SERVE_DRAIN:g} for `serve`, "
                        f"{UP_DRAIN:g} for `up`)")
    p.add_argument("--migrate", action="store_true",
                   help="migrate the registry's schema before starting (default: refuse an out-of-date schema)")
    _add_storage_flags(p)
    tls = p.add_argument_group("TLS of this server (also POE_TLS_SERVER_CERT, POE_TLS_SERVER_KEY, POE_TLS_CLIENT_CA)")
    tls.add_argument("--tls-server-cert", metavar="FILE",
                     help="certificate chain (PEM) for the gRPC port and /metrics; with --tls-server-key: TLS only")
    tls.add_argument("--tls-server-key", metavar="FILE", help="the private key (PEM, unencrypted) of --tls-server-cert")
    tls.add_argument("--tls-client-ca", metavar="FILE",
                     help="CA bundle (PEM): every client must present a certificate it signed (mutual TLS)")


def add_parsers(sub) -> None:
    s = sub.add_parser("serve", help="run one service (registry, composer, extractor) or all on one port")
    s.add_argument("service", choices=["registry", "composer", "extractor", "all"])
    s.add_argument("--processes", type=int, default=1,
                   help="composer only: this many server processes sharing the port (SO_REUSEPORT), each with its "
                        "own engine and warm-up, /metrics of all served by the parent (default 1)")
    add_serve_flags(s)
    s.set_defaults(func=cmd_serve)

    u = sub.add_parser("up", help="run all three services locally on one port with the embedded defaults")
    # Local by default: anonymous callers may read only while nothing but this machine can connect.
    add_serve_flags(u, default_host="127.0.0.1")
    u.set_defaults(func=cmd_up)
