"""`poe extract ...`: extraction jobs on the extractor service (`poe serve extractor` runs it).

    poe extract --dataset D --oracle O [--hierarchy H] [--follow]   start a job (prints its id)
    poe extract status ID [--follow]                                 one job; --follow shows progress
    poe extract list [--state S]                                     jobs, newest first
    poe extract cancel ID                                            stop a job; nothing is published

`--target` is HOST:PORT of an extractor (default POE_EXTRACTOR_ADDR, else 127.0.0.1:50051, where
`poe up` listens), or `embedded`: a registry and an extractor started inside this command on the
embedded storage under POE_HOME, for as long as it follows the job.

`--oracle` is a registered oracle id (`42` or `registry:42`), a local safetensors file (the
weights of a WideResNet with its config: `--oracle-config`, or the JSON that `poe train` writes
beside it), which is uploaded to the registry and sent by id, or a file in the extractor's oracle
directory (POE_EXTRACTOR_ORACLE_DIR: a TorchScript module, or any path not on this machine), sent as
a path for the extractor to open there. A local `--hierarchy` file is sent inline; data set paths
are opened by the extractor, inside its POE_DATA_DIR or oracle directory. `--follow` shows a
progress bar; Ctrl-C detaches without cancelling.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from poe.cli.output import emit, table
from poe.engine.errors import InvalidArgument, PoeError

EMBEDDED = "embedded"
NUMERIC = ("student_depth", "student_width", "stem_stride", "expert_width", "library_epochs", "expert_epochs",
           "batch_size", "lr", "temperature", "soft_weight", "scale_weight", "views", "seed", "subset",
           "ray_workers", "ray_cpus_per_task", "ray_gpus_per_task", "library_workers")


def _default_target() -> str:
    from poe.engine.config import settings

    return settings().extractor_addr


@contextlib.contextmanager
def extractor_client(target: str) -> Iterator:
    """(ExtractorClient, embedded host or None) for `target`; `embedded` hosts registry + extractor
    in this process on a loopback port for the block."""
    from poe.client.extractor import ExtractorClient

    if target != EMBEDDED:
        with ExtractorClient(target) as client:
            yield client, None
        return
    from poe.engine.config import settings
    from poe_services.host import create_server

    cfg = settings()
    host = create_server("127.0.0.1:0", cfg, ("registry", "extractor"), migrate=cfg.database_url.startswith("sqlite"))
    host.start()
    try:
        if not host.runtimes["extractor"].recovered.wait(60):
            raise PoeError("the embedded extractor did not come up within 60 s")
        with ExtractorClient(f"127.0.0.1:{host.port}", token=host.issue_token("admin", "embedded")) as client:
            yield client, host
    finally:
        host.runtimes["extractor"].close()  # workers and the extractor's registry channel first
        host.stop(None).wait(30)


# -- formatting ------------------------------------------------------------------------------------

def _ts(t) -> str | None:
    return t.ToDatetime().isoformat(timespec="seconds") + "Z" if t.seconds else None


def job_dict(job, progress=None, with_params: bool = False) -> dict:
    from poe.contract import state_name

    out = {"id": job.id, "state": state_name(job.state), "progress": round(job.progress, 4), "stage": job.stage,
           "message": job.message, "error": job.error or None, "pool": job.pool or None,
           "oracle_id": job.oracle_id or None, "created": _ts(job.create_time), "updated": _ts(job.update_time)}
    if progress is not None:
        out["detail"] = {"phase": progress.phase, "expert": progress.expert, "experts": progress.experts,
                         "task": progress.task, "epoch": progress.epoch, "epochs": progress.epochs,
                         "step": progress.step, "steps": progress.steps, "loss": round(progress.loss, 5),
                         "eta_seconds": progress.eta_seconds if progress.HasField("eta_seconds") else None,
                         "attempt": progress.attempt, "device": progress.device, "live": progress.live}
    if with_params and job.params_json:
        out["params"] = json.loads(job.params_json)
    return out


def _eta(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


# -- following -------------------------------------------------------------------------------------

def _follow(client, job_id: str, as_json: bool, host=None) -> int:
    """Show progress until the job ends; Ctrl-C detaches (the job keeps running)."""
    from tqdm import tqdm

    from poe.contract import state_name

    # The message goes in {desc}: tqdm puts ", " before a {postfix}.
    bar = tqdm(total=1000, bar_format=f"job {job_id[:12]} {{percentage:3.0f}}%|{{bar:24}}| {{desc}}",
               file=sys.stderr, disable=as_json or os.environ.get("POE_NO_PROGRESS") == "1", mininterval=0.25)
    last = None
    try:
        for update in client.follow(job_id):
            last = update
            bar.n = int(round(1000 * update.job.progress))
            eta = f", ETA {_eta(update.progress.eta_seconds)}" if update.progress.HasField("eta_seconds") else ""
            bar.set_description_str(f"{update.job.message}{eta}", refresh=False)
            bar.refresh()
    except KeyboardInterrupt:
        bar.close()
        if host is not None:
            print(f"poe: stopping the embedded extractor; job {job_id} stays RUNNING and resumes the next time an "
                  "extractor runs on this POE_HOME", file=sys.stderr)
        else:
            print(f"poe: detached; job {job_id} keeps running (poe extract status {job_id} --follow, "
                  f"poe extract cancel {job_id})", file=sys.stderr)
        return 0
    bar.close()
    job = last.job
    if as_json:
        print(json.dumps(job_dict(job, last.progress)))
    state = state_name(job.state)
    if state == "succeeded":
        if not as_json:
            print(f"job {job.id} succeeded: published {job.pool}")
        return 0
    if state == "failed":
        raise PoeError(f"job {job.id} failed: {job.error}")
    if state == "cancelled":
        raise PoeError(f"job {job.id} was cancelled")
    raise PoeError(f"job {job.id} is {state}")  # pragma: no cover - follow ends on terminal


# -- start -----------------------------------------------------------------------------------------

def _split(values: list[str] | None) -> list[str]:
    return [p.strip() for v in values or [] for p in v.split(",") if p.strip()]


MAX_LOCAL_ORACLE_BYTES = 1 << 30
MAX_LOCAL_SIDE_BYTES = 1 << 20


def _read_local(path: Path, max_bytes: int, what: str) -> bytes:
    """A regular file of this machine, at most `max_bytes` (never a FIFO or device)."""
    try:
        if not path.is_file():
            raise InvalidArgument(f"{what}: {path}: not a regular file")
        if path.stat().st_size > max_bytes:
            raise InvalidArgument(f"{what}: {path}: larger than {max_bytes} bytes")
        with open(path, "rb") as f:
            return f.read(max_bytes + 1)[:max_bytes]
    except OSError as e:
        raise InvalidArgument(f"{what}: {path}: cannot read ({e.strerror or e})") from None


def _oracle(args: argparse.Namespace, params: dict, registry: tuple[str, str | None]) -> None:
    """params["oracle"]: an id as it is, a local safetensors file uploaded first, anything else as
    a path in the extractor's oracle directory."""
    ref = args.oracle
    if ref is None:
        if args.upload:
            raise InvalidArgument("--upload needs --oracle FILE")
        return
    if ref.isdigit() or ref.startswith("registry:"):
        params["oracle"] = {"registry_id": int(ref.removeprefix("registry:"))}
        return
    path = Path(ref).expanduser()
    config_json = ""
    if args.oracle_config:
        cfg_path = Path(args.oracle_config)
        config_json = cfg_path.read_text() if cfg_path.is_file() else args.oracle_config
    local = path.is_file()
    if local:
        with open(path, "rb") as f:
            local = not f.read(4).startswith(b"PK\x03\x04")  # TorchScript (a zip) is never uploaded
    if args.upload and not local:
        raise InvalidArgument(f"--upload sends local safetensors oracles only; {ref} is " +
                              ("TorchScript, which the extractor loads only from its oracle directory (pass its path "
                               "there without --upload)" if path.is_file() else "not a file here"))
    if not local:
        params["oracle"] = {"path": str(path.resolve()) if path.exists() else ref}
        if config_json:
            params["oracle"]["config_json"] = config_json
        return
    params["oracle"] = {"registry_id": _upload(path, config_json, args, registry)}


