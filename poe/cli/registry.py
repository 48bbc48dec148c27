"""`poe registry ...` commands.

    poe registry migrate [--status]                 bring the database schema to head (Alembic)
    poe registry import POOL_DIR [--target T]       register and publish a pool directory
    poe registry list [--target T] [--class NAME]   published pool versions
    poe registry describe POOL[@VERSION]            one version: hierarchy, library, experts, oracle, sizes
    poe registry lineage POOL[@VERSION]             where it came from: library, oracle, data set, experts, job
    poe registry export POOL[@VERSION] DIR          write it back as a pool directory (sha256 verified)
    poe registry alias set POOL ALIAS VERSION       point an alias at a version
    poe registry alias delete POOL ALIAS            remove an alias
    poe registry version delete POOL VERSION --yes  delete a version (its cached models go with it)
    poe registry gc [--apply] [--older-than 1h]     remove what crashes left (dry run without --apply)
    poe registry fsck                               verify every blob's sha256; rows vs stored bytes
    poe registry serve [--port P]                   run the registry service (same as `poe serve registry`)

`--target` is HOST:PORT of a running registry, or `embedded`: a registry started inside this
process on a loopback port, on the configured database and blob store (POE_DATABASE_URL,
POE_BLOB_URL; by default SQLite and files under POE_HOME) and reached over gRPC like any other.
The embedded registry migrates a SQLite database by itself; any other database must be migrated
with `poe registry migrate` first. Default target: POE_REGISTRY_ADDR when set, else embedded.
Every command that talks to a registry prints text for people, or one JSON document with --json.

`migrate`, `gc` and `fsck` work on the database and the blob store directly (POE_DATABASE_URL,
POE_BLOB_URL), not through a registry; gc and fsck are safe while registries serve.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from poe.cli.output import EXIT_FAILURE, EXIT_FSCK_PROBLEMS, EXIT_UNAVAILABLE, EXIT_USAGE, emit, table
from poe.engine.errors import NotFound

EMBEDDED = "embedded"


def _settings(args: argparse.Namespace):
    from poe.engine.config import settings

    return settings(database_url=getattr(args, "database_url", None), blob_url=getattr(args, "blob_url", None))


def _default_target() -> str:
    return os.environ.get("POE_REGISTRY_ADDR") or EMBEDDED


@contextlib.contextmanager
def registry_client(target: str, args: argparse.Namespace) -> Iterator:
    """A RegistryClient for `target`; `embedded` starts a registry on a loopback port for the block."""
    from poe.client.registry import RegistryClient

    if target != EMBEDDED:
        with RegistryClient(target) as client:
            yield client
        return
    from poe_services.host import create_server

    cfg = _settings(args)
    # A server for this command alone, on loopback: plaintext whatever POE_TLS_* says.
    host = create_server("127.0.0.1:0", cfg.without_server_tls(), ("registry",),
                         migrate=cfg.database_url.startswith("sqlite"))
    host.start()
    try:
        with RegistryClient(f"127.0.0.1:{host.port}", token=host.issue_token("admin", "embedded"), tls=False) as client:
            yield client
    finally:
        host.stop(None).wait(30)


def _add_storage_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--database-url", help="SQLAlchemy URL (default: POE_DATABASE_URL or SQLite under POE_HOME)")
    p.add_argument("--blob-url", help="file://DIR or s3://BUCKET[/PREFIX] (default: POE_BLOB_URL)")


def duration(text: str) -> float:
    """Seconds from "90", "90s", "30m", "1h" or "7d" (an argparse type)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 90s, 30m, 1h, 7d)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


@contextlib.contextmanager
def _storage(args: argparse.Namespace) -> Iterator:
    """(settings, metadata store, blob store) of the configured registry, opened directly."""
    from poe_services.registry.blobstore import open_blob_store
    from poe_services.registry.sqlstore import SqlRegistryStore

    cfg = _settings(args)
    store = SqlRegistryStore(cfg.database_url)  # FailedPrecondition naming `migrate` on an old schema
    try:
        blobs = open_blob_store(cfg.blob_url, cfg)
        try:
            yield cfg, store, blobs
        finally:
            blobs.close()
    finally:
        store.close()


