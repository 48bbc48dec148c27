"""The README's quick start, timed as a user meets it: `poe up` (an empty POE_HOME, no token
configured), `poe registry import pools/fashion-mnist`, then another process composes 60 class sets
it has not composed before, one after another, through the SDK. Prints one JSON line: the import's
seconds, p50 / p99 / max of the compositions, and the composer's template misses from /metrics
(compositions that waited for a model export on the request path).

    .venv/bin/python benchmarks/readme_order.py [--port 50991] [--metrics-port 9991] [--runs 1]

Every run starts from a new POE_HOME; `poe up` is stopped with Ctrl-C (SIGINT) at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POE = [sys.executable, "-m", "poe.cli"]
SETS = 60

# The client: a process of its own that knows only the SDK and the server's address.
CLIENT = r"""
import json, random, sys, time
from poe.client import Composer

classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
rng, seen = random.Random(int(sys.argv[2])), set()
while len(seen) < int(sys.argv[3]):
    seen.add(tuple(sorted(rng.sample(classes, rng.randint(2, 6)))))
ms = []
with Composer(sys.argv[1], retries=0) as composer:
    for class_set in sorted(seen, key=lambda s: rng.random()):
        t0 = time.perf_counter()
        composer.compose(list(class_set), pool="fashion-mnist")
        ms.append((time.perf_counter() - t0) * 1e3)
print(json.dumps(ms))
"""


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def template_misses(metrics_port: int) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if line.startswith("poe_compose_template_misses_total{"))


def one_run(port: int, metrics_port: int, seed: int) -> dict:
    home = tempfile.mkdtemp(prefix="poe-readme-order-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("POE_")} | {"POE_HOME": home}
    with open(Path(home) / "up.log", "w") as log:
        up = subprocess.Popen([*POE, "up", "--port", str(port), "--metrics-port", str(metrics_port)], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            for line in up.stdout:  # the banner says where it listens once it serves
                if "listening" in line:
                    break
            else:
                raise SystemExit(f"poe up ended before it listened; see {home}/up.log")
            t0 = time.monotonic()
            subprocess.run([*POE, "registry", "import", "pools/fashion-mnist", "--target", f"127.0.0.1:{port}"],
                           cwd=REPO, env=env, check=True, capture_output=True)
            imported = time.monotonic() - t0
            out = subprocess.run([sys.executable, "-c", CLIENT, f"127.0.0.1:{port}", str(seed), str(SETS)], cwd=REPO,
                                 env=env, check=True, capture_output=True, text=True)
            ms = json.loads(out.stdout.strip().splitlines()[-1])
            return {"import_s": round(imported, 2), "compositions": len(ms), "p50_ms": round(percentile(ms, 0.5), 1),
                    "p99_ms": round(percentile(ms, 0.99), 1), "max_ms": round(max(ms), 1),
                    "template_misses": template_misses(metrics_port)}
        finally:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(30)
            except subprocess.TimeoutExpired:
                up.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=50991)
    parser.add_argument("--metrics-port", type=int, default=9991)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    for run in range(args.runs):
        print(json.dumps({"run": run + 1, **one_run(args.port, args.metrics_port, seed=run)}), flush=True)


if __name__ == "__main__":
    main()
