"""`make demo`: the product end to end on the embedded default.

Starts `poe up` (registry, composer and extractor on one port, SQLite and file blobs under
POE_HOME), imports the shipped Fashion-MNIST pool, asks ComposeModel for a few class sets, checks
each model on the real test images of its classes next to the oracle restricted to the same
classes, prints a table and stops the services.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

QUERIES = [
    ["Sandal", "Sneaker", "Ankle boot"],
    ["Sandal", "Sneaker", "Bag"],
    ["T-shirt/top", "Shirt", "Pullover", "Coat"],
    ["Trouser", "Dress", "Bag"],
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_serving(target: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"poe up exited with status {proc.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service="poe.v1.Composer"), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise SystemExit(f"poe up did not become ready within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="poe-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", default=str(Path(__file__).resolve().parents[2] / "pools" / "fashion-mnist"))
    parser.add_argument("--out", default="out", help="where the composed models are written")
    args = parser.parse_args(argv)

    import torch

    from poe.client.composer import Composer
    from poe.engine.data import load_fashion_mnist
    from poe.engine.evaluate import evaluate_model, logits_of
    from poe.engine.nets import count_params
    from poe.engine.pool import load as load_pool

    torch.set_num_threads(os.cpu_count() or 1)
    # Import first, into the embedded registry under POE_HOME, so that `poe up` warms the composer
    # for this pool before it reports SERVING (the table then shows steady-state latencies).
    imp = subprocess.run([sys.executable, "-m", "poe.cli.main", "registry", "import", args.pool, "--target", "embedded",
                          "--json"], capture_output=True, text=True)
    if imp.returncode != 0:
        raise SystemExit(imp.stderr.strip().splitlines()[-1] if imp.stderr.strip() else "import failed")
    summary = json.loads(imp.stdout)
    ref = summary["pool"]
    print(f"demo: pool {ref} {'imported' if summary['created'] else 'already in the registry'} "
          f"({len(summary['experts'])} experts)", flush=True)
    port, metrics_port = _free_port(), _free_port()
    target = f"127.0.0.1:{port}"
    print(f"demo: starting `poe up` on {target} (metrics on :{metrics_port})", flush=True)
    env = {**os.environ, "POE_DEFAULT_POOL": ref.split("@")[0]}
    # The demo says itself when the services are ready; their INFO lines would interleave with its
    # output. Warnings and errors still show (and POE_LOG_LEVEL=INFO shows everything).
    env.setdefault("POE_LOG_LEVEL", "WARNING")
    proc = subprocess.Popen([sys.executable, "-m", "poe.cli.main", "up", "--port", str(port), "--metrics-port",
                             str(metrics_port), "--host", "127.0.0.1"], env=env)
    try:
        _wait_serving(target, proc)
        test = load_fashion_mnist("test")
        pool = load_pool(args.pool)
        oracle = pool.oracle()
        oracle_params = count_params(oracle)
        print(f"demo: oracle WRN-{pool.oracle_config.depth}-{pool.oracle_config.width}, {oracle_params:,} params; "
              f"evaluating on {len(test):,} real test images", flush=True)
        oracle_logits = logits_of(oracle, test.images)
        rows = []
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with Composer(target) as composer:
            for classes in QUERIES:
                r = composer.compose(classes, pool=ref)
                again = composer.compose(classes, pool=ref)  # served from the composer's cache
                model, meta = r.load()
                r.save(Path(args.out) / f"{r.header.model_id}.pt")
                ev = evaluate_model(model, meta["class_ids"], test, oracle_logits)
                rows.append((classes, r, again, ev))
        print()
        print(f"{'classes':<44} {'experts':>7} {'params':>9} {'of oracle':>9} {'PoE acc':>8} {'oracle':>7} "
              f"{'delta':>6} {'compose':>8} {'cached':>7}")
        for classes, r, again, ev in rows:
            name = ", ".join(classes) if len(classes) < 5 else f"all {len(classes)} classes"
            print(f"{name:<44} {len(r.header.tasks):>7} {r.header.params:>9,} "
                  f"{r.header.params / oracle_params:>9.1%} {ev.accuracy:>8.4f} {ev.oracle_accuracy:>7.4f} "
                  f"{100 * (ev.accuracy - ev.oracle_accuracy):>+6.2f} {r.seconds * 1e3:>6.1f}ms "
                  f"{again.seconds * 1e3:>5.1f}ms")
        print(f"\nmodels written to {args.out}/ (TorchScript; load with torch.jit.load)")
        return 0
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        print("demo: services stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
