"""`poe bench compose`: ComposeModel end to end over gRPC on loopback, against the product's latency targets.

Cases:
- warm: experts already in the composer's memory, each request a class set not composed before,
  for 1..5 primitive tasks: p50 / p99 latency as the client sees it, next to the floor: the time
  `torch.jit.save` alone takes for the same model (a pre-scripted module, saved to memory). The
  model format is TorchScript unless `format` says pt2, onnx or safetensors; the composer is warmed
  for that format (its templates made before the first request).
- cold: the composer's caches emptied before every request, so library and experts are fetched
  from the registry's blob store (an S3 server: moto's, on loopback) and verified: p50 / p99.
- throughput: distinct compositions per second with N concurrent clients, each on a connection of
  its own (as N client processes would be), against the composer in this process, or against
  `processes` composer processes sharing one port (`poe serve composer --processes`).

Three processes, as deployed, talking gRPC over 127.0.0.1: the registry (with its SQL store and
its blob store: moto's S3 server in the same process, or a folder), the composer (a server in
this process; the warm and cold cases' single client too) and, for the throughput case, the
clients. The composer's server CPU time per request is reported with the throughput (summed over
its processes).
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import multiprocessing
import os
import random
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import torch

from poe.bench.common import latency_summary
from poe.bench.report import hardware, hardware_line
from poe.client.composer import Composer
from poe.client.registry import RegistryClient
from poe.engine.compose import build, plan
from poe.engine.config import Secret, Settings
from poe.engine.export import TEMPLATED_FORMATS, quiet_jit, script
from poe.engine.pool import load as load_pool

TITLE = "ComposeModel latency and throughput (gRPC on loopback)"


def class_sets_by_tasks(pool, n_tasks: int, rng: random.Random) -> list[tuple[str, ...]]:
    """Every class set whose covering tasks number exactly `n_tasks`, shuffled."""
    tasks = list(pool.experts)
    out = []
    for combo in itertools.combinations(tasks, n_tasks):
        per_task = [[c for r in range(1, len(ids) + 1) for c in itertools.combinations(ids, r)]
                    for ids in (pool.hierarchy.tasks[t] for t in combo)]
        for pick in itertools.product(*per_task):
            out.append(tuple(pool.hierarchy.classes[i] for part in pick for i in part))
    rng.shuffle(out)
    return out


def _registry_process(env: dict[str, str], s3: bool, conn) -> None:
    """A registry server on a free port of 127.0.0.1, with moto's S3 server as its blob store when
    `s3`, until told to stop (runs in a child process)."""
    from poe_services.host import create_server

    moto = None
    if s3:
        from moto.server import ThreadedMotoServer

        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        moto.start()
        host_, port_ = moto.get_host_and_port()
        env = {**env, "POE_BLOB_URL": "s3://poe-bench", "POE_S3_ENDPOINT": f"{host_}:{port_}",
               "POE_S3_ACCESS_KEY": "bench", "POE_S3_SECRET_KEY": "bench-secret"}
    host = create_server("127.0.0.1:0", Settings.from_env(env), ("registry",), migrate=True)
    host.start()
    # Tokens valid only while this registry runs: one to import the pool, one for the composer.
    conn.send((host.port, host.issue_token("admin", "bench"), host.issue_token("service", "bench-composer")))
    conn.recv()
    host.stop(0).wait()
    if moto is not None:
        moto.stop()


def _start_stack(env: dict[str, str], record: bool, pool_dir: Path, s3: bool):
    """The registry in a process of its own, as deployed (its SQL store, blob uploads and hashing
    never share the composer's GIL), and the composer on a server in this process."""
    from poe_services.host import create_server

    ctx = multiprocessing.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    registry = ctx.Process(target=_registry_process, args=(env, s3, child_conn), name="bench-registry", daemon=True)
    registry.start()
    deadline = time.monotonic() + 120
    while not conn.poll(0.2):
        if not registry.is_alive() or time.monotonic() > deadline:
            registry.kill()
            raise RuntimeError(f"the benchmark's registry did not start (exit code {registry.exitcode})")
    port, admin_token, service_token = conn.recv()
    registry_target = f"127.0.0.1:{port}"
    with RegistryClient(registry_target, token=admin_token) as reg:
        pv, _ = reg.import_pool(pool_dir)
    settings = dataclasses.replace(Settings.from_env({**env, "POE_REGISTRY_ADDR": registry_target}),
                                   record_compositions=record, service_token=Secret(service_token))
    host = create_server("127.0.0.1:0", settings, ("composer",), registry_target=registry_target, warm=False)
    host.start()

    def stop() -> None:
        host.stop(0).wait()
        conn.send("stop")
        registry.join(30)

    return (host, f"127.0.0.1:{host.port}", f"{pv.name}@{pv.version}", stop, host.issue_token("reader", "bench"),
            settings, registry_target)


def jit_save_floor(pool, classes: tuple[str, ...]) -> float:
    p = plan(pool, list(classes))
    scripted = script(build(pool, p))
    best = float("inf")
    for _ in range(3):
        buf = io.BytesIO()
        t0 = time.perf_counter()
        with quiet_jit():
            torch.jit.save(scripted, buf, _extra_files={"poe.json": "{}"})
        best = min(best, time.perf_counter() - t0)
    return best


def throughput_clients(target: str, ref: str, class_sets: list[tuple[str, ...]], clients: int,
                       fmt: str = "torchscript", token: str = "") -> tuple[list[float], float]:
    """`clients` threads with a channel and TCP connection each compose `class_sets` as fast as they
    can (runs in a process of its own); returns every request's latency and the wall time."""
    import grpc

    todo = list(class_sets)
    lock = threading.Lock()
    # gRPC shares one connection among a process's channels to one target unless told otherwise; N
    # clients in production are N connections (which SO_REUSEPORT spreads over composer processes).
    options = Composer.channel_options(0) + [("grpc.use_local_subchannel_pool", 1)]
    channels = [Composer(channel=grpc.insecure_channel(target, options=options), token=token)
                for _ in range(clients)]
    seconds: list[float] = []

    def worker(k: int) -> None:
        while True:
            with lock:
                if not todo:
                    return
                cs = todo.pop()
            r = channels[k].compose(cs, pool=ref, format=fmt)
            with lock:
                seconds.append(r.seconds)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        list(ex.map(worker, range(clients)))
    wall = time.perf_counter() - t0
    for ch in channels:
        ch.channel.close()
    return seconds, wall


def _composer_process(settings: Settings, port: int, registry_target: str, ref: str, fmt: str, conn) -> None:
    """One of the throughput case's composer processes (spawned): a server on the shared `port`,
    warmed; reports its CPU time between "start" and "stop"."""
    from poe_services.host import create_server

    host = create_server(f"127.0.0.1:{port}", settings, ("composer",), registry_target=registry_target, warm=False,
                         reuse_port=True)
    host.start()
    engine = host.runtimes["composer"].engine
    try:
        engine.warm(ref, formats=(fmt,) if fmt in TEMPLATED_FORMATS else ())
        conn.send("ready")
        conn.recv()
        t0, templated = os.times(), engine.scripts.templated
        conn.recv()
        t1 = os.times()
        conn.send(((t1.user - t0.user) + (t1.system - t0.system), engine.scripts.templated - templated))
    finally:
        host.stop(0).wait()


def _start_composers(n: int, settings: Settings, registry_target: str, ref: str, fmt: str):
    """`n` composer processes sharing a free port of 127.0.0.1, warm: (target, pipes, processes)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    for i in range(n):
        conn, child = ctx.Pipe()
        p = ctx.Process(target=_composer_process, args=(settings, port, registry_target, ref, fmt, child),
                        name=f"bench-composer-{i}", daemon=True)
        p.start()
        pipes.append(conn)
        procs.append(p)
    for conn, p in zip(pipes, procs, strict=True):
        try:
            if not conn.poll(300):
                raise EOFError
            conn.recv()
        except EOFError:
            for q in procs:
                q.kill()
            raise RuntimeError(f"the benchmark's composer process {p.pid} did not warm up "
                               f"(exit code {p.exitcode})") from None
    return f"127.0.0.1:{port}", pipes, procs


def run(pool_dir: str | Path, home: Path, per_case: int = 40, cold: int = 20, clients: int = 16,
        throughput_requests: int = 400, s3: bool = True, seed: int = 0, record: bool = True,
        progress=lambda msg: None, fmt: str = "torchscript", processes: int = 1) -> dict:
    pool_dir = Path(pool_dir)
    pool = load_pool(pool_dir, with_oracle=False)
    rng = random.Random(seed)
    env = {"POE_HOME": str(home)}
    # The bench's clients call its own servers with a token only they know (not the caller's POE_TOKEN).
    host, target, ref, stop_stack, token, settings, registry_target = _start_stack(env, record, pool_dir, s3)
    engine = host.runtimes["composer"].engine
    result: dict = {"pool": ref, "blob_store": "s3 (moto)" if s3 else "file", "record_compositions": record,
                    "torch_threads": torch.get_num_threads(), "format": fmt, "cases": {}}
    try:
        progress(f"warming the composer ({fmt})")
        engine.warm(ref, formats=(fmt,) if fmt in TEMPLATED_FORMATS else ())
        sets = {n: class_sets_by_tasks(pool, n, rng) for n in range(1, len(pool.experts) + 1)}
        used: set[tuple[str, ...]] = set()

        def fresh(n: int | None = None) -> tuple[str, ...] | None:
            """A class set not requested before (with `n` tasks, or any when None)."""
            for k in ([n] if n is not None else rng.sample(sorted(sets), len(sets))):
                for cs in sets[k]:
                    if cs not in used:
                        used.add(cs)
                        return cs
            return None

        floor_sets: dict[int, list[tuple[str, ...]]] = {}
        with Composer(target, retries=0, token=token) as c:
            for n in sorted(sets):
                progress(f"warm case: {n} primitive task(s)")
                lat, templated = [], engine.scripts.templated
                for i in range(per_case):
                    cs = fresh(n)
                    if cs is None:  # e.g. one task: only 17 distinct class sets in Fashion-MNIST
                        break
                    r = c.compose(cs, pool=ref, format=fmt)
                    assert not r.header.cache_hit
                    lat.append(r.seconds)
                    if i < 5:
                        floor_sets.setdefault(n, []).append(cs)
                s = latency_summary(lat)
                s["archive_templates_made"] = engine.scripts.templated - templated
                result["cases"][f"warm_{n}"] = s
            progress("cold case")
            lat = []
            for _ in range(cold):
                engine.clear_tensor_cache()
                cs = fresh()
                r = c.compose(cs, pool=ref, format=fmt)
                lat.append(r.seconds)
            result["cases"]["cold"] = latency_summary(lat)
        progress(f"throughput: {throughput_requests} distinct compositions, {clients} clients"
                 + (f", {processes} composer processes" if processes > 1 else ""))
        todo = [cs for cs in (fresh() for _ in range(throughput_requests)) if cs is not None]
        pipes, procs = [], []
        try:
            if processes > 1:
                # A token every composer process accepts (a memory token is known to one process only).
                from poe_services import tokens

                tokens_file = home / "bench-composer-tokens.json"
                _, token = tokens.create(tokens_file, "reader", "bench clients")
                target, pipes, procs = _start_composers(
                    processes, dataclasses.replace(settings, tokens_file=tokens_file), registry_target, ref, fmt)
                for conn in pipes:
                    conn.send("start")
            templated, cpu0 = engine.scripts.templated, os.times()
            # The clients run in another process, as they would in production: here they would share
            # the composer's GIL and measure the benchmark's own Python as much as the service.
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
                seconds, wall = ex.submit(throughput_clients, target, ref, todo, clients, fmt, token).result()
            cpu1 = os.times()
            server_cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
            templates_made = engine.scripts.templated - templated
            if procs:
                server_cpu = templates_made = 0
                for conn in pipes:
                    conn.send("stop")
                    cpu, made = conn.recv()
                    server_cpu += cpu
                    templates_made += made
        finally:
            for p in procs:
                p.join(30)
                if p.exitcode is None:
                    p.kill()
        result["throughput"] = {"clients": clients, "processes": processes, "requests": len(seconds),
                                "compositions_per_s": round(len(seconds) / wall, 1), **latency_summary(seconds),
                                "server_cpu_ms_per_request": round(server_cpu / max(1, len(seconds)) * 1e3, 3),
                                "archive_templates_made": templates_made}
        # The floors last: each scripts a model, and TorchScript's compiled classes pile up in this
        # process (the composer itself scripts only a few structures).
        progress("jit.save floors")
        for n, class_sets in floor_sets.items():
            s = result["cases"][f"warm_{n}"]
            s["jit_save_floor_ms"] = round(statistics.median(jit_save_floor(pool, cs) for cs in class_sets) * 1e3, 3)
            s["p50_over_floor"] = round(s["p50_ms"] / s["jit_save_floor_ms"], 2)
    finally:
        stop_stack()
    return result


def markdown(result: dict, command: str) -> str:
    """The result as the Markdown that `--update-docs` writes: command, hardware, tables, targets."""
    cases, tput = result["cases"], result["throughput"]
    warm = [v for k, v in cases.items() if k.startswith("warm_")]
    lines = [f"Command: `{command}`", "",
             f"Model format **{result.get('format', 'torchscript')}**. "
             f"Measured on {hardware_line(hardware())}; composer with {result['torch_threads']} torch thread(s), "
             f"blob store {result['blob_store']}, recording of new compositions in the registry "
             f"**{'on' if result['record_compositions'] else 'off'}**."
             + (" *Quick run: the figures mean nothing.*" if result.get("quick") else ""), "",
             "| case | requests | p50 ms | p99 ms | mean ms | jit.save floor ms | p50 / floor | templates made |",
             "|---|---|---|---|---|---|---|---|"]
    for key, v in cases.items():
        name = f"warm, {key.split('_')[1]} task(s)" if key.startswith("warm_") else "cold (experts fetched)"
        lines.append(f"| {name} | {v['n']} | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} | {v['mean_ms']:.1f} | "
                     f"{v.get('jit_save_floor_ms', '') and format(v['jit_save_floor_ms'], '.1f')} | "
                     f"{v.get('p50_over_floor', '')} | {v.get('archive_templates_made', '')} |")
    procs = tput.get("processes", 1)
    lines += ["", f"Throughput: **{tput['compositions_per_s']:.0f} distinct compositions/s** with {tput['clients']} "
              f"concurrent clients (a connection each) in another process"
              + (f", against {procs} composer processes sharing the port" if procs > 1 else "")
              + f" ({tput['requests']} requests; latency under that load p50 "
              f"{tput['p50_ms']:.0f} ms, p99 {tput['p99_ms']:.0f} ms); the composer's server spent "
              f"{tput['server_cpu_ms_per_request']:.1f} ms of CPU per request.", ""]
    p50 = max(v["p50_ms"] for v in warm)
    p99 = max(v["p99_ms"] for v in warm)
    ratio = max(v["p50_over_floor"] for v in warm)

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    cold = cases["cold"]["p50_ms"]
    rate = tput["compositions_per_s"]
    lines.append("Targets, worst case over 1-5 tasks: "
                 f"warm p50 <= 10 ms: {p50:.1f} ms, {verdict(p50 <= 10)}; "
                 f"warm p99 <= 30 ms: {p99:.1f} ms, {verdict(p99 <= 30)}; "
                 f"within 3x of the `torch.jit.save` floor: {ratio:.2f}x, {verdict(ratio <= 3)}; "
                 f"cold p50 <= 150 ms: {cold:.1f} ms, {verdict(cold <= 150)}; "
                 f">= 200 compositions/s: {rate:.0f}/s, {verdict(rate >= 200)}.")
    return "\n".join(lines)