def _add_target_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None, metavar="HOST:PORT|embedded",
                   help="registry to talk to (default: POE_REGISTRY_ADDR if set, else embedded)")


# -- commands ------------------------------------------------------------------------------------

def cmd_migrate(args: argparse.Namespace) -> int:
    from poe_services.registry import db

    cfg = _settings(args)
    engine = db.make_engine(cfg.database_url)
    where = db.redact(cfg.database_url)
    try:
        before = db.schema_status(engine)
        if args.status:
            state = "up to date" if before.up_to_date else f"needs `{db.MIGRATE_COMMAND}`"
            print(f"{where}: schema {before.current or 'empty'}, head {before.head} ({state})")
            return 0 if before.up_to_date else 1
        if not before.known:
            db.require_current_schema(engine)  # raises: migrated by a newer release
        if before.up_to_date:
            print(f"{where}: schema already at {before.head}")
            return 0
        after = db.upgrade(engine, args.revision)
        print(f"{where}: schema {before.current or 'empty'} -> {after.current}")
        return 0
    finally:
        engine.dispose()


def cmd_import(args: argparse.Namespace) -> int:
    target = args.target or _default_target()

    def progress(msg: str) -> None:
        print(f"  {msg}", file=sys.stderr, flush=True)

    print(f"importing {args.pool_dir} into the registry ({target})", file=sys.stderr, flush=True)
    with registry_client(target, args) as client:
        pv, created = client.import_pool(args.pool_dir, aliases=args.alias or (), progress=progress)
    summary = {"pool": f"{pv.name}@{pv.version}", "created": created, "aliases": list(pv.aliases),
               "dataset": pv.dataset, "experts": [x.task for x in pv.experts], "params": pv.params}
    return emit(summary, args.json, lambda: f"{summary['pool']} {'published' if created else 'already published'}: "
                f"{len(pv.experts)} experts on library {pv.library.id}, aliases {', '.join(pv.aliases)}")


def cmd_list(args: argparse.Namespace) -> int:
    target = args.target or _default_target()
    with registry_client(target, args) as client:
        pools = list(client.list_pools(name=args.name or "", dataset=args.dataset or "",
                                       class_name=args.class_name or "", alias=args.alias or ""))
    rows = [{"pool": f"{p.name}@{p.version}", "aliases": list(p.aliases), "dataset": p.dataset,
             "experts": [x.task for x in p.experts], "params": p.params,
             "published": p.publish_time.ToDatetime().isoformat(timespec="seconds") + "Z"} for p in pools]
    return table(rows, args.json, empty="no pools",
                 header=f"{'POOL':<32} {'DATASET':<16} {'EXPERTS':>7} {'PARAMS':>10}  ALIASES",
                 line=lambda row: f"{row['pool']:<32} {row['dataset']:<16} {len(row['experts']):>7} "
                                  f"{row['params']:>10,}  {', '.join(row['aliases'])}")


def _time(ts) -> str | None:
    """A protobuf Timestamp as ISO 8601 UTC, None when unset."""
    return ts.ToDatetime().isoformat(timespec="seconds") + "Z" if ts.seconds or ts.nanos else None


def _loads(text: str) -> dict:
    return json.loads(text) if text else {}


def _size(n: int) -> str:
    from poe_services.registry.maintenance import human_bytes

    return human_bytes(n)


def _blob(ref) -> dict:
    return {"sha256": ref.sha256, "bytes": ref.size}