def _upload(path: Path, config_json: str, args: argparse.Namespace, registry: tuple[str, str | None]) -> int:
    """Register a local safetensors oracle (and its hierarchy) in the registry (`registry`: target
    and token); returns its id. The weights are checked here first (the registry checks them again)."""
    from poe.client.registry import RegistryClient
    from poe.engine.data import builtin_dataset
    from poe.engine.hierarchy import builtin, load
    from poe.engine.nets import count_params
    from poe_services.extractor import oracles

    data = _read_local(path, MAX_LOCAL_ORACLE_BYTES, "--oracle")

    def read_side(side: Path) -> bytes | None:
        return _read_local(side, MAX_LOCAL_SIDE_BYTES, "--oracle") if side.exists() else None

    oracles.check_safetensors_header(data, path.name, "--oracle")
    config = oracles.config_for_file(path, data, config_json, "--oracle", read_side)
    cfg = oracles.oracle_config(config, "--oracle-config")
    model = oracles.load_weights(cfg, data, path.name, "--oracle")
    dataset = builtin_dataset(args.dataset or "")
    if args.hierarchy and Path(args.hierarchy).is_file():
        hier = load(args.hierarchy)
    elif args.hierarchy or dataset is not None:
        hier = builtin(args.hierarchy or dataset.hierarchy)
    else:
        raise InvalidArgument(f"--oracle {path.name} is uploaded to the registry, which files oracles under a data "
                              "set: give --hierarchy")
    target, token = registry
    try:
        with RegistryClient(target, token=token) as reg:
            reg.register_hierarchy(hier)
            o, created = reg.register_oracle(f"oracle {path.name}", hier.dataset, cfg.to_dict(), data,
                                             params=count_params(model), metrics={"source": str(path.resolve())})
    except PoeError as e:  # say where it went: the registry may be another address than the extractor's
        raise type(e)(f"uploading --oracle {path.name} to the registry at {target} (--registry): {e}") from None
    print(f"oracle {path.name} {'uploaded' if created else 'already in the registry'}: id {o.id}", file=sys.stderr)
    return o.id


