#!/usr/bin/env python3
"""Container health check: is a PoE service SERVING on grpc.health.v1?

Used by the image's HEALTHCHECK (docker, podman, compose). Kubernetes does not run it: the chart and
the manifests use native gRPC probes against the same health service.

    grpc_health_probe.py [--addr HOST:PORT] [--service NAME] [--timeout SECONDS]

The address defaults to $POE_HEALTH_ADDR, else 127.0.0.1:$POE_PORT, else 127.0.0.1:50051; the
service to "" (the whole server). Exit status 0 when SERVING, 1 otherwise (NOT_SERVING, unknown
service, nothing listening, timeout), with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys


def default_addr() -> str:
    return os.environ.get("POE_HEALTH_ADDR") or f"127.0.0.1:{os.environ.get('POE_PORT') or 50051}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--addr", default=default_addr(), help="host:port of the gRPC server")
    parser.add_argument("--service", default="", help='health service name ("" = whole server)')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(args.addr) as channel:
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