def _describe(pv, oracle) -> dict:
    """A pool version as the stable JSON document of `describe`."""
    classes = list(pv.hierarchy.classes)
    experts = [{"id": x.id, "task": x.task, "class_ids": list(x.class_ids), "classes": list(x.class_names),
                "params": x.params, "val_accuracy": x.val_accuracy if x.HasField("val_accuracy") else None,
                "metrics": _loads(x.metrics_json), "loss": _loads(x.loss_json), **_blob(x.blob)}
               for x in pv.experts]
    lib = pv.library
    library = {"id": lib.id, "name": lib.name, "params": lib.params, "config": _loads(lib.config_json),
               "metrics": _loads(lib.metrics_json), "loss": _loads(lib.loss_json), "oracle_id": lib.oracle_id or None,
               **_blob(lib.blob)}
    oracle_doc = None if oracle is None else {
        "id": oracle.id, "name": oracle.name, "params": oracle.params, "config": _loads(oracle.config_json),
        "metrics": _loads(oracle.metrics_json), **_blob(oracle.blob)}
    return {"pool": f"{pv.name}@{pv.version}", "name": pv.name, "version": pv.version, "aliases": list(pv.aliases),
            "dataset": pv.dataset, "description": pv.description, "published": _time(pv.publish_time),
            "hierarchy": {"version": pv.hierarchy.version, "classes": classes,
                          "tasks": {t.name: list(t.class_names) for t in pv.hierarchy.tasks}},
            "library": library, "experts": experts, "oracle": oracle_doc, "info": _loads(pv.info_json),
            "params": pv.params,
            # What a composer downloads (library and experts), and what `export` writes (plus the oracle).
            "bytes": lib.blob.size + sum(x.blob.size for x in pv.experts),
            "export_bytes": lib.blob.size + sum(x.blob.size for x in pv.experts) + (oracle.blob.size if oracle else 0)}


def _describe_text(d: dict) -> str:
    lib, oracle = d["library"], d["oracle"]
    h = d["hierarchy"]
    lines = [f"pool         {d['pool']}",
             f"aliases      {', '.join(d['aliases']) or '-'}",
             f"dataset      {d['dataset']} (hierarchy v{h['version']}: {len(h['classes'])} classes, "
             f"{len(h['tasks'])} tasks)",
             f"published    {d['published'] or '-'}",
             f"description  {d['description'] or '-'}",
             f"library      #{lib['id']} {lib['name']}: {lib['params']:,} params, {_size(lib['bytes'])}, "
             f"sha256 {lib['sha256'][:12]}"]
    if oracle:
        metrics = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in sorted(oracle["metrics"].items()))
        lines.append(f"oracle       #{oracle['id']} {oracle['name']}: {oracle['params']:,} params, "
                     f"{_size(oracle['bytes'])}, sha256 {oracle['sha256'][:12]}" + (f" ({metrics})" if metrics else ""))
    else:
        lines.append("oracle       - (none recorded)")
    lines.append(f"total        {d['params']:,} params in library + {len(d['experts'])} experts, "
                 f"{_size(d['bytes'])} ({_size(d['export_bytes'])} with the oracle)")
    lines.append("")
    lines.append(f"{'TASK':<24} {'CLASSES':<32} {'PARAMS':>8} {'VAL_ACC':>8} {'SIZE':>9}  SHA256")
    for x in d["experts"]:
        acc = "-" if x["val_accuracy"] is None else f"{x['val_accuracy']:.4f}"
        lines.append(f"{x['task']:<24} {', '.join(x['classes']):<32} {x['params']:>8,} {acc:>8} "
                     f"{_size(x['bytes']):>9}  {x['sha256'][:12]}")
    covered = {c for x in d["experts"] for c in x["classes"]}
    missing = [c for c in h["classes"] if c not in covered]
    if missing:
        lines.append(f"no expert for: {', '.join(missing)}")
    return "\n".join(lines)


def cmd_describe(args: argparse.Namespace) -> int:
    with registry_client(args.target or _default_target(), args) as client:
        pv = client.get_pool(args.pool)
        oracle = client.get_oracle(pv.library.oracle_id) if pv.library.oracle_id else None
    doc = _describe(pv, oracle)
    return emit(doc, args.json, lambda: _describe_text(doc))