def _start_params(args: argparse.Namespace, registry: tuple[str, str | None]) -> dict:
    if not args.dataset:
        raise InvalidArgument("--dataset is required (fashion-mnist, an IDX folder, an image folder or an .npz)")
    path = Path(args.dataset).expanduser()
    params: dict = {"dataset": args.dataset}
    if path.exists():
        from poe.engine.data import builtin_dataset  # torch: imported only when a path could be meant

        if builtin_dataset(args.dataset) is None:
            params["dataset"] = str(path.resolve())  # the extractor's working directory is not ours
    if args.hierarchy:
        if Path(args.hierarchy).is_file():
            params["hierarchy_text"] = Path(args.hierarchy).read_text()
        else:
            params["hierarchy"] = args.hierarchy
    _oracle(args, params, registry)
    for key, value in (("tasks", _split(args.tasks)), ("aliases", args.alias or []), ("base_pool", args.base_pool),
                       ("pool_name", args.name), ("pool_version", args.version), ("device", args.device)):
        if value:
            params[key] = value
    for key in NUMERIC:
        value = getattr(args, key)
        if value is not None:
            params[key] = value
    return params


def cmd_start(args: argparse.Namespace) -> int:
    target = args.target or _default_target()
    if not args.dataset:
        raise InvalidArgument("--dataset is required (fashion-mnist, an IDX folder, an image folder or an .npz)")
    with extractor_client(target) as (client, host):
        if host is not None:  # an uploaded oracle goes to the embedded registry
            registry = (f"127.0.0.1:{host.port}", host.issue_token("admin", "embedded"))
        else:
            registry = (args.registry or os.environ.get("POE_REGISTRY_ADDR") or target, None)
        params = _start_params(args, registry)
        job = client.start(params, job_id=args.job_id or "")
        if not (args.follow or host is not None):
            if args.json:
                print(json.dumps(job_dict(job)))
            else:
                pool = json.loads(job.params_json)["pool"]
                print(f"job {job.id} queued: extracting {pool['name']}@{pool['version']} "
                      f"(poe extract status {job.id} --follow)")
            return 0
        print(f"job {job.id} started", file=sys.stderr, flush=True)
        return _follow(client, job.id, args.json, host)


# -- status / list / cancel ------------------------------------------------------------------------

