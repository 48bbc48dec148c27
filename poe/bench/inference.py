"""`poe bench inference`: images/s of composed models (fused and reference execution, TorchScript as
shipped) and of the oracle on the CPU, at batch 1, 32 and 256 with 1 and 2 torch threads, after
warm-up, median of repeated calls.

The two executions of a query are timed in turns (one call of each, then again), so that load from
other work on the machine falls on both in the same periods (not always alike: with two threads
on two busy cores the execution with more operators loses more, docs/BENCHMARKS.md)."""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from poe.bench.common import Progress, quiet, select_queries, with_overrides
from poe.bench.report import hardware, header, stamp
from poe.engine import pool as pool_mod
from poe.engine.compose import build, plan, plan_params
from poe.engine.errors import InvalidArgument
from poe.engine.export import quiet_jit
from poe.engine.nets import count_params
from poe.engine.pool import Pool

TITLE = "Inference throughput on the CPU"


@dataclass(frozen=True)
class InferenceSettings:
    sizes: tuple[int, ...] = (1, 2, 3, 4, 5)  # one query per number of primitive tasks
    batch_sizes: tuple[int, ...] = (1, 32, 256)
    warmup: int = 5
    repeats: int = 20
    min_seconds: float = 1.0  # keep timing each model until at least this long (and `repeats` calls)
    threads: tuple[int, ...] = (1, 2)  # torch thread counts, each a full run; 0: torch's default
    eager: bool = False  # time the eager modules instead of TorchScript (what `poe compose` ships)
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.threads, int):  # one count, as --threads 2 or threads=2 gives it
            object.__setattr__(self, "threads", (self.threads,))
        if not self.sizes or not self.batch_sizes or min(self.batch_sizes) < 1:
            raise InvalidArgument("inference needs query sizes and batch sizes >= 1")
        if not self.threads or min(self.threads) < 0 or len(set(self.threads)) != len(self.threads):
            raise InvalidArgument("threads: distinct thread counts >= 0 (0: torch's default)")
        if self.warmup < 0 or self.repeats < 1 or self.min_seconds < 0:
            raise InvalidArgument("warmup and min seconds must be >= 0, repeats >= 1")


@contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- timing --------------------------------------------------------------------------------------

@torch.inference_mode()
def time_calls(models: dict[str, nn.Module], x: torch.Tensor, warmup: int, repeats: int,
               min_seconds: float) -> dict[str, dict]:
    """Median wall time of `model(x)` for each model, after `warmup` calls of each, over at least
    `repeats` calls and `min_seconds` of timing per model. The models take turns, one call each,
    so that whatever else the machine does falls on all of them in the same periods."""
    for _ in range(warmup):
        for model in models.values():
            model(x)
    times: dict[str, list[float]] = {name: [] for name in models}
    spent = 0.0
    while (len(times[next(iter(models))]) < max(1, repeats)
           or (spent < min_seconds * len(models) and len(times[next(iter(models))]) < 100_000)):
        for name, model in models.items():
            t0 = time.perf_counter()
            model(x)
            took = time.perf_counter() - t0
            times[name].append(took)
            spent += took
    out = {}
    for name, ts in times.items():
        ts.sort()
        median = statistics.median(ts)
        out[name] = {"calls": len(ts), "median_ms": round(median * 1e3, 4),
                     "p90_ms": round(ts[min(len(ts) - 1, int(0.9 * len(ts)))] * 1e3, 4),
                     "images_per_s": round(x.shape[0] / median, 1)}
    return out


def _ratio_key(n: int, batch: int) -> str:
    return f"n{n}_b{batch}"