def cmd_lineage(args: argparse.Namespace) -> int:
    from poe.contract import state_name

    with registry_client(args.target or _default_target(), args) as client:
        pv = client.get_pool(args.pool)  # resolve an alias once, so that every answer is about one version
        ref = f"{pv.name}@{pv.version}"
        nodes = client.lineage("pool", ref)
        jobs = [j for j in client.list_jobs() if j.pool == ref]
    doc = {"pool": ref,
           "nodes": [{"kind": n.kind, "id": n.id, "name": n.name,
                      **(_blob(n.blob) if n.HasField("blob") else {"sha256": None, "bytes": None})} for n in nodes],
           "experts": [{"id": x.id, "task": x.task, "library_id": x.library_id, **_blob(x.blob)} for x in pv.experts],
           "jobs": [{"id": j.id, "state": state_name(j.state), "created": _time(j.create_time),
                     "updated": _time(j.update_time)} for j in jobs],
           "description": pv.description}

    def text() -> str:
        lines = []
        for n in doc["nodes"]:
            blob = f"  sha256 {n['sha256'][:12]} ({_size(n['bytes'])})" if n["sha256"] else ""
            ident = n["id"] if n["kind"] in ("pool", "dataset") else f"#{n['id']} {n['name']}"
            lines.append(f"{n['kind']:<9} {ident}{blob}")
        for x in doc["experts"]:
            lines.append(f"{'expert':<9} #{x['id']} {x['task']} (library #{x['library_id']})  "
                         f"sha256 {x['sha256'][:12]} ({_size(x['bytes'])})")
        for j in doc["jobs"]:
            lines.append(f"{'job':<9} {j['id']} ({j['state']}, created {j['created']})")
        if not doc["jobs"]:
            lines.append(f"{'job':<9} - ({doc['description'] or 'no extraction job recorded'})")
        return "\n".join(lines)

    return emit(doc, args.json, text)


def cmd_export(args: argparse.Namespace) -> int:
    from poe.engine.errors import AlreadyExists

    out = Path(args.dir)
    if not args.force and out.is_dir() and any(out.iterdir()):
        raise AlreadyExists(f"{out}: not empty; pass --force to replace the pool's files in it")

    def progress(msg: str) -> None:
        print(f"  {msg}", file=sys.stderr, flush=True)

    with registry_client(args.target or _default_target(), args) as client:
        pv, manifest = client.export_pool(args.pool, out, overwrite=args.force, progress=progress)
    files = [manifest["library"], *manifest["experts"], *([manifest["oracle"]] if "oracle" in manifest else [])]
    doc = {"pool": f"{pv.name}@{pv.version}", "dir": str(out),
           "files": [{"file": f["file"], "sha256": f["sha256"], "bytes": f["bytes"]} for f in files],
           "bytes": sum(f["bytes"] for f in files)}
    return emit(doc, args.json, lambda: f"exported {doc['pool']} to {out}: {len(files)} files, {_size(doc['bytes'])}, "
                                        f"sha256 verified (`poe registry import {out}` reads it)")


def cmd_alias_set(args: argparse.Namespace) -> int:
    with registry_client(args.target or _default_target(), args) as client:
        pv = client.set_alias(args.name, args.alias, args.version)
    doc = {"pool": pv.name, "alias": args.alias, "version": pv.version, "aliases": list(pv.aliases)}
    return emit(doc, args.json, lambda: f"{pv.name}@{args.alias} -> {pv.version} "
                                        f"(aliases of {pv.version}: {', '.join(pv.aliases)})")


def cmd_alias_delete(args: argparse.Namespace) -> int:
    with registry_client(args.target or _default_target(), args) as client:
        client.delete_alias(args.name, args.alias)
    doc = {"pool": args.name, "alias": args.alias, "deleted": True}
    return emit(doc, args.json, lambda: f"deleted alias {args.name}@{args.alias}")


