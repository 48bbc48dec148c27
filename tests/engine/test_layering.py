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


# What a backend that only calls the services does not install: the slim distribution `poe-client`
# (clients/python) depends on grpcio and protobuf alone.
HEAVY = ("torch", "numpy", "yaml", "safetensors", "sqlalchemy", "alembic", "psycopg", "minio", "PIL", "onnx",
         "onnxruntime", "onnxscript", "prometheus_client", "poe_services")

_BLOCKING_FINDER = """
import importlib.abc, sys
HEAVY = {heavy!r}

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
        return None

sys.meta_path.insert(0, Refuse())
"""


def _slim_wheel_files() -> set[str]:
    """The paths the slim client's wheel holds, as its pyproject maps the main tree's files in."""
    import tomllib

    project = ROOT / "clients" / "python"
    config = tomllib.loads((project / "pyproject.toml").read_text())
    mapping = config["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    files = set()
    for source, dest in mapping.items():
        path = (project / source).resolve()
        files |= ({f"{dest}/{p.relative_to(path)}" for p in path.rglob("*.py")} if path.is_dir() else {dest})
    return files


def _blocked_import(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCKING_FINDER.format(heavy=HEAVY) + code],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_the_finder_blocks_what_it_should():
    out = _blocked_import("import numpy")
    assert out.returncode != 0 and "No module named 'numpy' (blocked)" in out.stderr


def test_the_client_imports_without_torch_numpy_or_the_service_libraries():
    code = ("import json, sys\n"
            "from poe.client import AsyncComposer, AsyncRegistry, Composer, ComposeResult, RegistryClient\n"
            "import poe.client.aio\n"
            "print(json.dumps(sorted(m for m in sys.modules if m == 'poe' or m.startswith('poe.'))))")
    out = _blocked_import(code)
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout)
    assert "poe.client.aio" in loaded and "poe.engine.limits" in loaded
    # Every module the client needs ships in the slim wheel.
    shipped = _slim_wheel_files()
    missing = []
    for module in loaded:
        path = module.replace(".", "/")
        if f"{path}.py" not in shipped and f"{path}/__init__.py" not in shipped:
            missing.append(module)
    assert not missing, f"imported by poe.client but not in clients/python's wheel: {missing}"
