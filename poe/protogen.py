"""Regenerate the gRPC/protobuf Python stubs from protos/poe/v1/*.proto into poe/v1/.

    python -m poe.protogen           # (re)write poe/v1/*_pb2*.py and *.pyi
    python -m poe.protogen --check   # exit 1 if the committed stubs differ from a fresh build

The stubs are generated here and committed (not built at install time), so an installed wheel
needs neither grpcio-tools nor protoc. `tests/registry/test_protos.py` runs `--check`; the exact
grpcio-tools version is pinned in the dev extra so that every machine generates the same bytes.
Imports inside the stubs read `from poe.v1 import common_pb2`, because the proto files live under
`protos/poe/v1/` (the folder path matches the package `poe.v1`).
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO_DIR = PROTO_ROOT / "poe" / "v1"
OUT_DIR = Path(__file__).resolve().parent / "v1"
GENERATED = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _is_generated(path: Path) -> bool:
    return path.name.endswith(GENERATED)


def generate(out_root: Path) -> list[Path]:
    """Run protoc on every proto file; returns the generated files (under out_root/poe/v1)."""
    try:
        from grpc_tools import protoc
    except ImportError:
        raise SystemExit("poe.protogen needs grpcio-tools: pip install -e '.[dev]'") from None
    protos = sorted(PROTO_DIR.glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files in {PROTO_DIR}")
    well_known = resources.files("grpc_tools") / "_proto"
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={out_root}",
            f"--pyi_out={out_root}", f"--grpc_python_out={out_root}",
            *[str(p.relative_to(PROTO_ROOT)) for p in protos]]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed (see messages above)")
    return sorted(p for p in (out_root / "poe" / "v1").iterdir() if _is_generated(p))


def write() -> list[Path]:
    OUT_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        names = {p.name for p in fresh}
        for stale in OUT_DIR.iterdir():
            if _is_generated(stale) and stale.name not in names:
                stale.unlink()
        for p in fresh:
            shutil.copyfile(p, OUT_DIR / p.name)
    init = OUT_DIR / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated protobuf and gRPC stubs (package poe.v1); `python -m poe.protogen`."""\n')
    return [OUT_DIR / n for n in sorted(names)]


def check() -> list[str]:
    """Differences between the committed stubs and a fresh build (empty when current)."""
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_text() for p in generate(Path(tmp))}
    committed = {p.name: p.read_text() for p in OUT_DIR.glob("*") if _is_generated(p)} if OUT_DIR.is_dir() else {}
    for name in sorted(set(fresh) | set(committed)):
        if name not in committed:
            problems.append(f"missing: poe/v1/{name}")
        elif name not in fresh:
            problems.append(f"stale (no proto generates it): poe/v1/{name}")
        elif fresh[name] != committed[name]:
            diff = difflib.unified_diff(committed[name].splitlines(), fresh[name].splitlines(),
                                        f"poe/v1/{name} (committed)", f"poe/v1/{name} (fresh)", lineterm="", n=1)
            problems.append("\n".join(list(diff)[:20]))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m poe.protogen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed stubs are not current")
    args = parser.parse_args(argv)
    if args.check:
        problems = check()
        if problems:
            print("poe/v1 stubs are out of date; run `make protos` (python -m poe.protogen):", file=sys.stderr)
            for p in problems:
                print(p, file=sys.stderr)
            return 1
        print("poe/v1 stubs are current")
        return 0
    for p in write():
        print(f"wrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