def _confirmed(question: str) -> bool | None:
    """The answer to a yes/no question on the terminal; None when stdin is not one."""
    if not sys.stdin or not sys.stdin.isatty():
        return None
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def cmd_version_delete(args: argparse.Namespace) -> int:
    ref = f"{args.name}@{args.version}"
    if not args.yes:
        answer = _confirmed(f"delete pool version {ref}? Its cached models go with it; experts and blobs stay.")
        if answer is None:
            print(f"poe: error: refusing to delete {ref} without --yes (stdin is not a terminal)", file=sys.stderr)
            return EXIT_USAGE
        if not answer:
            print(f"poe: {ref} not deleted", file=sys.stderr)
            return EXIT_FAILURE
    with registry_client(args.target or _default_target(), args) as client:
        dropped = client.delete_pool_version(args.name, args.version)
        try:
            latest = client.get_pool(args.name).version
        except NotFound:  # that was its last version: the pool is gone
            latest = None
    doc = {"pool": ref, "deleted": True, "deleted_cache_entries": dropped, "latest": latest}
    return emit(doc, args.json, lambda: f"deleted {ref} ({dropped} cached model(s) dropped); " + (
        f"{args.name}@latest -> {latest}" if latest else f"{args.name} has no versions left"))


def _runs_dir(args: argparse.Namespace, cfg) -> Path | None:
    """--runs, else POE_HOME/extractions when the extractor shares this machine's home: the embedded
    set-up (`poe up`: the SQLite database under POE_HOME)."""
    from sqlalchemy.engine import make_url

    if args.runs:
        return Path(args.runs).expanduser()
    url = make_url(cfg.database_url)
    local = cfg.home / "extractions"
    embedded = url.get_backend_name() == "sqlite" and bool(url.database) and \
        Path(url.database).expanduser().resolve().is_relative_to(cfg.home.expanduser().resolve())
    return local if embedded and local.is_dir() else None


def cmd_gc(args: argparse.Namespace) -> int:
    from poe_services.registry.maintenance import collect_garbage, human_age, human_bytes

    with _storage(args) as (cfg, store, blobs):
        report = collect_garbage(store, blobs, older_than=args.older_than, apply=args.apply,
                                 runs_dir=_runs_dir(args, cfg), keep_runs=args.keep_runs)
    if args.json:
        emit(report.to_dict(), True, str)
    else:
        verb = "removed" if args.apply else "would remove"
        for x in report.leftovers:
            state = f"FAILED: {x.error}" if x.error else verb
            print(f"{state} {x.kind} {x.key} {human_bytes(x.size)} (age {human_age(x.age)})")
        for path in report.unknown_runs:
            print(f"kept run {path}: no such job in this registry", file=sys.stderr)
        done = [x for x in report.leftovers if not x.error]
        hint = "" if args.apply or not done else "; run with --apply to remove"
        print(f"gc: {verb} {len(done)} leftover(s), {human_bytes(sum(x.size for x in done))}; "
              f"{report.kept} younger than the age or in use kept{hint}")
    return 1 if report.failed else 0


def cmd_fsck(args: argparse.Namespace) -> int:
    from poe_services.registry.maintenance import check_blobs, human_bytes

    with _storage(args) as (_cfg, store, blobs):
        report = check_blobs(store, blobs, older_than=args.older_than)
    if args.json:
        emit(report.to_dict(), True, str)
    else:
        for what, entries in (("corrupt", report.corrupt), ("missing", report.missing),
                              ("size mismatch", report.size_mismatch), ("orphan", report.orphans)):
            for entry in entries:
                details = ", ".join(f"{k} {v}" for k, v in entry.items() if k != "sha256")
                print(f"{what}: blob {entry['sha256']} ({details})", file=sys.stderr)
        found = ", ".join(f"{n} {what}" for n, what in (
            (len(report.corrupt), "corrupt"), (len(report.missing), "row(s) without bytes"),
            (len(report.size_mismatch), "size mismatch(es)"), (len(report.orphans), "blob(s) without rows")) if n)
        pending = f" ({len(report.in_flight)} upload(s) in flight)" if report.in_flight else ""
        print(f"fsck: {report.blobs_checked} blobs, {human_bytes(report.bytes_checked)} verified: "
              f"{found or 'clean'}{pending}"
              + ("" if report.clean else "; `poe registry import` of the same files repairs corrupt blobs, "
                 "`poe registry gc --apply` removes bytes without rows"))
    return 0 if report.clean else EXIT_FSCK_PROBLEMS


