"""`poe bench inference`: images/s of composed models (fused and reference execution) and of the
oracle on the CPU, at batch 1, 32 and 256 with 1 and 2 torch threads, after warm-up, median of
repeated calls.

Two kinds of rows. The in-process modules (format "module": scripted with TorchScript, or eager
with `--eager`) of one query per number of primitive tasks, and the oracle. And, for the largest
query (`--format-sizes` for others), the model files a user gets: each format of `--formats` written
by `poe.engine.export.serialize` (the bytes the composer streams) and loaded as its docs say:
TorchScript with `torch.jit.load`, pt2 with `torch.export.load(...).module()`, ONNX as an
onnxruntime InferenceSession on the CPU provider with as many intra-op threads as torch has
(inter-op 1). Without onnxruntime the ONNX rows say so instead of holding figures.

The two executions of a query in one format are timed in turns (one call of each, then again), so
that load from other work on the machine falls on both in the same periods (not always alike: with
two threads on two busy cores the execution with more operators loses more, docs/BENCHMARKS.md).
Formats take turns by group, not call by call: a call of one runtime right after another's would
share the cores with the other runtime's threads, which spin a while after each call."""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from poe.bench.common import Progress, quiet, select_queries, with_overrides
from poe.bench.report import hardware, header, stamp
from poe.engine import pool as pool_mod
from poe.engine.compose import Plan, build, composed_state, plan, plan_params
from poe.engine.errors import FailedPrecondition, InvalidArgument
from poe.engine.export import TEMPLATED_FORMATS, ScriptCache, load_pt2, load_torchscript, quiet_jit, serialize
from poe.engine.nets import count_params
from poe.engine.onnx_export import OnnxModel
from poe.engine.pool import Pool

TITLE = "Inference throughput on the CPU"
MODULE = "module"  # the format of the in-process rows (scripted or eager modules, and the oracle)
FILE_FORMATS = TEMPLATED_FORMATS  # the runnable model files: torchscript, pt2, onnx
LOADED_WITH = {"torchscript": "`torch.jit.load`", "pt2": "`torch.export.load(...).module()`",
               "onnx": "onnxruntime `InferenceSession`"}
NO_ONNXRUNTIME = "not measured: onnxruntime is not installed (pip install onnxruntime)"


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
    formats: tuple[str, ...] = FILE_FORMATS  # model files timed as loaded from their bytes
    format_sizes: tuple[int, ...] | None = None  # query sizes whose files are timed; None: the largest

    def __post_init__(self) -> None:
        for name in ("threads", "format_sizes"):  # one count, as --threads 2 or threads=2 gives it
            if isinstance(getattr(self, name), int):
                object.__setattr__(self, name, (getattr(self, name),))
        if isinstance(self.formats, str):
            object.__setattr__(self, "formats", (self.formats,))
        if not self.sizes or not self.batch_sizes or min(self.batch_sizes) < 1:
            raise InvalidArgument("inference needs query sizes and batch sizes >= 1")
        if not self.threads or min(self.threads) < 0 or len(set(self.threads)) != len(self.threads):
            raise InvalidArgument("threads: distinct thread counts >= 0 (0: torch's default)")
        if self.warmup < 0 or self.repeats < 1 or self.min_seconds < 0:
            raise InvalidArgument("warmup and min seconds must be >= 0, repeats >= 1")
        unknown = [f for f in self.formats if f not in FILE_FORMATS]
        if unknown or len(set(self.formats)) != len(self.formats):
            raise InvalidArgument(f"formats: distinct names among {', '.join(FILE_FORMATS)}, got "
                                  f"{','.join(self.formats)}")
        if self.format_sizes is not None and not set(self.format_sizes) <= set(self.sizes):
            raise InvalidArgument(f"format sizes {','.join(map(str, self.format_sizes))} must be among the query "
                                  f"sizes {','.join(map(str, self.sizes))}")


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

Runnable = nn.Module | Callable[[torch.Tensor], torch.Tensor]


