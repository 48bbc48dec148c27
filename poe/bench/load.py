"""`poe bench load`: the services under a mixed load from many clients, on loopback.

`clients` clients, each in a process of its own (multiprocessing, spawn), call as fast as they can
for `warmup` + `seconds` seconds (only the last `seconds` are counted) a mix of:

- ComposeModel of a class set not asked for before (2 to 4 classes of the pool, in one of the
  formats asked for; once every set has been asked for, they come round again and are cache hits),
- ComposeModel of one of a few popular class sets (cache hits after the first),
- DescribeComposition, ListPools and GetPool,

against a server that hosts registry, composer and extractor on one port as `poe up` does, started
by the benchmark in a process of its own with the pool imported and warmed for every format the
clients ask for (or against `target`, a server that already serves the pool).

With `watch_streams` or `stuck_streams`, a second phase runs the same mix on the same server (its
composed-model cache emptied first, as before the first, so that both phases compose as much)
while another process keeps `watch_streams` WatchExtraction streams open on an extraction job that
does not move, and `stuck_streams` ComposeModel streams that it never reads (its channels announce
a 1 KiB HTTP/2 window and no more, so the server's write waits as it would for any client that
stopped reading). Both kinds are opened before the phase's warm-up. The report compares the other
clients' latency in both phases.

Per phase: operations per second, p50 / p99 / max latency per operation as the client sees it, errors
by status code, the server's RSS (once listening, once warm, after the load's warm-up, at the end),
compositions that waited for an export (poe_compose_template_misses_total) and calls cancelled
because their client did not read (poe_grpc_stream_write_cancels_total).

This module imports no torch: the client processes start in about a second each.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import random
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

TITLE = "Mixed load: isolation, backpressure and memory (gRPC on loopback)"
# Operation -> share of the calls.
MIX = {"compose_new": 0.35, "compose_repeat": 0.25, "describe": 0.15, "list_pools": 0.10, "get_pool": 0.15}
COMPOSE_OPS = ("compose_new", "compose_repeat")
READ_OPS = ("describe", "list_pools", "get_pool")
# Share of the compositions in each format, among the formats asked for (the rest: torchscript).
FORMAT_SHARE = {"pt2": 0.2, "onnx": 0.2}
POPULAR_SETS = 16
CALL_TIMEOUT = 30.0  # seconds, every client call
# Targets (docs/BENCHMARKS.md): p99 of ComposeModel and of reads, refusals, the streams' effect, memory.
COMPOSE_P99_MS, READ_P99_MS, REFUSED_SHARE, STREAMS_FACTOR, RSS_GROWTH = 300.0, 100.0, 0.01, 2.0, 0.10
# The HTTP/2 window a stuck client announces: a client that stopped reading.
STUCK_CHANNEL_OPTIONS = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
STREAMS_PER_CHANNEL = 10


def class_sets(classes: list[str], sizes: tuple[int, ...] = (2, 3, 4)) -> list[tuple[str, ...]]:
    return [cs for k in sizes for cs in itertools.combinations(classes, k)]


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))]


def _rss_mb() -> float:
    """This process's resident memory in MiB (Linux)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return round(kib / 1024, 1)


# -- the server (a process of its own) ------------------------------------------------------------

