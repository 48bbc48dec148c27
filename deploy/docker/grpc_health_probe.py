#!/usr/bin/env python3
"""Container health check: is a PoE service SERVING on grpc.health.v1?

Used by the image's HEALTHCHECK (docker, podman, compose), by the Helm chart's `helm test` Pod, and
as the Kubernetes exec probe when the services serve TLS (the kubelet's native gRPC probe speaks
plaintext only).

    grpc_health_probe.py [--addr HOST:PORT] [--service NAME] [--timeout SECONDS]
                         [--tls-ca FILE] [--tls-cert FILE --tls-key FILE] [--tls-server-name NAME]

The address defaults to $POE_HEALTH_ADDR, else 127.0.0.1:$POE_PORT, else 127.0.0.1:50051; the
service to "" (the whole server). With a CA bundle (--tls-ca, default $POE_TLS_CA) the probe speaks
TLS and verifies the server's certificate against it, for the name --tls-server-name (default
$POE_TLS_SERVER_NAME, else the address's host); --tls-cert/--tls-key (default $POE_TLS_CERT,
$POE_TLS_KEY) present a client certificate to a server that requires one. These are the variables
the services' own clients read, so inside a PoE container the probe needs no TLS flag but the name.
Health needs no token. Exit status 0 when SERVING, 1 otherwise (NOT_SERVING, unknown service,
nothing listening, timeout, TLS failure), with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys


def default_addr() -> str:
    return os.environ.get("POE_HEALTH_ADDR") or f"127.0.0.1:{os.environ.get('POE_PORT') or 50051}"


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def open_channel(args: argparse.Namespace):
    import grpc

    if not args.tls_ca:
        return grpc.insecure_channel(args.addr)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(args.tls_ca),
        private_key=_read(args.tls_key) if args.tls_key else None,
        certificate_chain=_read(args.tls_cert) if args.tls_cert else None,
    )
    # The certificate names the Service, not 127.0.0.1: verify it for the name given.
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    return grpc.secure_channel(args.addr, credentials, options=options)


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--addr", default=default_addr(), help="host:port of the gRPC server")
    parser.add_argument("--service", default="", help='health service name ("" = whole server)')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    parser.add_argument("--tls-ca", default=env("POE_TLS_CA", ""), help="CA bundle (PEM): speak TLS, verify with it")
    parser.add_argument("--tls-cert", default=env("POE_TLS_CERT", ""), help="client certificate (PEM), mutual TLS")
    parser.add_argument("--tls-key", default=env("POE_TLS_KEY", ""), help="its private key (PEM)")
    parser.add_argument("--tls-server-name", default=env("POE_TLS_SERVER_NAME", ""),
                        help="name expected in the server's certificate (default: the address's host)")
    args = parser.parse_args(argv)

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        channel = open_channel(args)
    except (OSError, ValueError) as e:
        print(f"unhealthy: {args.addr} {args.service!r}: {e}", file=sys.stderr)
        return 1
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"unhealthy: {args.addr} {args.service!r}: {e.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {args.addr} {args.service!r}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