def run_inference(pool: Pool, s: InferenceSettings, progress: Progress = quiet) -> dict:
    """Images/s of composed models (fused, reference) and of the oracle at each batch size and
    thread count."""
    queries = [select_queries(pool, (n,), 1, s.seed)[0] for n in sorted(set(s.sizes)) if 1 <= n <= len(pool.experts)]
    if not queries:
        raise InvalidArgument(f"no query sizes in 1..{len(pool.experts)}: {s.sizes}")
    g = torch.Generator().manual_seed(s.seed)
    inputs = {b: torch.rand(b, *pool.input_shape, generator=g) for b in s.batch_sizes}

    def prepare(model: nn.Module) -> nn.Module:
        if s.eager:
            return model.eval()
        with quiet_jit():
            return torch.jit.script(model).eval()

    rows, measured_threads = [], []
    compiled = []
    for tasks in queries:
        p = plan(pool, tasks=list(tasks))
        models = {e: build(pool, p, fused=e == "fused") for e in ("fused", "reference")}
        with torch.inference_mode():
            x = inputs[s.batch_sizes[0]]
            diff = float((models["fused"](x) - models["reference"](x)).abs().max())
        compiled.append((tasks, p, diff, {e: prepare(m) for e, m in models.items()}))
    oracle = prepare(pool.oracle()) if pool.oracle_state is not None else None
    for count in s.threads:
        with _threads(count):
            threads = torch.get_num_threads()
            if threads in measured_threads:  # 0 (torch's default) may be a count already measured
                continue
            measured_threads.append(threads)
            for tasks, p, diff, models in compiled:
                for b in s.batch_sizes:
                    progress(f"{threads} thread(s): {'+'.join(tasks)} batch {b}")
                    timed = time_calls(models, inputs[b], s.warmup, s.repeats, s.min_seconds)
                    for execution in models:
                        rows.append({"model": execution, "tasks": list(tasks), "n": len(tasks), "batch": b,
                                     "threads": threads, "params": plan_params(pool, p),
                                     "max_abs_diff_fused_reference": diff, **timed[execution]})
            if oracle is not None:
                for b in s.batch_sizes:
                    progress(f"{threads} thread(s): oracle batch {b}")
                    rows.append({"model": "oracle", "tasks": None, "n": None, "batch": b, "threads": threads,
                                 "params": count_params(pool.oracle()),
                                 **time_calls({"oracle": oracle}, inputs[b], s.warmup, s.repeats,
                                              s.min_seconds)["oracle"]})

    def ips(model: str, n: int | None, b: int, t: int) -> float | None:
        return next((r["images_per_s"] for r in rows
                     if r["model"] == model and r["n"] == n and r["batch"] == b and r["threads"] == t), None)

    def ratios(n: int, b: int, t: int) -> dict:
        fused, ref, orc = ips("fused", n, b, t), ips("reference", n, b, t), ips("oracle", None, b, t)
        return {"fused_over_reference": round(fused / ref, 3),
                "fused_over_oracle": round(fused / orc, 3) if orc else None}

    # Per query size and batch: the ratios at the most threads measured, and at each thread count.
    most = max(measured_threads)
    summary = {_ratio_key(len(tasks), b): {**ratios(len(tasks), b, most),
                                           "threads": {str(t): ratios(len(tasks), b, t) for t in measured_threads}}
               for tasks in queries for b in s.batch_sizes}
    return {"part": "inference", "pool": pool.ref, "settings": dataclasses.asdict(s), "torch_threads": most,
            "threads": measured_threads, "mode": "eager" if s.eager else "torchscript", "rows": rows,
            "summary": summary}


# The product's target for 5 experts (docs/ARCHITECTURE.md): fused over reference, by batch size.
TARGETS = {1: 1.5, 256: 1.0}


