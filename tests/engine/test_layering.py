"""The import direction holds: engine <- contract <- client, services <- cli, bench.

Checked twice: statically (every import statement in the engine's files, also the ones inside
functions) and at run time (importing every engine module in a fresh interpreter loads no grpc,
service, client or CLI module).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "poe" / "engine"

# What each layer must never import (module name prefixes).
FORBIDDEN = {
    "poe/engine": ("grpc", "grpc_health", "grpc_reflection", "poe_services", "poe.cli", "poe.client", "poe.bench",
                   "poe.contract", "poe.v1"),
    "poe/contract.py": ("poe_services", "poe.cli", "poe.client", "poe.bench"),
    "poe/client": ("poe_services", "poe.cli", "poe.bench"),
    "services": ("poe.cli", "poe.bench"),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from poe import cli` imports poe.cli: count the names too
            out += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def _files(part: str) -> list[Path]:
    p = ROOT / part
    return [p] if p.is_file() else sorted(p.rglob("*.py"))


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_no_import_against_the_direction(part):
    bad = []
    for path in _files(part):
        for line, name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[part]):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    assert _files(part), f"{part}: no files found"
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_the_checker_sees_a_forbidden_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from poe import cli\n    import grpc\n")
    names = {n for _, n in _imports(sample)}
    assert {"poe.cli", "grpc"} <= names


def test_importing_the_engine_loads_no_service_grpc_or_cli_module():
    modules = sorted(f"poe.engine.{p.stem}" for p in ENGINE.glob("*.py") if p.stem != "__init__")
    code = (f"import importlib, json, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded = json.loads(out.stdout)
    assert "poe.engine.compose" in loaded
    leaked = [m for m in loaded if m.split(".")[0] in ("grpc", "poe_services")
              or m.startswith(("poe.cli", "poe.client", "poe.bench", "poe.v1"))]
    assert not leaked, leaked