def _server_process(home: str, pool_dir: str, formats: tuple[str, ...], watched_job: bool, conn) -> None:
    """Registry, composer and extractor on one loopback port, as `poe up`; the pool imported and
    warmed for `formats`. Answers "stats" (and "reset") with its figures until told "stop"."""
    import sys
    import traceback

    status = 0
    try:
        _serve(home, pool_dir, formats, watched_job, conn)
    except BaseException:
        traceback.print_exc()
        status = 1
    # Without the interpreter's finalization, as `poe up` (poe_services.host.run): a warm-up thread
    # may still be inside torch.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _serve(home: str, pool_dir: str, formats: tuple[str, ...], watched_job: bool, conn) -> None:
    from poe.client.registry import RegistryClient
    from poe.engine.config import Settings
    from poe.engine.manifest import read_manifest
    from poe_services.host import create_server

    name = read_manifest(pool_dir)["name"]
    env = {"POE_HOME": home, "POE_DEFAULT_POOL": name, "POE_COMPOSER_WARM_FORMATS": ",".join(formats),
           "POE_COMPOSER_POOL_POLL": "1"}
    host = create_server("127.0.0.1:0", Settings.from_env(env), migrate=True)
    host.start()
    t0 = time.perf_counter()
    rss_start = _rss_mb()
    target = f"127.0.0.1:{host.port}"
    admin, reader = host.issue_token("admin", "bench-load"), host.issue_token("reader", "bench-load")
    with RegistryClient(target, token=admin) as registry:
        pv, _ = registry.import_pool(pool_dir)
    job = ""
    if watched_job:  # a job record that no extractor runs: its watchers wait for ever
        with RegistryClient(target, token=host.issue_token("service", "bench-load")) as registry:
            job = registry.create_job({"purpose": "watched by poe bench load"}).id
    ref = f"{pv.name}@{pv.version}"
    composer = host.runtimes["composer"]
    deadline = time.monotonic() + 3600
    while composer.warm_formats(ref) != formats:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the composer did not warm {ref} for {', '.join(formats)} within an hour")
        time.sleep(0.2)
    conn.send({"port": host.port, "token": reader, "ref": ref, "job": job, "warm_s": round(time.perf_counter() - t0, 1),
               "rss_start_mb": rss_start, "rss_warm_mb": _rss_mb()})
    while (command := conn.recv()) != "stop":
        if command == "reset":  # between phases: every class set composes again
            composer.engine.clear_model_cache()
        conn.send(_server_figures())
    host.stop(4).wait(30)  # queued recordings get their half of the grace


def _server_figures() -> dict:
    from prometheus_client import REGISTRY

    misses, cancels, refused, caches, queued = {}, Counter(), Counter(), 0.0, 0
    for family in REGISTRY.collect():
        for s in family.samples:
            if s.name == "poe_compose_cache_bytes":
                caches += s.value
            elif s.name == "poe_compose_recordings_queued":
                queued = int(s.value)
            elif s.name == "poe_compose_template_misses_total":
                misses[s.labels["format"]] = int(s.value)
            elif s.name == "poe_grpc_stream_write_cancels_total":
                cancels[f"{s.labels['grpc_method']} {s.labels['reason']}"] += int(s.value)
            elif s.name == "grpc_server_handled_total" and s.labels.get("grpc_code") == "RESOURCE_EXHAUSTED":
                refused[s.labels["grpc_method"]] += int(s.value)
    cpu = os.times()
    return {"rss_mb": _rss_mb(), "cpu_s": cpu.user + cpu.system, "at": time.monotonic(),
            "caches_mb": round(caches / 2**20, 1), "recordings_queued": queued,
            "threads": threading.active_count(),
            "template_misses": misses, "write_cancels": dict(cancels), "refused": dict(refused)}


# -- the clients (a process each) -----------------------------------------------------------------

