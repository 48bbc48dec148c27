"""`poe bench growth`: how composition and the registry's reads scale with what the registry holds.

Synthetic pools with random weights (timing only: no figure here says anything about accuracy):
a small library (WRN-10-1's stem and first two groups) and N small expert heads (one group of one
block at width `expert_width`, two classes each), every blob distinct. Pools hold at most
`pool_width` experts (below the registry's cap on tasks per hierarchy), each on a data set,
hierarchy and library of its own.

Three measurements, each over gRPC on loopback against a real registry and a real composer:

- registry size: for each N a registry (in a process of its own) holding N experts and a composer
  server in this process reading from it (warm-up off, as `poe bench compose`), all up at once.
  Requests go to each registry's first pool, which holds min(N, pool_width) experts; each asks for
  a class set not asked for before that needs 2 experts (one class of each), so every request
  composes a new model of one tensor layout. Before timing: the experts those requests need are
  fetched into the composer's tensor cache and the layout's template is made (one request not
  counted). The sizes take turns, one request each, so that the rest of a shared machine's load
  weighs on all of them alike; p50 / p99 as the client sees them. Target: flat within 10% (the
  largest p50 of any size over the smallest).
- experts per query: on the largest registry's first pool, class sets that need 1, 2, 5, 10, 20,
  50 experts (one class of each, warmed the same way, taking turns likewise); a least-squares line
  through the p50s gives the cost of one more expert.
- registry reads with the largest registry: GetPool of the first pool (its whole record) and
  ListExperts of every expert (pages of 1,000, followed to the end) and of the first page (100).

Setting up is not measured through gRPC: the registry process writes the synthetic artifacts
through its own storage layer (`core.Registry.register` and the store's publish, the code behind
the Register* and PublishPool RPCs), which is about ten times faster than streaming 10,000
uploads. Every measured call goes through gRPC.
"""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import random
import statistics
import tempfile
import time
from pathlib import Path

TITLE = "Composer growth: registry size, experts per query, registry reads"

SIZES = (10, 100, 1_000, 10_000)
QUICK_SIZES = (10, 100)
EXPERTS_PER_QUERY = (1, 2, 5, 10, 20, 50)
QUICK_EXPERTS_PER_QUERY = (1, 2, 5, 10)
POOL_WIDTH = 1_000  # experts per synthetic pool (the registry allows 1,024 tasks per hierarchy)
QUERY_EXPERTS = 2  # experts each registry-size request needs
LIST_PAGE = 1_000  # ListExperts page size when listing everything (the registry's maximum)
INPUT_SHAPE = [1, 28, 28]


def fit_line(xs: list[float], ys: list[float]) -> dict:
    """Least-squares y = slope * x + intercept, with r^2."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys, strict=True))
    return {"slope_ms_per_expert": round(slope, 4), "intercept_ms": round(intercept, 3),
            "r2": round(1.0 - ss_res / ss_tot, 4) if ss_tot else 1.0}


# -- the registry process ---------------------------------------------------------------------------

def _safetensors_bytes(state: dict) -> tuple[bytes, str]:
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in state.items()})
    return data, hashlib.sha256(data).hexdigest()


def populate(registry, n_experts: int, pool_width: int, expert_width: int, seed: int = 0) -> list[dict]:
    """Write `n_experts` synthetic experts into `registry` (a `core.Registry`), in pools of at most
    `pool_width`; returns each pool's name@version and expert count, in order."""
    import torch

    from poe.engine.hierarchy import Hierarchy
    from poe.engine.nets import ExpertConfig, Library, WRNConfig, count_params, make_expert
    from poe.engine.pool import config_to_dict
    from poe_services.registry import entities as e

    torch.manual_seed(seed)
    lib_cfg = WRNConfig(depth=10, width=1)
    lib = Library(lib_cfg)
    lib_state = {k: v.detach().clone() for k, v in lib.state_dict().items()}
    exp_cfg = ExpertConfig(lib.out_channels, expert_width, 1, 2)
    head = make_expert(exp_cfg)
    head_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
    lib_params, head_params = count_params(lib), count_params(head)
    pools, made, k = [], 0, 0
    while made < n_experts:
        width = min(pool_width, n_experts - made)
        dataset = f"growth-{k}"
        classes = tuple(f"g{k}-c{j}" for j in range(2 * width))
        tasks = {f"t{j}": (2 * j, 2 * j + 1) for j in range(width)}
        registry.store.add_hierarchy(Hierarchy(dataset, 1, classes, tasks))
        # Distinct bytes per artifact (the registry keys blobs by content): one value differs.
        lib_state["stem.weight"].view(-1)[0] = float(k)
        data, sha = _safetensors_bytes(lib_state)
        library, _ = registry.register(e.LibrarySpec(f"{dataset}/library", dataset, config_to_dict(
            dataclasses.replace(lib_cfg, num_classes=len(classes))), params=lib_params), sha, len(data), [data])
        ids = _add_experts(registry, library.id, dataset, tasks, config_to_dict(exp_cfg), head_params, head_state,
                           first=made)
        pv, _ = registry.store.publish_pool(e.PoolSpec(dataset, "1", library.id, tuple(ids),
                                                       info={"dataset": dataset, "input_shape": INPUT_SHAPE}))
        pools.append({"ref": pv.ref, "experts": width})
        made += width
        k += 1
    return pools