@torch.inference_mode()
def time_calls(models: dict[str, Runnable], x: torch.Tensor, warmup: int, repeats: int,
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


# -- model files ---------------------------------------------------------------------------------

def _onnxruntime():
    """The onnxruntime module, or None where it is not installed (a dev dependency)."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def _onnx_session(ort, data: bytes, threads: int) -> OnnxModel:
    """The ONNX file as a user runs it on the CPU: `threads` intra-op threads, one inter-op."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    return OnnxModel(ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]))


@dataclass
class _Files:
    """A query's model files: bytes per (format, execution), and the torch-loaded ones (loaded once;
    they follow torch's thread count); ONNX sessions are made per thread count."""
    data: dict[tuple[str, str], bytes]
    loaded: dict[tuple[str, str], Runnable]
    missing: dict[str, str]  # format -> why it is not measured


def _write_files(pool: Pool, p: Plan, formats: tuple[str, ...], cache: ScriptCache, ort,
                 progress: Progress) -> _Files:
    files = _Files({}, {}, {})
    for fmt in formats:
        if fmt == "onnx" and ort is None:
            files.missing[fmt] = NO_ONNXRUNTIME
            continue
        for execution in ("fused", "reference"):
            progress(f"writing the {fmt} file ({execution}) of {'+'.join(p.tasks)}")
            try:
                data, _ = serialize(pool, p, composed_state(pool, p, execution == "fused"), execution, fmt, cache)
            except FailedPrecondition as e:  # e.g. ONNX export without onnx/onnxscript installed
                files.missing[fmt] = f"not measured: {e}"
                break
            files.data[(fmt, execution)] = data
            if fmt == "torchscript":
                files.loaded[(fmt, execution)] = load_torchscript(data)[0]
            elif fmt == "pt2":
                files.loaded[(fmt, execution)] = load_pt2(data)[0]
    return files


@torch.inference_mode()
def _max_abs_diff(model: Runnable, expected: torch.Tensor, x: torch.Tensor) -> float:
    return float((model(x) - expected).abs().max())


@dataclass
class _Query:
    """One query's models ready to time: the scripted (or eager) modules, the model files where its
    size is among the format sizes, and the checks of both against the eager fused model."""
    tasks: tuple[str, ...]
    params: int
    max_abs_diff_fused_reference: float
    modules: dict[str, nn.Module]
    files: _Files | None
    expected: torch.Tensor  # the eager fused model's logits on the first batch
    file_diffs: dict[tuple[str, str], float]


def _time_query(q: _Query, s: InferenceSettings, inputs: dict[int, torch.Tensor], threads: int, ort,
                progress: Progress) -> list[dict]:
    """Rows of one query at one thread count: per batch size, the modules, then each file format,
    fused and reference in turns within each group."""
    query = {"tasks": list(q.tasks), "n": len(q.tasks), "params": q.params,
             "max_abs_diff_fused_reference": q.max_abs_diff_fused_reference}
    groups: dict[str, dict[str, Runnable]] = {MODULE: q.modules}
    diffs = dict(q.file_diffs)
    missing = q.files.missing if q.files is not None else {}
    for fmt in s.formats if q.files is not None else ():
        if fmt in missing:
            continue
        if fmt == "onnx":  # a session per thread count: its intra-op threads are fixed when it is made
            groups[fmt] = {e: _onnx_session(ort, q.files.data[(fmt, e)], threads) for e in ("fused", "reference")}
            first = inputs[s.batch_sizes[0]]
            diffs.update({(fmt, e): _max_abs_diff(m, q.expected, first) for e, m in groups[fmt].items()})
        else:
            groups[fmt] = {e: q.files.loaded[(fmt, e)] for e in ("fused", "reference")}
    rows = []
    for b in s.batch_sizes:
        for fmt, group in groups.items():
            progress(f"{threads} thread(s): {'+'.join(q.tasks)}{'' if fmt == MODULE else f' {fmt} file'} batch {b}")
            timed = time_calls(group, inputs[b], s.warmup, s.repeats, s.min_seconds)
            for execution in group:
                row = {"model": execution, "format": fmt, **query, "batch": b, "threads": threads}
                if fmt != MODULE:
                    row["file_bytes"] = len(q.files.data[(fmt, execution)])
                    row["max_abs_diff_vs_eager"] = diffs[(fmt, execution)]
                rows.append({**row, **timed[execution]})
        for fmt, why in missing.items():
            rows += [{"model": execution, "format": fmt, **query, "batch": b, "threads": threads,
                      "images_per_s": None, "not_measured": why} for execution in ("fused", "reference")]
    return rows


def run_inference(pool: Pool, s: InferenceSettings, progress: Progress = quiet) -> dict:
    """Images/s of composed models (fused, reference; in-process modules and model files) and of
    the oracle at each batch size and thread count."""
    sizes = sorted(n for n in set(s.sizes) if 1 <= n <= len(pool.experts))
    if not sizes:
        raise InvalidArgument(f"no query sizes in 1..{len(pool.experts)}: {s.sizes}")
    file_sizes = set(s.format_sizes) if s.format_sizes is not None else {sizes[-1]}
    g = torch.Generator().manual_seed(s.seed)
    inputs = {b: torch.rand(b, *pool.input_shape, generator=g) for b in s.batch_sizes}
    first = inputs[s.batch_sizes[0]]
    ort = _onnxruntime() if "onnx" in s.formats else None
    cache = ScriptCache()

    def prepare(model: nn.Module) -> nn.Module:
        if s.eager:
            return model.eval()
        with quiet_jit():
            return torch.jit.script(model).eval()

    queries = []
    for n in sizes:
        tasks = select_queries(pool, (n,), 1, s.seed)[0]
        p = plan(pool, tasks=list(tasks))
        models = {e: build(pool, p, fused=e == "fused") for e in ("fused", "reference")}
        with torch.inference_mode():
            expected = models["fused"](first)
            diff = float((expected - models["reference"](first)).abs().max())
        files = _write_files(pool, p, s.formats, cache, ort, progress) if n in file_sizes else None
        # Each file must compute the composed function (each ONNX session is checked when made).
        file_diffs = {key: _max_abs_diff(m, expected, first) for key, m in (files.loaded if files else {}).items()}
        queries.append(_Query(tuple(tasks), plan_params(pool, p), diff, {e: prepare(m) for e, m in models.items()},
                              files, expected, file_diffs))
    oracle = prepare(pool.oracle()) if pool.oracle_state is not None else None
    rows, measured_threads = [], []
    for count in s.threads:
        with _threads(count):
            threads = torch.get_num_threads()
            if threads in measured_threads:  # 0 (torch's default) may be a count already measured
                continue
            measured_threads.append(threads)
            for q in queries:
                rows += _time_query(q, s, inputs, threads, ort, progress)
            if oracle is not None:
                for b in s.batch_sizes:
                    progress(f"{threads} thread(s): oracle batch {b}")
                    rows.append({"model": "oracle", "format": MODULE, "tasks": None, "n": None, "batch": b,
                                 "threads": threads, "params": count_params(pool.oracle()),
                                 **time_calls({"oracle": oracle}, inputs[b], s.warmup, s.repeats,
                                              s.min_seconds)["oracle"]})

    def ips(model: str, n: int | None, b: int, t: int, fmt: str = MODULE) -> float | None:
        return next((r["images_per_s"] for r in rows if r["model"] == model and r["format"] == fmt
                     and r["n"] == n and r["batch"] == b and r["threads"] == t), None)

    def ratios(n: int, b: int, t: int) -> dict:
        fused, ref, orc = ips("fused", n, b, t), ips("reference", n, b, t), ips("oracle", None, b, t)
        return {"fused_over_reference": round(fused / ref, 3),
                "fused_over_oracle": round(fused / orc, 3) if orc else None}

    def by_format(n: int, b: int, t: int) -> dict:
        """Images/s of each measured file format and execution, and the fastest of them."""
        formats = {}
        for fmt in s.formats:
            fused, ref = ips("fused", n, b, t, fmt), ips("reference", n, b, t, fmt)
            if fused is not None and ref is not None:
                formats[fmt] = {"fused": fused, "reference": ref, "fused_over_reference": round(fused / ref, 3)}
        fastest = max(((f, e, v[e]) for f, v in formats.items() for e in ("fused", "reference")),
                      key=lambda c: c[2], default=None)
        return {"formats": formats, "fastest": None if fastest is None else
                {"format": fastest[0], "model": fastest[1], "images_per_s": fastest[2]}}

    # Per query size and batch: the ratios at the most threads measured, and at each thread count.
    most = max(measured_threads)
    summary = {_ratio_key(len(q.tasks), b): {**ratios(len(q.tasks), b, most),
                                             "threads": {str(t): ratios(len(q.tasks), b, t) for t in measured_threads}}
               for q in queries for b in s.batch_sizes}
    format_summary = {_ratio_key(len(q.tasks), b): {str(t): by_format(len(q.tasks), b, t) for t in measured_threads}
                      for q in queries if q.files is not None for b in s.batch_sizes}
    return {"part": "inference", "pool": pool.ref, "settings": dataclasses.asdict(s), "torch_threads": most,
            "threads": measured_threads, "mode": "eager" if s.eager else "torchscript", "rows": rows,
            "summary": summary, "format_summary": format_summary}


# The product's target for 5 experts (docs/ARCHITECTURE.md): fused over reference, by batch size.
TARGETS = {1: 1.5, 256: 1.0}


def _format_of(row: dict) -> str:
    return row.get("format", MODULE)  # results written before formats were measured have module rows only


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
        rows = [r for r in result["rows"] if r.get("threads", t) == t and _format_of(r) == MODULE]
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
    lines += _file_tables(result, batches, threads)
    n_max = max((r["n"] for r in result["rows"] if r["n"]), default=None)
    if n_max is not None:
        target = " and ".join(f">= {v:g}x at batch {b}" for b, v in TARGETS.items())
        lines += ["", f"Target: fused >= 1.5x reference for 5 experts at batch 1, never slower at batch 256 "
                      f"(fused/ref {target}). Measured for {n_max} experts (in-process modules):"]
        for t in threads:
            got = {b: _ratio(result, n_max, b, t) for b in batches}
            checked = [got[b] >= v for b, v in TARGETS.items() if b in got]
            verdict = ("not measured" if n_max < 5 or len(checked) < len(TARGETS)
                       else "met" if all(checked) else "missed")
            lines.append(f"- {t} thread(s): " + ", ".join(f"{g:.2f}x at batch {b}" for b, g in got.items())
                         + f" -> {verdict}.")
    return "\n".join(lines)


def _file_tables(result: dict, batches: list[int], threads: list[int]) -> list[str]:
    """Per query with model files and per thread count: images/s of each format and execution as
    loaded from its bytes, and the fastest file at each batch size."""
    file_rows = [r for r in result["rows"] if _format_of(r) != MODULE]
    lines = []
    for n in sorted({r["n"] for r in file_rows}):
        for t in threads:
            rows = [r for r in file_rows if r["n"] == n and r["threads"] == t]
            if not rows:
                continue
            lines += [
                "",
                f"**Model files, {n} expert(s) ({'+'.join(rows[0]['tasks'])}), {t} torch thread(s)**: each format "
                f"written by `serialize` (the bytes the composer streams) and loaded as a user loads it; onnxruntime "
                f"on the CPU provider with {t} intra-op thread(s), 1 inter-op.",
                "",
                "| format | loaded with | model | file | " + " | ".join(f"batch {b}" for b in batches) + " | "
                + " | ".join(f"fused/ref (batch {b})" for b in batches) + " |",
                "|---|---|---|---|" + "---|" * (2 * len(batches)),
            ]
            fmts = list(dict.fromkeys(r["format"] for r in rows))
            for fmt in fmts:
                missing = next((r["not_measured"] for r in rows if r["format"] == fmt and r.get("not_measured")), None)
                if missing:
                    lines.append(f"| {fmt} | {LOADED_WITH.get(fmt, '')} | fused, reference | – | {missing} |"
                                 + " |" * (2 * len(batches) - 1))
                    continue
                for model in ("fused", "reference"):
                    mine = {r["batch"]: r for r in rows if r["format"] == fmt and r["model"] == model}
                    size = next(iter(mine.values()))["file_bytes"]
                    cells = [f"{mine[b]['images_per_s']:,.0f}" if b in mine else "–" for b in batches]
                    ratio = ([_format_ratio(result, n, b, t, fmt) for b in batches] if model == "fused"
                             else [""] * len(batches))
                    name, loader = (fmt, LOADED_WITH.get(fmt, "")) if model == "fused" else ("", "")
                    lines.append(f"| {name} | {loader} | {model} | {size / 1e3:,.0f} kB | " + " | ".join(cells)
                                 + " | " + " | ".join(ratio) + " |")
            fastest = [(b, result.get("format_summary", {}).get(_ratio_key(n, b), {}).get(str(t), {}).get("fastest"))
                       for b in batches]
            named = [f"batch {b}: {f['format']} {f['model']} ({f['images_per_s']:,.0f}/s)" for b, f in fastest if f]
            if named:
                lines += ["", f"Fastest file at {t} thread(s): " + "; ".join(named) + "."]
    return lines


def _format_ratio(result: dict, n: int, batch: int, threads: int, fmt: str) -> str:
    entry = result.get("format_summary", {}).get(_ratio_key(n, batch), {}).get(str(threads), {})
    got = entry.get("formats", {}).get(fmt)
    return f"{got['fused_over_reference']:.2f}x" if got else "–"


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