def markdown(result: dict) -> str:
    s = result["settings"]
    batches = s["batch_sizes"]
    threads = result.get("threads", [result["torch_threads"]])
    lines = header(result) + [
        "",
        f"Images/s on the CPU ({result['mode']}), median of at least {s['repeats']} calls (and "
        f"{s['min_seconds']:g} s) after {s['warmup']} warm-up calls; random inputs. Composed models for one query "
        "per number of primitive tasks n; the fused and reference executions of a query are timed in turns, call "
        "by call; fused/ref: fused execution over reference.",
    ]
    load = result.get("load_average") or {}
    if load.get("start") is not None:
        lines[-1] += (f" Load average (1 min) on the {result['hardware']['cores']} cores: {load['start']:g} before the "
                      f"run, {load['end']:g} after it (its own threads included)"
                      + ("; other work shared the machine, so absolute figures vary between runs more than the "
                         "ratios do." if load["start"] >= 0.5 else "."))
    for t in threads:
        rows = [r for r in result["rows"] if r.get("threads", t) == t]
        lines += [
            "",
            f"**{t} torch thread(s)**",
            "",
            "| model | n | params | " + " | ".join(f"batch {b}" for b in batches) + " | "
            + " | ".join(f"fused/ref (batch {b})" for b in batches) + " |",
            "|---|---|---|" + "---|" * (2 * len(batches)),
        ]
        seen = []
        for r in rows:
            key = (r["model"], r["n"])
            if key in seen:
                continue
            seen.append(key)
            cells = [next((f"{x['images_per_s']:,.0f}" for x in rows
                           if (x["model"], x["n"], x["batch"]) == (*key, b)), "–") for b in batches]
            ratio = [f"{_ratio(result, r['n'], b, t):.2f}x" if r["model"] == "fused" else "" for b in batches]
            label = r["model"] if r["model"] == "oracle" else f"{r['model']} ({'+'.join(r['tasks'])})"
            lines.append(f"| {label} | {r['n'] or '–'} | {r['params']:,} | " + " | ".join(cells) + " | "
                         + " | ".join(ratio) + " |")
    n_max = max((r["n"] for r in result["rows"] if r["n"]), default=None)
    if n_max is not None:
        target = " and ".join(f">= {v:g}x at batch {b}" for b, v in TARGETS.items())
        lines += ["", f"Target: fused >= 1.5x reference for 5 experts at batch 1, never slower at batch 256 "
                      f"(fused/ref {target}). Measured for {n_max} experts:"]
        for t in threads:
            got = {b: _ratio(result, n_max, b, t) for b in batches}
            checked = [got[b] >= v for b, v in TARGETS.items() if b in got]
            verdict = ("not measured" if n_max < 5 or len(checked) < len(TARGETS)
                       else "met" if all(checked) else "missed")
            lines.append(f"- {t} thread(s): " + ", ".join(f"{g:.2f}x at batch {b}" for b, g in got.items())
                         + f" -> {verdict}.")
    return "\n".join(lines)


def _ratio(result: dict, n: int, batch: int, threads: int) -> float:
    entry = result["summary"][_ratio_key(n, batch)]
    return entry.get("threads", {}).get(str(threads), entry)["fused_over_reference"]


# -- entry point (the CLI) -----------------------------------------------------------------------

QUICK = InferenceSettings(sizes=(1, 5), batch_sizes=(1, 256), warmup=2, repeats=3, min_seconds=0.0, threads=(0,))
FULL = InferenceSettings()


def settings(quick: bool = False, **overrides) -> InferenceSettings:
    """The full or quick preset, with every override that is not None applied."""
    return with_overrides(QUICK if quick else FULL, overrides)


def run(pool_dir: str | Path, quick: bool = False, command: str | None = None, progress: Progress = quiet,
        **overrides) -> dict:
    """The benchmark on a pool directory; `overrides` replace fields of the (quick) settings."""
    s = settings(quick, **overrides)
    pool = pool_mod.load(pool_dir)
    hw = hardware("cpu")
    started = time.time()
    load_before = _load_average()
    result = run_inference(pool, s, progress)
    # What else ran: the figures of a machine shared with other work say so.
    result["load_average"] = {"start": load_before, "end": _load_average()}
    hw["torch_threads"] = result["torch_threads"]  # the most threads the figures ran with (--threads)
    return stamp(result, quick=quick, hw=hw, command=command, started=started)


def _load_average() -> float | None:
    """The machine's 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None