def _add_experts(registry, library_id: int, dataset: str, tasks: dict[str, tuple[int, ...]], config: dict,
                 params: int, state: dict, first: int) -> list[int]:
    """One expert per task, bytes distinct, in one transaction: the rows `add_expert` writes and the
    blobs `register` commits. Not `register` itself: one transaction per expert (5-9 ms each), so
    that 10,000 experts would take one or two minutes to set up."""
    from sqlalchemy import select

    from poe_services.registry import entities as e
    from poe_services.registry.models import BlobRow, DatasetRow, ExpertRow, HierarchyRow, TaskRow

    blobs = {}
    for j, task in enumerate(tasks):
        state["fc.bias"][0] = float(first + j)
        data, sha = _safetensors_bytes(state)
        staged = registry.blobs.stage([data])
        staged.commit()
        staged.discard()
        blobs[task] = e.Blob(sha, len(data), e.SAFETENSORS)
    store = registry.store
    with store._session(write=True) as s:
        task_ids = dict(s.execute(
            select(TaskRow.name, TaskRow.id).join(HierarchyRow, TaskRow.hierarchy_id == HierarchyRow.id)
            .join(DatasetRow, HierarchyRow.dataset_id == DatasetRow.id).where(DatasetRow.name == dataset)).all())
        s.add_all(BlobRow(sha256=b.sha256, size=b.size, media_type=b.media_type) for b in blobs.values())
        rows = [ExpertRow(library_id=library_id, task_id=task_ids[t], class_ids=list(ids), config=config, params=params,
                          val_accuracy=0.5, metrics={}, loss={}, blob_sha256=blobs[t].sha256)
                for t, ids in tasks.items()]
        s.add_all(rows)
        s.flush()
        return [r.id for r in rows]


def _registry_process(home: str, n_experts: int, pool_width: int, expert_width: int, conn) -> None:
    """A registry on a free port of 127.0.0.1 holding `n_experts` synthetic experts, until told to stop."""
    from poe.engine.config import Settings
    from poe_services.host import create_server

    host = create_server("127.0.0.1:0", Settings.from_env({"POE_HOME": home}), ("registry",), migrate=True)
    host.start()
    t0 = time.perf_counter()
    pools = populate(host.runtimes["registry"].registry, n_experts, pool_width, expert_width)
    conn.send({"port": host.port, "admin": host.issue_token("admin", "bench"),
               "service": host.issue_token("service", "bench-composer"), "reader": host.issue_token("reader", "bench"),
               "pools": pools, "populate_s": round(time.perf_counter() - t0, 2)})
    conn.recv()
    host.stop(0).wait()