def cmd_status(args: argparse.Namespace) -> int:
    with extractor_client(args.target or _default_target()) as (client, host):
        if args.follow:
            return _follow(client, args.job_id, args.json, host)
        resp = client.get(args.job_id)
    d = job_dict(resp.job, resp.progress, with_params=args.json)
    if args.json:
        print(json.dumps(d))
        return 0
    detail = d["detail"]
    print(f"job       {d['id']}")
    print(f"state     {d['state']}" + (f" (attempt {detail['attempt']}, {detail['device']})" if detail["live"] else ""))
    print(f"progress  {100 * d['progress']:.0f}%" +
          (f", ETA {_eta(detail['eta_seconds'])}" if detail["eta_seconds"] is not None else ""))
    print(f"message   {d['message']}")
    for key in ("pool", "error", "oracle_id", "created", "updated"):
        if d[key]:
            print(f"{key:<9} {d[key]}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with extractor_client(args.target or _default_target()) as (client, _host):
        jobs = [job_dict(j) for j in client.list(args.state)]
    return table(jobs, args.json, empty="no extraction jobs",
                 header=f"{'JOB':<32} {'STATE':<10} {'PROGRESS':>8}  {'POOL':<20} MESSAGE",
                 line=lambda j: f"{j['id']:<32} {j['state']:<10} {100 * j['progress']:>7.0f}%  "
                                f"{j['pool'] or '':<20} {(j['message'] or '')[:60]}")


def cmd_cancel(args: argparse.Namespace) -> int:
    with extractor_client(args.target or _default_target()) as (client, _host):
        job = client.cancel(args.job_id)
    return emit(job_dict(job), args.json, lambda: f"job {job.id} cancelled")


# -- parsers ---------------------------------------------------------------------------------------

def _target_flag(p: argparse.ArgumentParser, default=None) -> None:
    p.add_argument("--target", default=default, metavar="HOST:PORT|embedded",
                   help="extractor to talk to (default POE_EXTRACTOR_ADDR, else 127.0.0.1:50051)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `extract` command (start a job; status, list, cancel) to the `poe` parser's subparsers."""
    ex = subparsers.add_parser("extract", help="extraction jobs: oracle -> library + experts -> published pool",
                               description=__doc__.split("\n\n")[1] if __doc__ else None,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    _target_flag(ex)
    ex.add_argument("--dataset", help="fashion-mnist, or (on the extractor) an IDX folder, image folder or .npz")
    ex.add_argument("--oracle", help="registered oracle id, a local safetensors file (uploaded to the registry), or "
                                     "a file in the extractor's oracle directory (TorchScript)")
    ex.add_argument("--oracle-config", help="WRNConfig JSON (or a JSON file) of a safetensors oracle")
    ex.add_argument("--upload", action="store_true",
                    help="insist that --oracle is a local safetensors file to upload (what happens to one anyway)")
    ex.add_argument("--registry", metavar="HOST:PORT",
                    help="registry for --upload (default POE_REGISTRY_ADDR, else the extractor's address)")
    ex.add_argument("--hierarchy", help="built-in hierarchy name or a YAML/JSON file (default: the data set's)")
    ex.add_argument("--tasks", action="append", help="primitive tasks to train, comma-separated (default: all new)")
    ex.add_argument("--base-pool", help="incremental: reuse this pool's library and experts (name[@version])")
    ex.add_argument("--name", help="pool name (default: the base pool's, else the data set's)")
    ex.add_argument("--version", help="pool version (default: the next integer)")
    ex.add_argument("--alias", action="append", help="also point this alias at the new version (repeatable)")
    for flag, kind, text in (
            ("--student-depth", int, "student WRN depth (default 16)"),
            ("--student-width", int, "student WRN width (default 1)"),
            ("--stem-stride", int, "student stem stride, 1 or 2 (default 1)"),
            ("--expert-width", int, "expert width (default 16)"),
            ("--library-epochs", int, "KD epochs of the student (default 10)"),
            ("--expert-epochs", int, "CKD epochs per expert (default 10)"),
            ("--batch-size", int, "default 128"), ("--lr", float, "default 0.1"),
            ("--temperature", float, "distillation temperature (default 4)"),
            ("--soft-weight", float, "CKD soft-loss weight (default 1)"),
            ("--scale-weight", float, "CKD scale-loss weight (default 0.3)"),
            ("--views", int, "fixed augmented views of the training set (default 4)"),
            ("--seed", int, "default 0"), ("--subset", int, "train on about this many images (quick runs)"),
            ("--ray-workers", int, "Ray tasks per stage: shards, experts at once (default: the extractor's)"),
            ("--ray-cpus-per-task", float, "CPUs (torch threads) of each Ray task (default: the extractor's)"),
            ("--ray-gpus-per-task", float, "GPUs of each Ray task, fractions share one (default: the extractor's)"),
            ("--library-workers", int, "data-parallel workers of the library's KD (default: the extractor's)")):
        ex.add_argument(flag, type=kind, help=text)
    ex.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the extractor's POE_DEVICE)")
    ex.add_argument("--job-id", help="choose the job id (a retry with the same id and flags is idempotent)")
    ex.add_argument("--follow", action="store_true", help="show progress until the job ends (Ctrl-C detaches)")
    ex.add_argument("--json", action="store_true", help="print JSON")
    ex.set_defaults(func=cmd_start)

    sub = ex.add_subparsers(dest="extract_command", metavar="{status,list,cancel}")
    st = sub.add_parser("status", help="one job: state, progress, result")
    st.add_argument("job_id", metavar="ID")
    st.add_argument("--follow", action="store_true", help="show progress until the job ends (Ctrl-C detaches)")
    ls = sub.add_parser("list", help="extraction jobs, newest first")
    ls.add_argument("--state", choices=["pending", "running", "succeeded", "failed", "cancelled"])
    ca = sub.add_parser("cancel", help="cancel a pending or running job (nothing is published)")
    ca.add_argument("job_id", metavar="ID")
    for p, func in ((st, cmd_status), (ls, cmd_list), (ca, cmd_cancel)):
        # SUPPRESS: a --target/--json given before the subcommand is not reset by the subcommand.
        _target_flag(p, argparse.SUPPRESS)
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
        p.set_defaults(func=func)
    return ex
