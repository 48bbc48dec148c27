"""The `poe` command line. Every command exits non-zero with a one-line reason on bad input; the exit
status names the class of failure (`poe.cli.output.EXIT_CODES`, listed by `poe --help`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from poe.cli.output import EXIT_CODES_HELP, EXIT_INTERRUPTED, emit, exit_code
from poe.engine.errors import PoeError


def _split(values: list[str] | None) -> list[str]:
    """`--classes "Sandal,Sneaker" --classes Bag` -> ['Sandal', 'Sneaker', 'Bag']."""
    out = []
    for v in values or []:
        out += [p.strip() for p in v.split(",") if p.strip()]
    return out


def _class_refs(values: list[str]) -> list[str | int]:
    from poe.engine.limits import ascii_id

    return [v if ascii_id(v) is None else ascii_id(v) for v in values]


# -- train ---------------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from poe.engine import pipeline
    from poe.engine import pool as pool_mod
    from poe.engine.config import resolve_device
    from poe.engine.data import load_dataset
    from poe.engine.nets import WRNConfig
    from poe.engine.train import CKDSettings, Schedule

    torch.set_num_threads(os.cpu_count() or 1)
    device = resolve_device(args.device)
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    train = load_dataset(args.dataset, "train")
    test = load_dataset(args.dataset, "test")
    if args.subset:
        train = train.stratified(args.subset // len(train.classes), args.seed)
        test = test.stratified(max(1, args.subset // (6 * len(train.classes))), args.seed)
    hier = pipeline.load_hierarchy(args.hierarchy)
    if len(hier.classes) != len(train.classes):
        raise PoeError(f"hierarchy {args.hierarchy} has {len(hier.classes)} classes, data set {len(train.classes)}")
    stages = ["oracle", "library", "experts", "pool"] if args.stage == "all" else [args.stage]

    spec = pipeline.OracleSpec(args.oracle_depth, args.oracle_width, args.stem_stride,
                               Schedule(args.oracle_epochs, args.batch_size, args.lr, seed=args.seed))
    if "oracle" not in stages and not (run / "oracle.safetensors").exists():
        raise PoeError(f"{run}: no trained oracle; run `poe train oracle --run {run}` first")
    oracle = pipeline.oracle_stage(run, train, test, spec, device)
    if stages == ["oracle"]:
        return 0
    views = pipeline.teacher_stage(run, oracle, train, args.views, device)
    student_cfg = WRNConfig(args.student_depth, args.student_width, train.input_shape[0], len(train.classes),
                            args.stem_stride, mean=oracle.cfg.mean, std=oracle.cfg.std)
    student = pipeline.library_stage(run, views, test, student_cfg,
                                     Schedule(args.library_epochs, args.batch_size, args.lr, seed=args.seed), device)
    if stages == ["library"]:
        return 0
    experts = pipeline.experts_stage(run, student, views, test, hier, args.expert_width,
                                     Schedule(args.expert_epochs, args.batch_size, args.lr, seed=args.seed),
                                     device, CKDSettings())
    if stages == ["experts"]:
        return 0
    oracle_meta = json.loads((run / "oracle.json").read_text())
    student_meta = json.loads((run / "student.json").read_text())
    info = {"dataset": train.name, "input_shape": list(train.input_shape),
            "oracle": {"params": oracle_meta["params"], "test_acc": oracle_meta.get("test_acc")},
            "student": {"params": student_meta["params"], "test_acc": student_meta.get("test_acc")},
            "train_log": "train.log"}
    p = pipeline.assemble_pool(run, args.name, args.version, hier, experts, student, oracle, info)
    out = pool_mod.save(p, args.out)
    log = run / "train.log"
    if log.exists():
        (out / "train.log").write_text(log.read_text())
    print(f"pool {p.ref} written to {out}")
    return 0


# -- compose / eval ------------------------------------------------------------------------------

def cmd_compose(args: argparse.Namespace) -> int:
    classes, tasks = _class_refs(_split(args.classes)), _split(args.tasks)
    if args.output is None:
        args.output = "model" + _SUFFIXES[args.format]
    if args.triton_repo and args.format not in ("onnx", "torchscript"):
        raise PoeError(f"--triton-repo: Triton serves the onnx or torchscript format, not {args.format}")
    if args.triton_repo:  # refuse a bad name or batch size before composing anything
        from poe.engine.triton import check_entry

        check_entry(_triton_name(args), args.format, args.triton_max_batch_size)
    if not args.local:
        return _compose_remote(args, classes, tasks)
    from poe.engine import pool as pool_mod
    from poe.engine.compose import composed_state, plan
    from poe.engine.export import ScriptCache, serialize

    t0 = time.perf_counter()
    pool = pool_mod.load(args.local, with_oracle=False)
    t1 = time.perf_counter()
    p = plan(pool, classes, tasks)
    # The composer's own path: the state, then the format's template (made here, used once).
    data, meta = serialize(pool, p, composed_state(pool, p, args.execution == "fused"), args.execution, args.format,
                           ScriptCache(copies=1))
    t2 = time.perf_counter()
    out = _write_atomic(Path(args.output), data)
    summary = {"output": str(out), "format": args.format, "pool": p.pool, "classes": list(p.class_names),
               "experts": list(p.tasks), "params": meta["params"], "bytes": len(data), "sha256": meta["sha256"],
               "load_ms": round((t1 - t0) * 1e3, 1), "compose_ms": round((t2 - t1) * 1e3, 1)}
    summary.update(_triton_entry(args, data, meta))
    return emit(summary, args.json, lambda: f"{out}: {', '.join(p.class_names)} from {p.pool} experts "
                f"[{', '.join(p.tasks)}], {meta['params']:,} params, {len(data) / 1024:.0f} KiB {args.format}, "
                f"composed in {summary['compose_ms']} ms{_triton_note(summary)}")


# Default output file per format (`poe compose` without -o); the keys are poe.engine.export.FORMATS,
# spelled out so that building the parser does not import torch.
LOAD_FORMATS = ("torchscript", "pt2", "onnx")  # what `poe bench load` asks for unless told
_SUFFIXES = {"torchscript": ".pt", "pt2": ".pt2", "onnx": ".onnx", "safetensors": ".safetensors"}


def _write_atomic(out: Path, data: bytes) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    return out


def _triton_entry(args: argparse.Namespace, data: bytes, meta: dict) -> dict:
    """With --triton-repo: write the model-repository entry; its folder for the summary."""
    if not args.triton_repo:
        return {}
    from poe.engine.triton import write_entry

    entry = write_entry(args.triton_repo, _triton_name(args), data, args.format, meta, args.triton_max_batch_size)
    return {"triton_entry": str(entry)}


def _triton_name(args: argparse.Namespace) -> str:
    return args.triton_name or Path(args.output).stem


def _triton_note(summary: dict) -> str:
    return f"; Triton entry {summary['triton_entry']}" if "triton_entry" in summary else ""


def _compose_remote(args: argparse.Namespace, classes: list, tasks: list[str]) -> int:
    from poe.client.composer import Composer
    from poe.engine.config import settings

    target = args.target or settings().composer_addr
    with Composer(target, timeout=args.timeout) as c:
        result = c.compose(classes, tasks=tasks, pool=args.pool or "", execution=args.execution, format=args.format)
    out = result.save(args.output)
    h = result.header
    summary = {"output": str(out), "format": h.format, "model_id": h.model_id, "pool": h.pool,
               "classes": list(h.classes), "experts": list(h.tasks), "params": h.params, "flops": h.flops,
               "bytes": h.size, "sha256": h.sha256, "expected_accuracy": round(h.expected_accuracy, 4),
               "cache_hit": h.cache_hit, "ms": round(result.seconds * 1e3, 1)}
    summary.update(_triton_entry(args, result.data, h.metadata))
    return emit(summary, args.json, lambda: f"{out}: {', '.join(h.classes)} from {h.pool} experts "
                f"[{', '.join(h.tasks)}], {h.params:,} params, {h.flops / 1e6:.1f} MFLOPs, {h.size / 1024:.0f} KiB "
                f"{h.format}, expected accuracy {h.expected_accuracy:.3f}, {summary['ms']} ms"
                f"{' (cached)' if h.cache_hit else ''}{_triton_note(summary)}")


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from poe.engine.export import load_model

    model, meta, _ = load_model(Path(args.model))
    c, h, w = meta["input"]["shape"]
    images = []
    for path in args.images:
        try:
            with Image.open(path) as im:
                im = im.convert("L" if c == 1 else "RGB").resize((w, h))
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except FileNotFoundError:
            raise PoeError(f"{path}: no such file") from None
        except (UnidentifiedImageError, OSError) as e:
            raise PoeError(f"{path}: not a readable image ({e})") from None
        if args.invert:
            arr = 1.0 - arr
        images.append(arr[None] if c == 1 else arr.transpose(2, 0, 1))
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(np.stack(images))), dim=1)
    rows = []
    for path, p in zip(args.images, probs, strict=True):
        k = int(p.argmax())
        rows.append({"image": path, "class": meta["classes"][k], "class_id": meta["class_ids"][k],
                     "probability": round(float(p[k]), 4)})
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{r['image']}\t{r['class']}\t{r['probability']:.3f}")
    return 0


def _find_pool_dir(ref: str, explicit: str | None) -> Path | None:
    from poe.engine.config import settings

    if explicit:
        return Path(explicit)
    name = ref.split("@", 1)[0]
    candidate = settings().pools_dir / name
    return candidate if (candidate / "pool.json").exists() else None


def cmd_eval(args: argparse.Namespace) -> int:
    from poe.engine import pool as pool_mod
    from poe.engine.data import load_dataset
    from poe.engine.evaluate import evaluate_model, logits_of
    from poe.engine.export import load_model

    model, meta, fmt = load_model(Path(args.model))
    test = load_dataset(args.dataset or meta.get("dataset", "fashion-mnist"), "test")
    if len(test.classes) <= max(meta["class_ids"]):
        raise PoeError(f"{args.model}: class ids {meta['class_ids']} do not fit data set {test.name}")
    oracle_logits, oracle_params = None, None
    pool_dir = _find_pool_dir(meta["pool"], args.pool)
    if pool_dir is not None:
        pool = pool_mod.load(pool_dir)
        if pool.oracle_state is not None:
            oracle = pool.oracle()
            oracle_logits = logits_of(oracle, test.images)
            oracle_params = sum(p.numel() for p in oracle.parameters())
    result = evaluate_model(model, meta["class_ids"], test, oracle_logits).as_dict()
    result.update({"model": str(args.model), "format": fmt, "pool": meta["pool"], "params": meta["params"],
                   "oracle_params": oracle_params})
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model   {args.model} ({fmt}): {', '.join(meta['classes'])}")
    print(f"images  {result['images']} test images of these classes ({test.name})")
    ratio = f" ({meta['params'] / oracle_params:.1%} of the oracle's {oracle_params:,})" if oracle_params else ""
    print(f"params  {meta['params']:,}{ratio}")
    print(f"accuracy composed {result['accuracy']:.4f}", end="")
    if result["oracle_accuracy"] is not None:
        print(f"   oracle (restricted) {result['oracle_accuracy']:.4f}   delta {result['delta'] * 100:+.2f} pt")
    else:
        print("   (no oracle found: pass --pool POOL_DIR)")
    return 0


# -- bench ---------------------------------------------------------------------------------------

def cmd_bench_pool(args: argparse.Namespace) -> int:
    from poe.bench import pool as bench_pool

    summary = bench_pool.run(args.pool, args.dataset, args.max_tasks, args.execution, args.target, args.served)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary) if args.json else bench_pool.table(summary))
    return 0


def cmd_bench_compose(args: argparse.Namespace) -> int:
    import tempfile

    from poe.bench import compose as bench
    from poe.bench import report

    quick = args.quick
    with tempfile.TemporaryDirectory(prefix="poe-bench-") as home:
        result = bench.run(args.pool, Path(home), per_case=5 if quick else args.per_case,
                           cold=3 if quick else args.cold, clients=4 if quick else args.clients,
                           throughput_requests=20 if quick else args.requests, s3=not args.file_blobs,
                           record=not args.no_record, fmt=args.format, processes=args.processes,
                           progress=lambda m: print(f"bench: {m}", file=sys.stderr, flush=True))
    result["quick"] = quick
    text = json.dumps(result, indent=2)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(text + "\n")
    if args.update_docs:
        section = "compose" + ("" if args.format == "torchscript" else f"-{args.format}") + \
            ("-no-record" if args.no_record else "") + (f"-processes{args.processes}" if args.processes > 1 else "")
        path = report.update_docs(args.docs, section, bench.markdown(result, _bench_command(args)), bench.TITLE)
        print(f"bench: wrote section {section} of {path}", file=sys.stderr)
    print(text)
    return 0


def cmd_bench_load(args: argparse.Namespace) -> int:
    from poe.bench import load as bench
    from poe.bench import report

    quick = args.quick
    started = time.time()
    result = bench.run(None if args.target else args.pool, target=args.target, served=args.served,
                       clients=2 if quick else args.clients, seconds=2.0 if quick else args.seconds,
                       warmup=1.0 if quick else args.warmup,
                       watch_streams=min(args.watch_streams, 4) if quick else args.watch_streams,
                       stuck_streams=min(args.stuck_streams, 8) if quick else args.stuck_streams,
                       formats=tuple(args.formats), seed=args.seed,
                       progress=lambda m: print(f"bench load: {m}", file=sys.stderr, flush=True))
    result = report.stamp(result, quick=quick, hw=report.hardware(), command=_bench_command(args), started=started)
    # The default mix has its section; another mix of formats its own (load-torchscript, ...).
    formats = tuple(args.formats)
    section = "load" if formats == LOAD_FORMATS else "load-" + "-".join(formats)
    return _write_bench_result(args, section, result, bench)


def cmd_bench_extract(args: argparse.Namespace) -> int:
    from poe.bench import extract as bench
    from poe.bench import report

    started = time.time()
    result = bench.run(args.pool, tuple(args.workers), quick=args.quick, dataset=args.dataset, subset=args.subset,
                       views=args.views, library_epochs=args.library_epochs, expert_epochs=args.expert_epochs,
                       batch_size=args.batch_size, seed=args.seed, cpus=args.cpus,
                       data_parallel_library=args.data_parallel_library,
                       progress=lambda m: print(f"bench extract: {m}", file=sys.stderr, flush=True))
    result = report.stamp(result, quick=args.quick, hw=report.hardware(), command=_bench_command(args),
                          started=started)
    return _write_bench_result(args, "extract", result, bench)


def cmd_bench_growth(args: argparse.Namespace) -> int:
    from poe.bench import growth as bench
    from poe.bench import report
    from poe.engine.errors import InvalidArgument

    quick = args.quick
    for flag, value in (("--requests", args.requests), ("--per-query-size", args.per_query_size),
                        ("--read-repeats", args.read_repeats)):
        if value < 1:
            raise InvalidArgument(f"{flag}: must be at least 1, got {value}")
    if not args.sizes or min(args.sizes) < 2 or max(args.sizes) > 100_000:
        raise InvalidArgument("--sizes: expected numbers of experts from 2 to 100000")
    if not args.experts_per_query or min(args.experts_per_query) < 1:
        raise InvalidArgument("--experts-per-query: expected numbers of experts of at least 1")
    started = time.time()
    result = bench.run(bench.QUICK_SIZES if quick else args.sizes,
                       bench.QUICK_EXPERTS_PER_QUERY if quick else args.experts_per_query,
                       requests=10 if quick else args.requests, per_query_size=5 if quick else args.per_query_size,
                       read_repeats=5 if quick else args.read_repeats, record=args.record, seed=args.seed,
                       progress=lambda m: print(f"bench growth: {m}", file=sys.stderr, flush=True))
    result = report.stamp(result, quick=quick, hw=report.hardware(), command=_bench_command(args), started=started)
    return _write_bench_result(args, "growth", result, bench)


def _write_bench_result(args: argparse.Namespace, name: str, result: dict, bench) -> int:
    """A stamped benchmark result: to --json-out, into its section of the docs (--update-docs), and
    printed as Markdown (or JSON with --json)."""
    from poe.bench import report

    text = bench.markdown(result, result["command"])
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    if args.update_docs:
        path = report.update_docs(args.docs, name, text, bench.TITLE)
        print(f"bench {name}: wrote section {name} of {path}", file=sys.stderr)
    print(json.dumps(result) if args.json else text)
    return 0


def _bench_command(args: argparse.Namespace) -> str:
    """The command line that reproduces a `poe bench` run: every option that differs from its default."""
    import shlex

    defaults = vars(build_parser().parse_args(["bench", args.bench]))
    parts = ["poe", "bench", args.bench]
    for key, value in vars(args).items():
        if key in ("command", "bench", "func") or value == defaults.get(key) or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        else:
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            parts += [flag, shlex.quote(text)]
    return " ".join(parts)


# The benchmarks that measure the method against trained models and the oracle, one module each.
_BENCH_MODULES = {"baselines": "poe.bench.baselines", "cross-expert": "poe.bench.cross_expert",
                  "inference": "poe.bench.inference"}
# Options about where the result goes, not what is measured.
_BENCH_OUTPUT_OPTIONS = ("command", "bench", "func", "pool", "quick", "json_out", "json", "update_docs", "docs")


def cmd_bench_part(args: argparse.Namespace) -> int:
    """`poe bench baselines | cross-expert | inference`: the module of _BENCH_MODULES, its Markdown
    section (or JSON) printed, written to --json-out and, with --update-docs, into --docs."""
    import importlib

    from poe.bench import report

    bench = importlib.import_module(_BENCH_MODULES[args.bench])
    options = {k: v for k, v in vars(args).items() if k not in _BENCH_OUTPUT_OPTIONS}
    if "run" in options:
        options["run_dir"] = options.pop("run")
    if options.pop("fp32", False):
        options["bf16"] = False
    result = bench.run(args.pool, quick=args.quick, command=_bench_command(args),
                       progress=lambda m: print(f"bench {args.bench}: {m}", file=sys.stderr, flush=True), **options)
    text = bench.markdown(result)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    if args.update_docs:
        path = report.update_docs(args.docs, args.bench, text, bench.TITLE)
        print(f"bench {args.bench}: updated section '{args.bench}' of {path}", file=sys.stderr)
    print(json.dumps(result) if args.json else text)
    return 0


def _int_list(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in _split([value]))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def _add_bench_part_parsers(bsub) -> None:
    def common(name: str, help_: str, description: str) -> argparse.ArgumentParser:
        p = bsub.add_parser(name, help=help_, description=description)
        p.add_argument("--pool", default="pools/fashion-mnist", help="pool directory (default pools/fashion-mnist)")
        p.add_argument("--quick", action="store_true",
                       help="tiny subsets, epochs and repeats: checks the harness in seconds (used by the tests)")
        p.add_argument("--seed", type=int, help="seed of the query sample, subsets and training (default 0)")
        p.add_argument("--json-out", help="also write the full result to this JSON file")
        p.add_argument("--json", action="store_true", help="print JSON instead of Markdown tables")
        p.add_argument("--update-docs", action="store_true",
                       help="write the tables between this benchmark's markers in --docs")
        p.add_argument("--docs", default="docs/BENCHMARKS.md", help="page to update (default docs/BENCHMARKS.md)")
        p.set_defaults(func=cmd_bench_part)
        return p

    def training(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--dataset", help="data set (default: the pool's)")
        p.add_argument("--run", metavar="RUN_DIR",
                       help="`poe train` run directory whose teacher_views.safetensors to reuse (else the oracle "
                            "computes them)")
        p.add_argument("--queries", type=int, help="a seeded sample of this many queries (default 0: all)")
        p.add_argument("--max-tasks", type=int, help="largest number of primitive tasks in a query (default 5)")
        p.add_argument("--epochs", type=int, help=f"epochs for {what}")
        p.add_argument("--batch-size", type=int, help="batch size (default 128)")
        p.add_argument("--lr", type=float, help="peak learning rate (default 0.1)")

    bb = common("baselines", "PoE against the oracle and Scratch / Transfer / CKD-head baselines: accuracy, "
                "size, time to build",
                "For queries of 1..5 primitive tasks: accuracy, parameters and FLOPs of the restricted oracle, "
                "PoE and three baselines trained for the query, and the time each baseline needs to reach "
                "PoE's accuracy against PoE's compose time (docs/BENCHMARKS.md).")
    training(bb, "each baseline (default 5; quick 1)")
    bb.add_argument("--eval-every", type=int, help="training steps between monitor evaluations (default 25)")
    bb.add_argument("--monitor-images", type=int, help="test images of the query watched during training "
                                                       "(default 1000)")
    bb.add_argument("--budget-s", type=float, help="cap on each baseline's training seconds per query (default: none)")
    bb.add_argument("--stop-at-target", action="store_true",
                    help="stop a baseline when it reaches PoE's accuracy (faster; truncates its accuracy)")
    bb.add_argument("--fp32", action="store_true", help="train the baselines in fp32 (default: bf16 autocast)")
    bb.add_argument("--methods", type=lambda v: tuple(_split([v])),
                    help="baselines to run, comma-separated (default scratch,transfer,ckd)")
    bb.add_argument("--compose-repeats", type=int, help="compose calls timed per query (median; default 5)")
    bb.add_argument("--device", help="where the baselines train: cpu (default), cuda, cuda:N or auto (CUDA when "
                                     "available); PoE's compose time is always measured on the CPU")

    bx = common("cross-expert", "share of errors across primitive tasks, experts trained on L_soft, L_scale, both",
                "Trains two ablation expert sets (L_soft only, L_scale only) on the pool's frozen library and "
                "compares the cross-expert error share of composed models for queries of 2..5 primitive tasks "
                "with the pool's own experts (L_soft + L_scale).")
    training(bx, "the ablation experts (default 10; quick 1)")
    bx.add_argument("--views", type=int, help="teacher views to compute when --run has none (default 4)")
    bx.add_argument("--work-dir", help="checkpoints of the ablation experts; a rerun resumes or reuses them "
                                       "(default runs/bench-cross-expert; quick: a temporary directory)")
    bx.add_argument("--retrain-both", action="store_true",
                    help="also train the L_soft + L_scale set on the same schedule instead of using the pool's")
    bx.add_argument("--device", help="where the ablation experts train: cpu (default), cuda, cuda:N or auto (CUDA "
                                     "when available); the expert sets are evaluated on the CPU")

    bi = common("inference", "images/s of composed models (fused, reference) and the oracle on the CPU",
                "Throughput at batch 1 and 256 of composed models (TorchScript, as `poe compose` ships them) "
                "for one query per number of primitive tasks, and of the oracle; for the largest query also each "
                "model file (TorchScript, pt2, ONNX) as loaded from its bytes.")
    bi.add_argument("--sizes", type=_int_list, help="numbers of primitive tasks to time (default 1,2,3,4,5)")
    bi.add_argument("--batch-sizes", type=_int_list, help="batch sizes (default 1,32,256)")
    bi.add_argument("--warmup", type=int, help="untimed calls first (default 5)")
    bi.add_argument("--repeats", type=int, help="timed calls, at least (default 20)")
    bi.add_argument("--min-seconds", type=float, help="time each case for at least this long (default 1)")
    bi.add_argument("--threads", type=_int_list, help="torch thread counts, each a full run (default 1,2; 0: torch's "
                    "default)")
    bi.add_argument("--eager", action="store_true", help="time eager modules instead of TorchScript")
    bi.add_argument("--formats", type=lambda v: tuple(_split([v])), help="model files to time as loaded from their "
                    "bytes (default torchscript,pt2,onnx; '' for none)")
    bi.add_argument("--format-sizes", type=_int_list, help="query sizes whose model files are timed (default: the "
                    "largest)")


# -- client TLS ----------------------------------------------------------------------------------

# Options of `poe` itself and of every command that talks to a service or serves (given before or
# after the command). Each sets its POE_TLS_* variable while the command runs, so that every client
# the command makes sees it, wherever in the command that client is made.
_CLIENT_TLS_OPTIONS = (
    ("--tls-ca", "FILE", "POE_TLS_CA", "CA bundle (PEM) that servers' certificates are checked against; turns TLS on"),
    ("--tls-cert", "FILE", "POE_TLS_CERT", "this client's certificate (PEM) for servers that require one (mutual TLS)"),
    ("--tls-key", "FILE", "POE_TLS_KEY", "the private key (PEM, unencrypted) of --tls-cert"),
    ("--tls-server-name", "NAME", "POE_TLS_SERVER_NAME",
     "the name the server's certificate must hold (default: the target's host)"),
)


def _add_client_tls_options(parser: argparse.ArgumentParser, default=None) -> None:
    group = parser.add_argument_group("TLS to services (also POE_TLS_CA, POE_TLS_CERT, POE_TLS_KEY, "
                                      "POE_TLS_SERVER_NAME)")
    for flag, metavar, _variable, text in _CLIENT_TLS_OPTIONS:
        group.add_argument(flag, metavar=metavar, default=default, help=text)


def _commands(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every command's own parser (the leaves under `parser`)."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        yield parser
        return
    for action in subparsers:
        for command in dict.fromkeys(action.choices.values()):
            yield from _commands(command)


def _add_client_tls_to_commands(parser: argparse.ArgumentParser) -> None:
    for command in _commands(parser):
        if {"--target", "--port"} & set(command._option_string_actions):
            # SUPPRESS: an option not given after the command keeps the value given before it.
            _add_client_tls_options(command, default=argparse.SUPPRESS)


@contextlib.contextmanager
def _client_tls_environment(args: argparse.Namespace) -> Iterator[None]:
    """The POE_TLS_* variables of the client TLS options given, for the duration of the block."""
    given = {variable: getattr(args, flag[2:].replace("-", "_"), None) for flag, _, variable, _ in _CLIENT_TLS_OPTIONS}
    given = {variable: value for variable, value in given.items() if value is not None}
    before = {variable: os.environ.get(variable) for variable in given}
    os.environ.update(given)
    try:
        yield
    finally:
        for variable, value in before.items():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value


# -- parser --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poe", description="Pool of Experts: small task-specific classifiers,\n"
                                     "composed train-free from a pool of distilled experts.",
                                     epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_client_tls_options(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train an oracle, a library and experts into a pool (offline, slow)",
                       description="Runs the offline pipeline in a run directory; every stage resumes from "
                                   "its last checkpoint and is skipped when finished.")
    t.add_argument("stage", choices=["oracle", "library", "experts", "pool", "all"])
    t.add_argument("--run", required=True, help="run directory (checkpoints, logs)")
    t.add_argument("--out", default="pools/fashion-mnist", help="pool directory to write (stage pool/all)")
    t.add_argument("--name", default="fashion-mnist", help="pool name")
    t.add_argument("--version", default="1", help="pool version")
    t.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, an IDX folder, an image folder or .npz")
    t.add_argument("--hierarchy", default="fashion-mnist", help="built-in hierarchy name or YAML/JSON file")
    t.add_argument("--subset", type=int, default=0, help="train on this many images only (quick runs)")
    t.add_argument("--oracle-depth", type=int, default=16)
    t.add_argument("--oracle-width", type=int, default=4)
    t.add_argument("--student-depth", type=int, default=16)
    t.add_argument("--student-width", type=int, default=1)
    t.add_argument("--expert-width", type=int, default=16)
    t.add_argument("--stem-stride", type=int, default=1, choices=[1, 2])
    t.add_argument("--oracle-epochs", type=int, default=15)
    t.add_argument("--library-epochs", type=int, default=10)
    t.add_argument("--expert-epochs", type=int, default=10)
    t.add_argument("--views", type=int, default=4, help="fixed augmented views of the training set for KD/CKD")
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=None, help="cpu, cuda or auto (default: POE_DEVICE or auto)")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("compose", help="compose a classifier for some classes (TorchScript, pt2, ONNX)")
    c.add_argument("--local", metavar="POOL_DIR", help="build from a pool directory, without services")
    c.add_argument("--target", metavar="HOST:PORT", help="composer to ask (default POE_COMPOSER_ADDR)")
    c.add_argument("--pool", help="pool: name, name@version or name@alias (default: the composer's default)")
    c.add_argument("--format", choices=list(_SUFFIXES), default="torchscript",
                   help="model file format: torchscript (default), pt2 (torch.export), onnx, or safetensors "
                        "(weights only)")
    c.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds (through the composer)")
    c.add_argument("--classes", action="append", help="class names or ids, comma-separated (repeatable)")
    c.add_argument("--tasks", action="append", help="primitive tasks, comma-separated (repeatable)")
    c.add_argument("--execution", choices=["fused", "reference"], default="fused")
    c.add_argument("-o", "--output", help="output file (default model.pt, model.pt2, model.onnx or "
                                           "model.safetensors, by format)")
    c.add_argument("--triton-repo", metavar="DIR",
                   help="also write a Triton model-repository entry DIR/NAME (config.pbtxt, labels.txt, "
                        "1/model.onnx or 1/model.pt); formats onnx and torchscript")
    c.add_argument("--triton-name", metavar="NAME", help="the entry's model name (default: the output file's stem)")
    c.add_argument("--triton-max-batch-size", type=int, default=256, metavar="N",
                   help="max_batch_size of the entry (default 256; requests are batched dynamically)")
    c.add_argument("--json", action="store_true", help="print the summary as JSON")
    c.set_defaults(func=cmd_compose)

    e = sub.add_parser("eval", help="accuracy of a composed model on the real test images of its classes")
    e.add_argument("model", help="composed model file (TorchScript, pt2 or ONNX, with poe.json)")
    e.add_argument("--pool", help="pool directory with the oracle to compare against (default: shipped pool)")
    e.add_argument("--dataset", help="data set to evaluate on (default: the model's)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="benchmarks (see docs/BENCHMARKS.md)")
    bsub = b.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    bp = bsub.add_parser("pool", help="accuracy of every query of 1..5 primitive tasks against the restricted oracle")
    bp.add_argument("--pool", default="pools/fashion-mnist",
                    help="pool directory (default pools/fashion-mnist); with --target only its oracle is used")
    bp.add_argument("--target", metavar="HOST:PORT",
                    help="take every model from the composer (and the tasks from the registry) at this address")
    bp.add_argument("--served", metavar="NAME[@VERSION]", help="with --target: the pool the composer serves")
    bp.add_argument("--dataset", help="test data set (default: the pool's)")
    bp.add_argument("--max-tasks", type=int, default=5)
    bp.add_argument("--execution", choices=["fused", "reference"], default="fused")
    bp.add_argument("--json-out", help="also write the full result to this JSON file")
    bp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bp.set_defaults(func=cmd_bench_pool)
    bc = bsub.add_parser("compose", help="ComposeModel latency and throughput over gRPC on loopback")
    bc.add_argument("--pool", default="pools/fashion-mnist", help="pool directory to import (default shipped pool)")
    bc.add_argument("--per-case", type=int, default=40, help="requests per number of primitive tasks (warm)")
    bc.add_argument("--cold", type=int, default=20, help="requests with empty caches (experts fetched from S3)")
    bc.add_argument("--clients", type=int, default=16, help="concurrent clients for the throughput case")
    bc.add_argument("--requests", type=int, default=400, help="distinct compositions in the throughput case")
    bc.add_argument("--processes", type=int, default=1,
                    help="composer processes sharing one port in the throughput case (poe serve composer --processes)")
    bc.add_argument("--file-blobs", action="store_true", help="filesystem blob store instead of S3 (moto)")
    bc.add_argument("--no-record", action="store_true", help="do not record compositions in the registry")
    bc.add_argument("--format", choices=list(_SUFFIXES), default="torchscript",
                    help="model format requested (default torchscript); the composer is warmed for it")
    bc.add_argument("--quick", action="store_true", help="a few requests per case (seconds; used by the tests)")
    bc.add_argument("--json-out", help="also write the result to this JSON file")
    bc.add_argument("--update-docs", action="store_true",
                    help="write the table between this benchmark's markers in --docs (section compose, "
                         "compose-FORMAT for another --format, -no-record appended with --no-record)")
    bc.add_argument("--docs", default="docs/BENCHMARKS.md", help="page to update (default docs/BENCHMARKS.md)")
    bc.set_defaults(func=cmd_bench_compose)
    bl = bsub.add_parser("load", help="many clients mixing ComposeModel and reads, with watch and stuck streams",
                         description="N clients, each a process of its own, mix new and repeated ComposeModel, "
                                     "DescribeComposition, ListPools and GetPool against a `poe up`-like server on "
                                     "loopback (or --target); optionally a second phase with WatchExtraction "
                                     "streams and ComposeModel streams that are never read. Reports calls/s, "
                                     "p50/p99 per operation, errors by code and the server's memory "
                                     "(docs/BENCHMARKS.md).")
    bl.add_argument("--pool", default="pools/fashion-mnist", help="pool directory to import (default shipped pool)")
    bl.add_argument("--target", metavar="HOST:PORT",
                    help="load this server instead of starting one (it must serve --served; POE_TOKEN for the "
                         "job the watch streams follow)")
    bl.add_argument("--served", default="fashion-mnist", metavar="NAME[@VERSION]",
                    help="with --target: the pool to ask for (default fashion-mnist)")
    bl.add_argument("--clients", type=int, default=32, help="client processes (default 32)")
    bl.add_argument("--seconds", type=float, default=60.0, help="seconds counted per phase (default 60)")
    bl.add_argument("--warmup", type=float, default=10.0,
                    help="seconds of load before counting starts, per phase (default 10)")
    bl.add_argument("--watch-streams", type=int, default=0,
                    help="also run a phase with this many WatchExtraction streams open (e.g. 40)")
    bl.add_argument("--stuck-streams", type=int, default=0,
                    help="also run a phase with this many ComposeModel streams that are never read (e.g. 200)")
    bl.add_argument("--formats", type=lambda v: tuple(_split([v])), default=LOAD_FORMATS,
                    help="model formats asked for, comma-separated; the server warms each (default "
                         "torchscript,pt2,onnx: pt2 and onnx warm for minutes on 2 cores)")
    bl.add_argument("--seed", type=int, default=0, help="seed of the class sets and the mix (default 0)")
    bl.add_argument("--quick", action="store_true",
                    help="2 clients, 1 + 2 s, at most 4 watch and 8 stuck streams (seconds; used by the tests)")
    bl.add_argument("--json-out", help="also write the result to this JSON file")
    bl.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    bl.add_argument("--update-docs", action="store_true",
                    help="write the tables between this benchmark's markers in --docs (section load, or "
                         "load-FORMATS for another --formats)")
    bl.add_argument("--docs", default="docs/BENCHMARKS.md", help="page to update (default docs/BENCHMARKS.md)")
    bl.set_defaults(func=cmd_bench_load)
    be = bsub.add_parser("extract", help="wall time of every extraction stage on Ray with 1, 2, ... workers",
                         description="The same extraction (the pool's oracle, a stratified subset of its data set) "
                                     "through the Ray executor's stages once per worker count, on a local Ray "
                                     "started with this machine's cores: seconds of the teacher views, the library, "
                                     "the features and the experts, and the speed-up over the first count "
                                     "(docs/BENCHMARKS.md).")
    be.add_argument("--workers", type=_int_list, default=(1, 2), help="worker counts, comma-separated (default 1,2)")
    be.add_argument("--pool", default="pools/fashion-mnist", help="pool directory whose oracle and hierarchy to use")
    be.add_argument("--dataset", help="data set (default: the pool's)")
    be.add_argument("--subset", type=int, default=3_000, help="training images, a stratified subset (default 3000)")
    be.add_argument("--views", type=int, default=2, help="teacher views per image (default 2)")
    be.add_argument("--library-epochs", type=int, default=1, help="KD epochs of the library (default 1)")
    be.add_argument("--expert-epochs", type=int, default=5, help="CKD epochs of each expert (default 5)")
    be.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    be.add_argument("--seed", type=int, default=0, help="seed of the subset and the training (default 0)")
    be.add_argument("--cpus", type=int, default=0, help="CPUs of the local Ray (default 0: this machine's cores)")
    be.add_argument("--data-parallel-library", action="store_true",
                    help="train the library on as many Ray Train workers as the row's count (default: one task)")
    be.add_argument("--quick", action="store_true",
                    help="300 images, 1 view, 1 epoch each, a WRN-10 student, 2 experts (for the tests)")
    be.add_argument("--json-out", help="also write the result to this JSON file")
    be.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    be.add_argument("--update-docs", action="store_true",
                    help="write the table between this benchmark's markers in --docs (section extract)")
    be.add_argument("--docs", default="docs/BENCHMARKS.md", help="page to update (default docs/BENCHMARKS.md)")
    be.set_defaults(func=cmd_bench_extract)
    bg = bsub.add_parser("growth", help="compose latency by registry size and by experts per query; registry reads",
                         description="Synthetic pools (random weights) in a real registry, a real composer, gRPC on "
                                     "loopback: ComposeModel p50/p99 with the registry holding each of --sizes "
                                     "experts, by experts per query (with a fitted line), and GetPool / ListExperts "
                                     "with the largest registry (docs/BENCHMARKS.md).")
    bg.add_argument("--sizes", type=_int_list, default=(10, 100, 1_000, 10_000),
                    help="experts in the registry, comma-separated (default 10,100,1000,10000)")
    bg.add_argument("--experts-per-query", type=_int_list, default=(1, 2, 5, 10, 20, 50),
                    help="experts each query needs, on the largest registry (default 1,2,5,10,20,50)")
    bg.add_argument("--requests", type=int, default=200, help="compositions timed per registry size (default 200)")
    bg.add_argument("--per-query-size", type=int, default=60,
                    help="compositions timed per number of experts per query (default 60)")
    bg.add_argument("--read-repeats", type=int, default=50, help="GetPool and ListExperts calls timed (default 50)")
    bg.add_argument("--record", action="store_true",
                    help="record compositions in the registry, as deployed (default off: with pools of 1,000 "
                         "experts the recordings outlast the run and compete for the CPU)")
    bg.add_argument("--seed", type=int, default=0, help="seed of the class sets (default 0)")
    bg.add_argument("--quick", action="store_true",
                    help="10 and 100 experts, 1-10 experts per query, a few requests (under a minute; for the tests)")
    bg.add_argument("--json-out", help="also write the result to this JSON file")
    bg.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    bg.add_argument("--update-docs", action="store_true",
                    help="write the tables between this benchmark's markers in --docs (section growth)")
    bg.add_argument("--docs", default="docs/BENCHMARKS.md", help="page to update (default docs/BENCHMARKS.md)")
    bg.set_defaults(func=cmd_bench_growth)
    _add_bench_part_parsers(bsub)  # baselines, cross-expert, inference

    pr = sub.add_parser("predict", help="classify image files with a composed model")
    pr.add_argument("model", help="composed model file (TorchScript, pt2 or ONNX, with poe.json)")
    pr.add_argument("images", nargs="+", metavar="IMAGE", help="image files (resized to the model's input)")
    pr.add_argument("--invert", action="store_true",
                    help="invert pixel values (Fashion-MNIST items are light on a black background)")
    pr.add_argument("--json", action="store_true", help="print JSON")
    pr.set_defaults(func=cmd_predict)

    from poe.cli import extract, registry, serve, token

    registry.add_parser(sub)  # `poe registry ...` (migrate, import, list, serve)
    serve.add_parsers(sub)  # `poe serve NAME`, `poe up`
    extract.add_parser(sub)  # `poe extract ...` (start, status, list, cancel)
    token.add_parsers(sub)  # `poe token create|list|revoke`
    _add_client_tls_to_commands(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _client_tls_environment(args):
            return args.func(args)
    except PoeError as e:  # also a bad POE_* setting, read by the command (settings() raises InvalidArgument)
        print(f"poe: error: {e}", file=sys.stderr)
        return exit_code(e)
    except KeyboardInterrupt:
        print("poe: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