class _Stack:
    """A registry process holding `n_experts` and a composer server in this process (warm-up off)."""

    def __init__(self, n_experts: int, pool_width: int, expert_width: int, record: bool):
        from poe.engine.config import Secret, Settings
        from poe_services.host import create_server

        self.home = tempfile.TemporaryDirectory(prefix="poe-bench-growth-")
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_registry_process, name="bench-growth-registry", daemon=True,
                                   args=(self.home.name, n_experts, pool_width, expert_width, child))
        self.process.start()
        deadline = time.monotonic() + 1800
        while not self.conn.poll(0.5):
            if not self.process.is_alive() or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"poe bench growth: the registry did not start (exit code {self.process.exitcode})")
        self.info = self.conn.recv()
        self.registry_target = f"127.0.0.1:{self.info['port']}"
        env = {"POE_HOME": str(Path(self.home.name) / "composer"), "POE_REGISTRY_ADDR": self.registry_target}
        settings = dataclasses.replace(Settings.from_env(env), record_compositions=record,
                                       service_token=Secret(self.info["service"]))
        self.host = create_server("127.0.0.1:0", settings, ("composer",), registry_target=self.registry_target,
                                  warm=False)
        self.host.start()
        self.target = f"127.0.0.1:{self.host.port}"
        self.token = self.host.issue_token("reader", "bench")
        self.engine = self.host.runtimes["composer"].engine

    def close(self) -> None:
        if getattr(self, "host", None) is not None:
            self.host.stop(4).wait(30)  # queued recordings get half of the grace
        try:
            self.conn.send("stop")
        except OSError:
            pass
        self.process.join(60)
        if self.process.is_alive():
            self.process.kill()
        self.home.cleanup()


# -- what is measured ---------------------------------------------------------------------------------

def _class_sets(view, n_experts: int, count: int, rng: random.Random, used: set) -> list[tuple[str, ...]]:
    """`count` class sets not in `used`, each needing `n_experts` experts of the view's pool (one class of each)."""
    h = view.pool.hierarchy
    tasks = list(h.tasks)
    out = []
    for _ in range(count * 100):
        if len(out) == count:
            break
        cs = tuple(sorted(h.classes[rng.choice(h.tasks[t])] for t in rng.sample(tasks, n_experts)))
        if cs not in used:
            used.add(cs)
            out.append(cs)
    return out


def _warm(stack: _Stack, view, class_sets: list[tuple[str, ...]]) -> None:
    """The library's and these class sets' experts in the composer's tensor cache."""
    h = view.pool.hierarchy
    stack.engine.tensors(view.library_sha256)
    for cs in class_sets:
        for t in h.covering_tasks(h.resolve_classes(cs)):
            stack.engine.tensors(view.expert_sha256[t])


def _prepare(stack: _Stack, view, n_experts: int, requests: int, rng: random.Random, used: set,
             composer) -> list[tuple[str, ...]]:
    """`requests` new class sets of `n_experts` experts each, their experts fetched and their layout's
    template made by one more request (not counted)."""
    sets = _class_sets(view, n_experts, requests + 1, rng, used)
    _warm(stack, view, sets)
    composer.compose(sets[0], pool=view.ref)
    return sets[1:]


def _interleaved(cases: list[tuple[_Stack, object, str, int, list[tuple[str, ...]]]]) -> list[dict]:
    """p50 / p99 of each case's class sets (stack, composer client, pool, experts each needs, sets),
    one request of each case in turn, so that whatever else the machine does weighs on all alike."""
    from poe.bench.common import latency_summary

    seconds: list[list[float]] = [[] for _ in cases]
    templated = [stack.engine.scripts.templated for stack, *_ in cases]
    for i in range(max(len(sets) for *_, sets in cases)):
        for k, (_, composer, ref, n_experts, sets) in enumerate(cases):
            if i < len(sets):
                r = composer.compose(sets[i], pool=ref)
                if r.header.cache_hit or len(r.header.tasks) != n_experts:
                    raise RuntimeError(f"poe bench growth: {sets[i]} was a cache hit or needed "
                                       f"{len(r.header.tasks)} experts, not {n_experts}")
                seconds[k].append(r.seconds)
    # Stacks shared by several cases count their templates once per case: fine, the expected count is 0.
    return [{**latency_summary(sec), "templates_made_while_timed": stack.engine.scripts.templated - t}
            for sec, (stack, *_), t in zip(seconds, cases, templated, strict=True)]