def cmd_serve(args: argparse.Namespace) -> int:
    from poe.cli.serve import run_services

    return run_services(args, ("registry",), True if args.migrate else None)


# -- parsers -------------------------------------------------------------------------------------


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `registry` command group to the `poe` parser's subparsers."""
    reg = subparsers.add_parser("registry", help="the model registry: import, list, describe, export pools; "
                                                 "aliases; migrate, gc, fsck",
                                description=__doc__.split("\n\n")[1] if __doc__ else None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = reg.add_subparsers(dest="registry_command", required=True, metavar="SUBCOMMAND")

    m = sub.add_parser("migrate", help="bring the registry database schema to the current version")
    m.add_argument("--status", action="store_true", help="only report; exit 1 when a migration is needed")
    m.add_argument("--revision", default="head", help="target revision (default head)")
    _add_storage_flags(m)
    m.set_defaults(func=cmd_migrate)

    i = sub.add_parser("import", help="register a pool directory (library, experts, oracle) and publish it")
    i.add_argument("pool_dir", metavar="POOL_DIR", help="pool directory (pool.json + safetensors)")
    _add_target_flag(i)
    i.add_argument("--alias", action="append", help="also point this alias at the version (repeatable)")
    i.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_storage_flags(i)
    i.set_defaults(func=cmd_import)

    ls = sub.add_parser("list", help="published pool versions")
    _add_target_flag(ls)
    ls.add_argument("--name", help="only this pool")
    ls.add_argument("--dataset", help="only pools of this data set")
    ls.add_argument("--class", dest="class_name", help="only pools with an expert for this class")
    ls.add_argument("--alias", help="only the versions this alias points at")
    ls.add_argument("--json", action="store_true", help="print JSON")
    _add_storage_flags(ls)
    ls.set_defaults(func=cmd_list)

    d = sub.add_parser("describe", help="one pool version: hierarchy, library, experts, oracle, aliases, sizes")
    d.add_argument("pool", metavar="POOL[@VERSION]", help="name, name@version or name@alias (name: latest)")
    _add_target_flag(d)
    d.add_argument("--json", action="store_true", help="print JSON")
    _add_storage_flags(d)
    d.set_defaults(func=cmd_describe)

    lin = sub.add_parser("lineage", help="where a pool version came from: library, oracle, data set, experts, job")
    lin.add_argument("pool", metavar="POOL[@VERSION]", help="name, name@version or name@alias (name: latest)")
    _add_target_flag(lin)
    lin.add_argument("--json", action="store_true", help="print JSON")
    _add_storage_flags(lin)
    lin.set_defaults(func=cmd_lineage)

    x = sub.add_parser("export", help="write a pool version to a directory that `poe registry import` reads",
                       description="Download a pool version's library, experts and oracle (each checked against "
                                   "its sha256) and write them with pool.json and hierarchy.yaml: the format "
                                   "`poe registry import DIR` and `poe compose --local DIR` read. Files are moved "
                                   "into place only once all of them are verified.")
    x.add_argument("pool", metavar="POOL[@VERSION]", help="name, name@version or name@alias (name: latest)")
    x.add_argument("dir", metavar="DIR", help="directory to write (created; must be empty unless --force)")
    x.add_argument("--force", action="store_true",
                   help="write into a non-empty DIR, replacing the pool's files (other files stay)")
    _add_target_flag(x)
    x.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_storage_flags(x)
    x.set_defaults(func=cmd_export)

    al = sub.add_parser("alias", help="point an alias at a pool version, or remove one")
    al_sub = al.add_subparsers(dest="alias_command", required=True, metavar="ACTION")
    als = al_sub.add_parser("set", help="point ALIAS of POOL at VERSION (moves it when it exists)")
    als.add_argument("name", metavar="POOL")
    als.add_argument("alias", metavar="ALIAS", help="not `latest`, which the registry moves by itself")
    als.add_argument("version", metavar="VERSION")
    als.set_defaults(func=cmd_alias_set)
    ald = al_sub.add_parser("delete", help="remove ALIAS of POOL (the version stays)")
    ald.add_argument("name", metavar="POOL")
    ald.add_argument("alias", metavar="ALIAS")
    ald.set_defaults(func=cmd_alias_delete)

    ver = sub.add_parser("version", help="delete a pool version")
    ver_sub = ver.add_subparsers(dest="version_command", required=True, metavar="ACTION")
    vd = ver_sub.add_parser("delete", help="delete VERSION of POOL; refused while an alias other than latest "
                                           "points at it",
                            description="Delete a pool version and its composed-model cache entries; its "
                                        "experts, library and oracle stay registered, with their blobs. "
                                        "`latest` moves to the newest remaining version. Asks for confirmation "
                                        "on a terminal; elsewhere --yes is required.")
    vd.add_argument("name", metavar="POOL")
    vd.add_argument("version", metavar="VERSION")
    vd.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    vd.set_defaults(func=cmd_version_delete)
    for p in (als, ald, vd):
        _add_target_flag(p)
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        _add_storage_flags(p)

    g = sub.add_parser("gc", help="remove what crashed uploads and finished extraction jobs left (dry run by default)",
                       description="Remove staging leftovers and incomplete S3 uploads, blobs no row refers to "
                                   "(all older than --older-than) and run directories of extraction jobs that "
                                   "ended more than --keep-runs ago. Works on POE_DATABASE_URL and POE_BLOB_URL "
                                   "directly; safe while registries serve. Without --apply it only reports.")
    g.add_argument("--apply", action="store_true", help="remove (default: only print what would be removed)")
    g.add_argument("--older-than", type=duration, default=3600.0, metavar="AGE",
                   help="leave anything younger alone: it may be an upload in flight (default 1h; 90s, 30m, 7d)")
    g.add_argument("--runs", metavar="DIR", help="the extractor's run directories (default: POE_HOME/extractions "
                                                  "when the database is the embedded SQLite)")
    g.add_argument("--keep-runs", type=duration, default=7 * 86400.0, metavar="AGE",
                   help="keep run directories of finished jobs this long (default 7d)")
    g.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_storage_flags(g)
    g.set_defaults(func=cmd_gc)

    f = sub.add_parser("fsck", help="verify every stored blob's sha256 and match rows against stored bytes",
                       description="Hash every stored blob (streaming), report corrupt blobs, rows without bytes "
                                   "and bytes without rows (older than --older-than). Exit 0 when clean, "
                                   f"{EXIT_FSCK_PROBLEMS} when it found problems, {EXIT_UNAVAILABLE} when the "
                                   "database or the blob store cannot be reached.")
    f.add_argument("--older-than", type=duration, default=3600.0, metavar="AGE",
                   help="bytes without rows younger than this are uploads in flight, not problems (default 1h)")
    f.add_argument("--json", action="store_true", help="print the details as JSON")
    _add_storage_flags(f)
    f.set_defaults(func=cmd_fsck)

    from poe.cli.serve import add_serve_flags  # here: poe.cli.serve imports this module

    s = sub.add_parser("serve", help="run the registry service (poe.v1.Registry); same as `poe serve registry`")
    add_serve_flags(s)
    s.set_defaults(func=cmd_serve)
    return reg
