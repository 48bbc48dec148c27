"""`poe bench inference`: images/s of composed models (fused and reference execution, TorchScript as
shipped) and of the oracle on the CPU, at batch 1 and 256, after warm-up, median of repeated calls."""

from __future__ import annotations

import dataclasses
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
    batch_sizes: tuple[int, ...] = (1, 256)
    warmup: int = 5
    repeats: int = 20
    min_seconds: float = 1.0  # keep timing until at least this long (and `repeats` calls)
    threads: int = 0  # torch threads; 0: torch's default
    eager: bool = False  # time the eager modules instead of TorchScript (what `poe compose` ships)
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.sizes or not self.batch_sizes or min(self.batch_sizes) < 1:
            raise InvalidArgument("inference needs query sizes and batch sizes >= 1")
        if self.warmup < 0 or self.repeats < 1 or self.min_seconds < 0 or self.threads < 0:
            raise InvalidArgument("warmup, min seconds and threads must be >= 0, repeats >= 1")


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
def time_calls(model: nn.Module, x: torch.Tensor, warmup: int, repeats: int, min_seconds: float) -> dict:
    """Median wall time of `model(x)` after `warmup` calls, over at least `repeats` calls and
    `min_seconds` of timing."""
    for _ in range(warmup):
        model(x)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max(1, repeats) or (time.perf_counter() - start < min_seconds and len(times) < 100_000):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    times.sort()
    median = statistics.median(times)
    return {"calls": len(times), "median_ms": round(median * 1e3, 4),
            "p90_ms": round(times[min(len(times) - 1, int(0.9 * len(times)))] * 1e3, 4),
            "images_per_s": round(x.shape[0] / median, 1)}


def _ratio_key(n: int, batch: int) -> str:
    return f"n{n}_b{batch}"


def run_inference(pool: Pool, s: InferenceSettings, progress: Progress = quiet) -> dict:
    """Images/s of composed models (fused, reference) and of the oracle at each batch size."""
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

    rows = []
    with _threads(s.threads):
        threads = torch.get_num_threads()
        for tasks in queries:
            p = plan(pool, tasks=list(tasks))
            models = {e: build(pool, p, fused=e == "fused") for e in ("fused", "reference")}
            with torch.inference_mode():
                x = inputs[s.batch_sizes[0]]
                diff = float((models["fused"](x) - models["reference"](x)).abs().max())
            for execution, model in models.items():
                m = prepare(model)
                for b in s.batch_sizes:
                    progress(f"{'+'.join(tasks)} {execution} batch {b}")
                    rows.append({"model": execution, "tasks": list(tasks), "n": len(tasks), "batch": b,
                                 "params": plan_params(pool, p), "max_abs_diff_fused_reference": diff,
                                 **time_calls(m, inputs[b], s.warmup, s.repeats, s.min_seconds)})
        if pool.oracle_state is not None:
            oracle = prepare(pool.oracle())
            for b in s.batch_sizes:
                progress(f"oracle batch {b}")
                rows.append({"model": "oracle", "tasks": None, "n": None, "batch": b,
                             "params": count_params(pool.oracle()),
                             **time_calls(oracle, inputs[b], s.warmup, s.repeats, s.min_seconds)})

    def ips(model: str, n: int | None, b: int) -> float | None:
        return next((r["images_per_s"] for r in rows if r["model"] == model and r["n"] == n and r["batch"] == b), None)

    ratios = {}
    for tasks in queries:
        n = len(tasks)
        for b in s.batch_sizes:
            fused, ref, orc = ips("fused", n, b), ips("reference", n, b), ips("oracle", None, b)
            ratios[_ratio_key(n, b)] = {"fused_over_reference": round(fused / ref, 3),
                                        "fused_over_oracle": round(fused / orc, 3) if orc else None}
    return {"part": "inference", "pool": pool.ref, "settings": dataclasses.asdict(s), "torch_threads": threads,
            "mode": "eager" if s.eager else "torchscript", "rows": rows, "summary": ratios}


def markdown(result: dict) -> str:
    s = result["settings"]
    batches = s["batch_sizes"]
    lines = header(result) + [
        "",
        f"Images/s on the CPU ({result['mode']}, {result['torch_threads']} torch thread(s)), median of at least "
        f"{s['repeats']} calls after {s['warmup']} warm-up calls; random inputs. Composed models for one query "
        "per number of primitive tasks n; fused/ref: fused execution over reference.",
        "",
        "| model | n | params | " + " | ".join(f"batch {b}" for b in batches) + " | "
        + " | ".join(f"fused/ref (batch {b})" for b in batches) + " |",
        "|---|---|---|" + "---|" * (2 * len(batches)),
    ]
    seen = []
    for r in result["rows"]:
        key = (r["model"], r["n"])
        if key in seen:
            continue
        seen.append(key)
        cells = [next((f"{x['images_per_s']:,.0f}" for x in result["rows"]
                       if (x["model"], x["n"], x["batch"]) == (*key, b)), "–") for b in batches]
        ratio = [f"{result['summary'][_ratio_key(r['n'], b)]['fused_over_reference']:.2f}x"
                 if r["model"] == "fused" else "" for b in batches]
        label = r["model"] if r["model"] == "oracle" else f"{r['model']} ({'+'.join(r['tasks'])})"
        lines.append(f"| {label} | {r['n'] or '–'} | {r['params']:,} | " + " | ".join(cells) + " | "
                     + " | ".join(ratio) + " |")
    n_max = max((r["n"] for r in result["rows"] if r["n"]), default=None)
    if n_max is not None:
        got = [result["summary"][_ratio_key(n_max, b)]["fused_over_reference"] for b in batches]
        verdict = ("not measured" if n_max < 5 else "met" if min(got) >= 1.5 else "missed")
        lines += ["", f"Target: fused >= 1.5x reference for 5 experts. Measured for {n_max} experts: "
                      + ", ".join(f"{g:.2f}x at batch {b}" for g, b in zip(got, batches, strict=True))
                      + f" -> {verdict}."]
    return "\n".join(lines)


# -- entry point (the CLI) -----------------------------------------------------------------------

QUICK = InferenceSettings(sizes=(1, 5), warmup=2, repeats=3, min_seconds=0.0)
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
    result = run_inference(pool, s, progress)
    hw["torch_threads"] = result["torch_threads"]  # what the figures ran with (--threads)
    return stamp(result, quick=quick, hw=hw, command=command, started=started)