def _reads(target: str, token: str, ref: str, repeats: int) -> dict:
    from poe.bench.common import latency_summary
    from poe.client.registry import RegistryClient
    from poe.v1 import registry_pb2

    out = {}
    with RegistryClient(target, token=token, retries=0) as reg:
        pv = reg.get_pool(ref)
        calls = {
            "get_pool": lambda: reg.get_pool(ref),
            "list_experts_all": lambda: sum(1 for _ in reg.list_experts(page_size=LIST_PAGE)),
            "list_experts_page": lambda: len(reg._call(reg.stub.ListExperts,
                                                       registry_pb2.ListExpertsRequest()).experts),
        }
        counts = {"get_pool": len(pv.experts), "list_experts_all": None, "list_experts_page": None}
        for name, call in calls.items():
            n = max(3, repeats // 5) if name == "list_experts_all" else repeats
            seconds = []
            for i in range(n + 1):
                t0 = time.perf_counter()
                got = call()
                if i:  # the first call warms connections and the database's caches: not counted
                    seconds.append(time.perf_counter() - t0)
                if name != "get_pool":
                    counts[name] = got
            out[name] = {**latency_summary(seconds), "experts": counts[name]}
        out["get_pool"]["bytes"] = pv.ByteSize()
    return out


def run(sizes: tuple[int, ...] = SIZES, experts_per_query: tuple[int, ...] = EXPERTS_PER_QUERY,
        requests: int = 200, per_query_size: int = 60, read_repeats: int = 50, pool_width: int = POOL_WIDTH,
        expert_width: int = 8, record: bool = False, seed: int = 0, progress=lambda msg: None) -> dict:
    import torch

    from poe.client.composer import Composer

    sizes = tuple(sorted(sizes))
    result: dict = {
        "part": "growth", "pool": "synthetic (random weights)",
        "transport": "gRPC on loopback: the registry in a process of its own, the composer a server in the "
                     "benchmark's process (warm-up off), one client in the benchmark's process",
        "settings": {"sizes": list(sizes), "experts_per_query": list(experts_per_query), "requests": requests,
                     "per_query_size": per_query_size, "read_repeats": read_repeats, "pool_width": pool_width,
                     "expert_width": expert_width, "query_experts": QUERY_EXPERTS, "record_compositions": record,
                     "seed": seed, "torch_threads": torch.get_num_threads()},
        "registry_size": [],
    }
    stacks: list[_Stack] = []
    composers: list = []
    try:
        for n in sizes:
            progress(f"registry with {n:,} experts: setting up")
            stacks.append(_Stack(n, pool_width, expert_width, record))
        rows, cases, views = [], [], []
        for n, stack in zip(sizes, stacks, strict=True):
            first = stack.info["pools"][0]
            t0 = time.perf_counter()
            views.append(view := stack.engine.view(first["ref"]))
            view_s = time.perf_counter() - t0
            composers.append(composer := Composer(stack.target, retries=0, token=stack.token))
            k = min(QUERY_EXPERTS, first["experts"])
            cases.append((stack, composer, view.ref, k,
                          _prepare(stack, view, k, requests, random.Random(seed), set(), composer)))
            rows.append({"experts": n, "pools": len(stack.info["pools"]), "query_pool": view.ref,
                         "query_pool_experts": first["experts"], "populate_s": stack.info["populate_s"],
                         "first_view_s": round(view_s, 3)})
        progress(f"{requests} compositions of {QUERY_EXPERTS} experts per registry size, interleaved")
        result["registry_size"] = [{**row, **timed} for row, timed in zip(rows, _interleaved(cases), strict=True)]

        stack, composer, view = stacks[-1], composers[-1], views[-1]
        pool_experts = stack.info["pools"][0]["experts"]
        rng, used = random.Random(seed + 1), set()
        counts = [k for k in experts_per_query if k <= pool_experts]
        progress(f"{per_query_size} compositions of {', '.join(map(str, counts))} expert(s), interleaved")
        by_count = _interleaved([(stack, composer, view.ref, k, _prepare(stack, view, k, per_query_size, rng, used,
                                                                            composer)) for k in counts])
        epq_rows = [{"experts": k, **timed} for k, timed in zip(counts, by_count, strict=True)]
        result["experts_per_query"] = {
            "registry_experts": sizes[-1], "pool": view.ref, "pool_experts": pool_experts, "rows": epq_rows,
            "fit": {**fit_line([r["experts"] for r in epq_rows], [r["p50_ms"] for r in epq_rows]),
                    "over": "p50 per number of experts"}}

        progress(f"registry with {sizes[-1]:,} experts: GetPool and ListExperts")
        reads = _reads(stack.registry_target, stack.info["reader"], view.ref, read_repeats)
        result["registry_reads"] = {"registry_experts": sizes[-1], "pool": view.ref, **reads}
    finally:
        for composer in composers:
            composer.close()
        for stack in stacks:
            stack.close()
    p50s = [r["p50_ms"] for r in result["registry_size"]]
    result["registry_size_ratio"] = {"largest_over_smallest_p50": round(p50s[-1] / p50s[0], 3),
                                     "max_over_min_p50": round(max(p50s) / min(p50s), 3)}
    return result


# -- Markdown ---------------------------------------------------------------------------------------

def markdown(result: dict, command: str) -> str:
    from poe.bench.report import hardware_line

    s = result["settings"]
    lines = [f"Command: `{command}`  ",
             f"Measured {result.get('date', '')} on {hardware_line(result['hardware'])}. "
             f"Synthetic pools with random weights (a WRN-10-1 library, expert heads of width {s['expert_width']} "
             f"with 2 classes each, at most {s['pool_width']:,} experts per pool); {result['transport']}; "
             f"recording of new compositions in the registry **{'on' if s['record_compositions'] else 'off'}**. "
             "The registry is filled through its storage layer (not timed through gRPC); every measured call "
             "goes through gRPC. The machine has 2 cores shared with other work: expect noise in the tails.",
             ""]
    if result.get("quick"):
        lines += ["**Quick mode**: tiny sizes that check the harness; these figures say nothing about the product.",
                  ""]
    lines += [f"Compose latency by registry size ({s['requests']} new class sets of {s['query_experts']} experts "
              "each per size, the sizes taking turns request by request; experts in the composer's memory, "
              "the layout's template made first):", "",
              "| experts in registry | pools | experts in queried pool | p50 ms | p99 ms | mean ms "
              "| templates made while timed | first GetPool + view s | fill s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in result["registry_size"]:
        lines.append(f"| {r['experts']:,} | {r['pools']} | {r['query_pool_experts']:,} | {r['p50_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {r['mean_ms']:.2f} | {r['templates_made_while_timed']} | "
                     f"{r['first_view_s']:.2f} | {r['populate_s']:.0f} |")
    ratio = result["registry_size_ratio"]
    flat = ratio["max_over_min_p50"] <= 1.10
    lines += ["", f"p50 with the most experts over p50 with the fewest: {ratio['largest_over_smallest_p50']:.2f}x; "
                  f"largest p50 of any size over the smallest: **{ratio['max_over_min_p50']:.2f}x**. "
                  f"Target flat within 10%: **{'met' if flat else 'missed'}**.", ""]
    epq = result.get("experts_per_query")
    if epq:
        fit = epq["fit"]
        lines += [f"Compose latency by experts per query (pool `{epq['pool']}` with {epq['pool_experts']:,} experts, "
                  f"registry of {epq['registry_experts']:,}; one class of each expert; the counts taking turns):", "",
                  "| experts per query | requests | p50 ms | p99 ms | mean ms | templates made while timed |",
                  "|---|---|---|---|---|---|"]
        for r in epq["rows"]:
            lines.append(f"| {r['experts']} | {r['n']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['mean_ms']:.2f} "
                         f"| {r['templates_made_while_timed']} |")
        lines += ["", f"Least-squares line through the p50s: **{fit['slope_ms_per_expert']:.3f} ms per expert**, "
                      f"intercept {fit['intercept_ms']:.2f} ms, r^2 = {fit['r2']:.3f}.", ""]
    reads = result.get("registry_reads")
    if reads:
        lines += [f"Registry reads with {reads['registry_experts']:,} experts registered (one client, gRPC):", "",
                  "| call | experts returned | calls | p50 ms | p99 ms | mean ms |", "|---|---|---|---|---|---|",
                  f"| GetPool `{reads['pool']}` ({reads['get_pool']['bytes']:,} bytes) | "
                  f"{reads['get_pool']['experts']:,} | {reads['get_pool']['n']} | {reads['get_pool']['p50_ms']:.1f} | "
                  f"{reads['get_pool']['p99_ms']:.1f} | {reads['get_pool']['mean_ms']:.1f} |",
                  f"| ListExperts, every page (page size {LIST_PAGE:,}) | {reads['list_experts_all']['experts']:,} | "
                  f"{reads['list_experts_all']['n']} | {reads['list_experts_all']['p50_ms']:.1f} | "
                  f"{reads['list_experts_all']['p99_ms']:.1f} | {reads['list_experts_all']['mean_ms']:.1f} |",
                  f"| ListExperts, first page (default size) | {reads['list_experts_page']['experts']:,} | "
                  f"{reads['list_experts_page']['n']} | {reads['list_experts_page']['p50_ms']:.1f} | "
                  f"{reads['list_experts_page']['p99_ms']:.1f} | {reads['list_experts_page']['mean_ms']:.1f} |"]
    return "\n".join(lines)