def _client_process(k: int, target: str, token: str | None, ref: str, new: dict[str, list], shares: dict[str, float],
                    popular: list, seconds: float, warmup: float, seed: int, ready, go, results) -> None:
    from poe.client.composer import Composer
    from poe.client.registry import RegistryClient
    from poe.engine.errors import PoeError

    rng = random.Random(seed * 1000 + k)
    composer = Composer(target, retries=0, timeout=CALL_TIMEOUT, token=token)
    registry = RegistryClient(target, retries=0, timeout=CALL_TIMEOUT, token=token)
    composer.wait_ready(60)
    registry.wait_ready(60)
    ready.put(k)
    go.wait()
    start = time.perf_counter()
    counted_from, end = start + warmup, start + warmup + seconds
    fresh = {fmt: itertools.cycle(sets) for fmt, sets in new.items()}
    ops, weights = list(MIX), list(MIX.values())
    formats, format_weights = list(shares), list(shares.values())
    latencies: dict[str, list[float]] = {op: [] for op in MIX}
    codes: Counter = Counter()
    warmup_errors: Counter = Counter()  # not counted, but reported
    new_hits = 0
    while (t0 := time.perf_counter()) < end:
        op = rng.choices(ops, weights)[0]
        code, hit = "OK", False
        try:
            if op in COMPOSE_OPS:
                if op == "compose_new":
                    fmt = rng.choices(formats, format_weights)[0]
                    classes = next(fresh[fmt])
                else:
                    classes, fmt = rng.choice(popular)
                hit = composer.compose(classes, pool=ref, format=fmt).header.cache_hit
            elif op == "describe":
                composer.describe(rng.choice(popular)[0], pool=ref)
            elif op == "list_pools":
                list(registry.list_pools())
            else:
                registry.get_pool(ref)
        except PoeError as e:
            code = e.code
        except Exception as e:  # noqa: BLE001 - counted by kind, the run goes on
            code = type(e).__name__
        seconds_taken = time.perf_counter() - t0
        if t0 < counted_from and code != "OK":
            warmup_errors[code] += 1
        if t0 >= counted_from:
            codes[(op, code)] += 1
            if code == "OK":
                latencies[op].append(seconds_taken)
                if op == "compose_new" and hit:
                    new_hits += 1
    composer.close()
    registry.close()
    results.put({"latencies": latencies, "codes": dict(codes), "new_hits": new_hits,
                 "warmup_errors": dict(warmup_errors)})


def _streams_process(target: str, token: str | None, ref: str, job: str, watches: int, stuck: int,
                     classes: tuple[str, ...], ready, stop, results) -> None:
    """`watches` WatchExtraction streams read as updates come, and `stuck` ComposeModel streams
    never read, until `stop`; then how each ended (or OPEN)."""
    import grpc

    from poe.v1 import composer_pb2, extractor_pb2, extractor_pb2_grpc
    from poe.v1 import composer_pb2_grpc as composer_grpc

    metadata = (("authorization", f"Bearer {token}"),) if token else None
    watch_channel = grpc.insecure_channel(target)
    watch_stub = extractor_pb2_grpc.ExtractorStub(watch_channel)
    watch_calls = [watch_stub.WatchExtraction(extractor_pb2.WatchExtractionRequest(job_id=job), metadata=metadata)
                   for _ in range(watches)]

    def read(call) -> None:
        try:
            for _ in call:
                pass
        except grpc.RpcError:
            pass

    for call in watch_calls:
        threading.Thread(target=read, args=(call,), daemon=True).start()
    stuck_channels = [grpc.insecure_channel(target, options=STUCK_CHANNEL_OPTIONS)
                      for _ in range(max(1, -(-stuck // STREAMS_PER_CHANNEL)))]
    request = composer_pb2.ComposeModelRequest(pool=ref, classes=list(classes))
    stuck_calls = [composer_grpc.ComposerStub(stuck_channels[i % len(stuck_channels)]).ComposeModel(
        request, metadata=metadata) for i in range(stuck)]  # no deadline, never read
    ready.put("streams")
    stop.wait()

    def outcome(call, pending: str) -> str:
        # A client that never reads sees no status even once the server has cancelled its call;
        # a refusal comes without a message, so it sees that one.
        if not call.done():
            return pending
        return call.code().name + (f" ({call.details()})" if call.code() != grpc.StatusCode.RESOURCE_EXHAUSTED else "")

    results.put({"watch": dict(Counter(outcome(c, "open") for c in watch_calls)),
                 "stuck": dict(Counter(outcome(c, "no status (never read)") for c in stuck_calls))})
    for call in watch_calls + stuck_calls:
        call.cancel()


# -- one phase ------------------------------------------------------------------------------------

class _Server:
    """The benchmark's own server, in a process of its own (`_server_process`)."""

    def __init__(self, pool_dir: Path, formats: tuple[str, ...], watched_job: bool, progress):
        ctx = multiprocessing.get_context("spawn")
        self.home = tempfile.TemporaryDirectory(prefix="poe-bench-load-")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_server_process, name="bench-server", daemon=True,
                                   args=(self.home.name, str(pool_dir), formats, watched_job, child))
        self.process.start()
        progress(f"starting the server, importing and warming {pool_dir} ({', '.join(formats)})")
        deadline = time.monotonic() + 3600
        while not self.conn.poll(0.5):
            if not self.process.is_alive() or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"poe bench load: the server did not start (exit code {self.process.exitcode})")
        self.info = self.conn.recv()
        self.target = f"127.0.0.1:{self.info['port']}"

    def ask(self, command: str = "stats") -> dict:
        self.conn.send(command)
        return self.conn.recv()

    def close(self) -> None:
        try:
            self.conn.send("stop")
        except OSError:
            pass
        self.process.join(60)
        if self.process.is_alive():
            self.process.kill()
        self.home.cleanup()


def _wait(queue, what: str, timeout: float, processes: list):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return queue.get(timeout=1.0)
        except Exception:  # queue.Empty
            dead = [p for p in processes if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                why = f"{dead[0].name} exited with {dead[0].exitcode}" if dead else f"no answer in {timeout:.0f} s"
                raise RuntimeError(f"poe bench load: {what}: {why}") from None


def _phase(name: str, target: str, token: str | None, ref: str, job: str, server: _Server | None, *, clients: int,
           seconds: float, warmup: float, watch_streams: int, stuck_streams: int, formats: tuple[str, ...],
           seed: int, progress) -> dict:
    ctx = multiprocessing.get_context("spawn")
    processes: list = []

    def stats(command: str = "stats") -> dict:
        return server.ask(command) if server is not None else {}

    try:
        new, shares, popular, full_set = _workload(target, token, ref, formats, clients, seed)
        ready, results, go, stop = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Event()
        opened = stats()  # the counters from here on: the streams' opening included
        streams = None
        if watch_streams or stuck_streams:
            streams = ctx.Process(target=_streams_process, name="bench-streams", daemon=True,
                                  args=(target, token, ref, job, watch_streams, stuck_streams, full_set, ready, stop,
                                        results))
            streams.start()
            processes.append(streams)
            _wait(ready, f"{watch_streams} watch and {stuck_streams} stuck streams", 120, processes)
        progress(f"{name}: {clients} clients, {warmup:g} s warm-up then {seconds:g} s counted"
                 + (f", with {watch_streams} watch and {stuck_streams} stuck streams" if streams else ""))
        for k in range(clients):
            p = ctx.Process(target=_client_process, name=f"bench-client-{k}", daemon=True,
                            args=(k, target, token, ref, new[k], shares, popular, seconds, warmup, seed, ready, go,
                                  results))
            p.start()
            processes.append(p)
        for _ in range(clients):
            _wait(ready, "clients connecting", 300, processes)
        before = stats("reset")  # every class set composes again, as in the phase before
        go.set()
        time.sleep(warmup)
        after_warmup = stats()
        client_results = [_wait(results, "client results", seconds + CALL_TIMEOUT + 60, processes)
                          for _ in range(clients)]
        end = stats()
        stream_outcomes = {}
        if streams is not None:
            stop.set()
            stream_outcomes = _wait(results, "stream outcomes", 60, processes)
        for p in processes:
            p.join(30)
        return _summarize(name, client_results, seconds, server.info if server else {}, opened, before, after_warmup,
                          end, stream_outcomes, watch_streams, stuck_streams)
    finally:
        for p in processes:
            if p.is_alive():
                p.kill()


def _prepare_target(target: str, token: str | None, served: str, watched_job: bool) -> tuple[str, str]:
    """The pool version `served` resolves to on `target`, and a job to watch (created with `token`,
    which must be allowed to)."""
    from poe.client.registry import RegistryClient

    with RegistryClient(target, token=token) as registry:
        pv = registry.get_pool(served)
        job = registry.create_job({"purpose": "watched by poe bench load"}).id if watched_job else ""
    return f"{pv.name}@{pv.version}", job


def _workload(target: str, token: str | None, ref: str, formats: tuple[str, ...], clients: int,
              seed: int) -> tuple[list[dict[str, list]], dict[str, float], list, tuple[str, ...]]:
    """Per client and format, its share of the class sets in a seeded order (each asked for once in
    each format before any comes round again); the formats' shares of the compositions; the popular
    (class set, format) pairs; every class of the pool (what the stuck streams ask for: the largest
    model)."""
    from poe.client.registry import RegistryClient

    with RegistryClient(target, token=token) as registry:
        classes = list(registry.get_pool(ref).hierarchy.classes)
    rng = random.Random(seed)
    shares = {f: FORMAT_SHARE.get(f, 0.0) for f in formats[1:]}
    shares = {formats[0]: max(0.0, 1.0 - sum(shares.values())), **shares}
    popular = [(cs, rng.choices(list(shares), list(shares.values()))[0])
               for cs in rng.sample(class_sets(classes), POPULAR_SETS)]
    new = [{} for _ in range(clients)]
    for fmt in formats:
        sets = [cs for cs in class_sets(classes) if (cs, fmt) not in popular]
        rng.shuffle(sets)
        for k in range(clients):
            new[k][fmt] = sets[k::clients] or sets
    return new, shares, popular, tuple(classes)


def _summarize(name: str, client_results: list[dict], seconds: float, info: dict, opened: dict, before: dict,
               after_warmup: dict, end: dict, streams: dict, watch_streams: int, stuck_streams: int) -> dict:
    latencies: dict[str, list[float]] = {op: [] for op in MIX}
    codes: Counter = Counter()
    warmup_errors: Counter = Counter()
    new_hits = 0
    for r in client_results:
        warmup_errors.update(r["warmup_errors"])
        for op, values in r["latencies"].items():
            latencies[op].extend(values)
        codes.update({tuple(k): v for k, v in r["codes"].items()})
        new_hits += r["new_hits"]
    ops = {}
    for op in MIX:
        values = sorted(latencies[op])
        errors = {code: n for (o, code), n in codes.items() if o == op and code != "OK"}
        calls = len(values) + sum(errors.values())
        ops[op] = {"calls": calls, "per_s": round(calls / seconds, 1), "errors": errors}
        if values:
            ops[op].update(p50_ms=round(_percentile(values, 0.5) * 1e3, 2),
                           p99_ms=round(_percentile(values, 0.99) * 1e3, 2), max_ms=round(values[-1] * 1e3, 2))
    total = sum(codes.values())
    errors = Counter()
    for (_, code), n in codes.items():
        if code != "OK":
            errors[code] += n
    result = {"phase": name, "clients": len(client_results), "counted_s": seconds, "ops": ops, "calls": total,
              "ops_per_s": round(total / seconds, 1), "errors": dict(errors), "warmup_errors": dict(warmup_errors),
              "compose_new_cache_hits": new_hits, "watch_streams": watch_streams, "stuck_streams": stuck_streams}
    if streams:
        result["stream_outcomes"] = streams
    if info:
        rss = {"start": info["rss_start_mb"], "warm": info["rss_warm_mb"], "after_warmup": after_warmup["rss_mb"],
               "end": end["rss_mb"]}
        # The composer's caches grow up to their bounds (POE_MODEL_CACHE_BYTES...) by design; what
        # grows besides them would be a leak.
        cache_growth = end["caches_mb"] - after_warmup["caches_mb"]
        result["server"] = {
            "warm_s": info["warm_s"], "rss_mb": rss,
            # Of the machine's CPU time while counting: the clients and anything else running take the rest.
            "cpu_share": round((end["cpu_s"] - after_warmup["cpu_s"])
                               / ((end["at"] - after_warmup["at"]) * (os.cpu_count() or 1)), 3),
            "caches_mb": {"after_warmup": after_warmup["caches_mb"], "end": end["caches_mb"]},
            # Each queued recording holds its composed file (up to POE_RECORD_QUEUE of them).
            "recordings_queued": {"after_warmup": after_warmup["recordings_queued"],
                                  "end": end["recordings_queued"]},
            "rss_growth_after_warmup": round(rss["end"] / rss["after_warmup"] - 1, 4),
            "rss_growth_besides_caches": round((rss["end"] - cache_growth) / rss["after_warmup"] - 1, 4),
            "threads": {"before": before["threads"], "end": end["threads"]},
            # Counted from before the phase's streams were opened.
            "template_misses": {f: end["template_misses"].get(f, 0) - opened["template_misses"].get(f, 0)
                                for f in end["template_misses"]},
            "write_cancels": {k: v - opened["write_cancels"].get(k, 0) for k, v in end["write_cancels"].items()
                              if v != opened["write_cancels"].get(k, 0)},
            "refused": {k: v - opened["refused"].get(k, 0) for k, v in end["refused"].items()
                        if v != opened["refused"].get(k, 0)},
        }
    return result


# -- the whole run --------------------------------------------------------------------------------

def run(pool_dir: str | Path | None = None, *, target: str | None = None, served: str = "fashion-mnist",
        clients: int = 32, seconds: float = 60.0, warmup: float = 10.0, watch_streams: int = 0,
        stuck_streams: int = 0, formats: tuple[str, ...] = ("torchscript", "pt2", "onnx"), seed: int = 0,
        progress=lambda message: None) -> dict:
    """Both phases (the second only with watch or stuck streams); see the module's docstring."""
    from poe.engine.errors import InvalidArgument

    for what, value, low in (("clients", clients, 1), ("seconds", seconds, 0.5), ("warmup", warmup, 0),
                             ("watch-streams", watch_streams, 0), ("stuck-streams", stuck_streams, 0)):
        if value < low:
            raise InvalidArgument(f"--{what}: must be at least {low:g}, got {value:g}")
    if seconds + warmup > 3600:
        raise InvalidArgument(f"--seconds + --warmup: at most 3600 s, got {seconds + warmup:g}")
    known = ("torchscript", "pt2", "onnx")
    if not formats or any(f not in known for f in formats):
        raise InvalidArgument(f"--formats: expected some of {', '.join(known)}, got {','.join(formats) or 'none'}")
    if target is None and not (Path(pool_dir) / "pool.json").is_file():
        raise InvalidArgument(f"--pool: {pool_dir} is not a pool directory (no pool.json)")
    result = {"target": target or "a server started by the benchmark (registry, composer, extractor; loopback)",
              "load_average_before": [round(v, 2) for v in os.getloadavg()],
              "clients": clients, "counted_s": seconds, "warmup_s": warmup, "formats": list(formats),
              "cores": os.cpu_count(), "phases": {}}
    phases = [("baseline", 0, 0)] + ([("streams", watch_streams, stuck_streams)] if watch_streams or stuck_streams
                                     else [])
    server = None
    try:
        if target is None:
            server = _Server(Path(pool_dir), tuple(formats), bool(watch_streams), progress)
            target, token, ref, job = server.target, server.info["token"], server.info["ref"], server.info["job"]
        else:
            from poe.client.base import resolve_token

            token = resolve_token(None, target) or None  # POE_TOKEN, or this machine's `poe up` admin token
            ref, job = _prepare_target(target, token, served, bool(watch_streams))
        for name, watches, stuck in phases:
            result["phases"][name] = _phase(name, target, token, ref, job, server, clients=clients, seconds=seconds,
                                            warmup=warmup, watch_streams=watches, stuck_streams=stuck,
                                            formats=tuple(formats), seed=seed, progress=progress)
    finally:
        if server is not None:
            server.close()
    result["targets"] = targets(result)
    return result


def targets(result: dict) -> dict:
    """Each target: the figure and whether it was met (None when the run could not tell)."""
    out = {}
    for name, phase in result["phases"].items():
        ops, calls = phase["ops"], max(1, phase["calls"])
        other = {c: n for c, n in phase["errors"].items() if c != "RESOURCE_EXHAUSTED"}
        refused = phase["errors"].get("RESOURCE_EXHAUSTED", 0) / calls
        compose_p99 = max((ops[o].get("p99_ms", 0.0) for o in COMPOSE_OPS), default=0.0)
        read_p99 = max((ops[o].get("p99_ms", 0.0) for o in READ_OPS), default=0.0)
        out[name] = {"no_other_errors": {"value": sum(other.values()), "met": not other},
                     "refused_share": {"value": round(refused, 4), "met": refused < REFUSED_SHARE},
                     "compose_p99_ms": {"value": compose_p99, "met": compose_p99 <= COMPOSE_P99_MS},
                     "read_p99_ms": {"value": read_p99, "met": read_p99 <= READ_P99_MS}}
        server = phase.get("server")
        if server:
            growth = server["rss_growth_besides_caches"]
            misses = sum(server["template_misses"].values())
            out[name]["rss_growth"] = {"value": growth, "met": growth < RSS_GROWTH}
            out[name]["template_misses"] = {"value": misses, "met": misses == 0}
    if "streams" in result["phases"]:
        base, loaded = result["phases"]["baseline"]["ops"], result["phases"]["streams"]["ops"]
        ratios = {op: round(loaded[op]["p99_ms"] / base[op]["p99_ms"], 2) for op in MIX
                  if base[op].get("p99_ms") and loaded[op].get("p99_ms")}
        worst = max(ratios.values(), default=None)
        out["streams_vs_baseline"] = {"p99_ratio": ratios, "worst": worst,
                                      "met": None if worst is None else worst <= STREAMS_FACTOR}
    return out


# -- Markdown -------------------------------------------------------------------------------------

def _verdict(met: bool | None) -> str:
    return "**met**" if met else "n/a" if met is None else "**missed**"


def markdown(result: dict, command: str) -> str:
    from poe.bench.report import hardware, hardware_line

    lines = [f"Command: `{command}`", "",
             f"Measured on {hardware_line(result.get('hardware') or hardware())}; {result['clients']} clients, each "
             f"a process of its own, {result['warmup_s']:g} s of warm-up then {result['counted_s']:g} s counted per "
             "phase; "
             f"formats asked for: {', '.join(result['formats'])}; server: {result['target']}; load average "
             f"before the run {'/'.join(map(str, result.get('load_average_before', [])))}."
             + (" *Quick run: the figures mean nothing.*" if result.get("quick") else ""), ""]
    names = list(result["phases"])
    header = "| operation | " + " | ".join(f"{n}: calls/s | p50 ms | p99 ms | max ms | errors" for n in names) + " |"
    lines += [header, "|---|" + "---|---|---|---|---|" * len(names)]
    for op in MIX:
        cells = []
        for n in names:
            o = result["phases"][n]["ops"][op]
            errors = ", ".join(f"{c} {k}" for c, k in sorted(o["errors"].items())) or "0"
            cells.append(f"{o['per_s']:.1f} | {o.get('p50_ms', 0):.1f} | {o.get('p99_ms', 0):.1f} | "
                         f"{o.get('max_ms', 0):.0f} | {errors}")
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines.append("")
    for n in names:
        p = result["phases"][n]
        text = (f"**{n}**: {p['ops_per_s']:.0f} calls/s in all, errors "
                f"{', '.join(f'{c} {k}' for c, k in sorted(p['errors'].items())) or 'none'} (during the "
                f"warm-up, not counted: {_counts(p.get('warmup_errors', {}))}); "
                f"{p['compose_new_cache_hits']} of {p['ops']['compose_new']['calls']} new class sets were cache hits "
                "(asked for by another client first, or every set asked for already)")
        server = p.get("server")
        if p.get("stuck_streams") or p.get("watch_streams"):
            out = p.get("stream_outcomes", {})
            text += (f"; the {p['watch_streams']} watch streams, as their clients saw them at the end: "
                     f"{_counts(out.get('watch', {}))}; the {p['stuck_streams']} stuck ComposeModel streams: "
                     f"{_counts(out.get('stuck', {}))}")
        if server:
            rss, caches = server["rss_mb"], server["caches_mb"]
            text += (f". Server: {100 * server['cpu_share']:.0f}% of the machine's CPU while counting; "
                     f"warm in {server['warm_s']:g} s; RSS {rss['start']:.0f} MiB listening, "
                     f"{rss['warm']:.0f} warm, {rss['after_warmup']:.0f} after the load's warm-up, "
                     f"{rss['end']:.0f} at the end ({100 * server['rss_growth_after_warmup']:+.1f}%; the composer's "
                     f"caches {caches['after_warmup']:.0f} -> {caches['end']:.0f} MiB, recordings waiting for "
                     f"the registry {server['recordings_queued']['after_warmup']} -> "
                     f"{server['recordings_queued']['end']}, the rest "
                     f"{100 * server['rss_growth_besides_caches']:+.1f}%); threads {server['threads']['before']} -> "
                     f"{server['threads']['end']}; template misses {_counts(server['template_misses'])}; calls "
                     f"cancelled for not reading {_counts(server['write_cancels'])}; refused with "
                     f"RESOURCE_EXHAUSTED {_counts(server['refused'])}")
        lines += [text + ".", ""]
    t = result["targets"]
    for n in names:
        x = t[n]
        parts = [f"errors other than RESOURCE_EXHAUSTED: {x['no_other_errors']['value']}, "
                 f"{_verdict(x['no_other_errors']['met'])}",
                 f"refused < 1%: {100 * x['refused_share']['value']:.2f}%, {_verdict(x['refused_share']['met'])}",
                 f"ComposeModel p99 <= {COMPOSE_P99_MS:.0f} ms: {x['compose_p99_ms']['value']:.0f} ms, "
                 f"{_verdict(x['compose_p99_ms']['met'])}",
                 f"reads p99 <= {READ_P99_MS:.0f} ms: {x['read_p99_ms']['value']:.0f} ms, "
                 f"{_verdict(x['read_p99_ms']['met'])}"]
        if "rss_growth" in x:
            parts.append(f"RSS growth after warm-up besides the bounded caches < 10%: "
                         f"{100 * x['rss_growth']['value']:+.1f}%, "
                         f"{_verdict(x['rss_growth']['met'])}")
            parts.append(f"no template miss: {x['template_misses']['value']}, {_verdict(x['template_misses']['met'])}")
        lines.append(f"Targets, {n}: " + "; ".join(parts) + ".")
    if "streams_vs_baseline" in t:
        s = t["streams_vs_baseline"]
        worst = "n/a" if s["worst"] is None else f"{s['worst']:.2f}x"
        lines.append(f"With the streams, other clients' p99 within {STREAMS_FACTOR:g}x of the baseline's: worst "
                     f"{worst} ({', '.join(f'{op} {r:.2f}x' for op, r in s['p99_ratio'].items())}), "
                     f"{_verdict(s['met'])}.")
    return "\n".join(lines)


def _counts(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"
