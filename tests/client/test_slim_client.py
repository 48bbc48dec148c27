"""The slim client distribution (clients/python): its wheel is built from the main tree's files,
installs into a fresh virtual environment with grpcio and protobuf only (no torch, numpy, PyYAML or
SQLAlchemy), and composes and describes against a live server with the blocking and the asyncio
clients there. The asyncio clients and the torch-only loader are also checked here, in the suite's
own environment, against the same server.

Installing the wheel's dependencies takes pip's usual index (about 10 s here).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch
from testenv import auth_env

from poe.client import AsyncComposer, AsyncRegistry, Composer, RegistryClient
from poe.client.composer import _load_with_torch
from poe.engine.config import Settings
from poe.engine.errors import InvalidArgument, NotFound, Unavailable
from poe_services.host import create_server

ROOT = Path(__file__).resolve().parents[2]
POOL_DIR = ROOT / "pools" / "fashion-mnist"
CLASSES = ["Sandal", "Bag", "Sneaker"]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """Registry and composer on one loopback server, the shipped pool imported."""
    home = tmp_path_factory.mktemp("slim") / "home"
    settings = Settings.from_env({**auth_env(), "POE_HOME": str(home), "POE_REGISTRY_HEALTH_INTERVAL": "0.1"})
    host = create_server("127.0.0.1:0", settings, ("registry", "composer"), migrate=True, warm=False)
    host.start()
    address = f"127.0.0.1:{host.port}"
    with RegistryClient(address) as registry:  # the run's admin token (POE_TOKEN)
        registry.import_pool(POOL_DIR)
    yield address
    host.stop(None).wait(30)


def _check(out: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert out.returncode == 0, f"{' '.join(map(str, out.args))} failed:\n{out.stdout}\n{out.stderr}"
    return out


def _run(args: list, **kwargs) -> subprocess.CompletedProcess:
    return _check(subprocess.run(args, capture_output=True, text=True, timeout=180, **kwargs))


def _slim_venv(tmp: Path) -> Path:
    """A fresh virtual environment holding the slim wheel and what pip resolves for it; its python."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # The wheel builds while the environment is made.
    build = subprocess.Popen([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", ROOT / "clients" / "python",
                              "-w", tmp / "dist"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _run([sys.executable, "-m", "venv", tmp / "venv"], env=env)
        stdout, stderr = build.communicate(timeout=180)
    finally:
        build.kill()
    _check(subprocess.CompletedProcess(build.args, build.returncode, stdout, stderr))
    (wheel,) = (tmp / "dist").glob("poe_client-*.whl")
    python = tmp / "venv" / "bin" / "python"
    _run([python, "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check", wheel], env=env)
    return python


def test_the_slim_wheel_composes_without_torch(target, tmp_path):
    python = _slim_venv(tmp_path)
    (wheel,) = (tmp_path / "dist").glob("poe_client-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {"poe/py.typed", "poe/client/aio.py", "poe/v1/composer_pb2.pyi"} <= names
    assert not any(n.startswith(("poe/engine/export", "poe/engine/nets", "poe_services", "poe/cli/")) for n in names)
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert sorted(r.split("<")[0].split(">")[0] for r in requires if "extra ==" not in r) == ["grpcio", "protobuf"]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert f"\nVersion: {version}\n" in metadata

    # No POE_TOKEN and an empty POE_HOME: the calls are anonymous, a reader on a loopback server.
    env = {"PATH": os.environ["PATH"], "POE_HOME": str(tmp_path / "client-home")}
    out = _run([python, ROOT / "tests" / "client" / "slim_check.py", target, "fashion-mnist"],
               env=env, cwd=tmp_path)
    got = json.loads(out.stdout)
    assert got["absent"] == ["torch", "numpy", "yaml", "sqlalchemy", "minio", "safetensors", "poe_services"]
    assert got["poe_file"].startswith(str(tmp_path / "venv")), "the installed wheel, not this tree, was imported"

    with Composer(target) as composer:  # the same request from the full suite
        expected = composer.compose(classes=CLASSES, pool="fashion-mnist").header
    for client in ("blocking", "asyncio"):
        seen = got[client]
        assert seen["compose"]["model_id"] == expected.model_id
        assert seen["compose"]["sha256"] == expected.sha256 and seen["compose"]["size"] == expected.size
        assert seen["compose"]["classes"] == ["Sandal", "Sneaker", "Bag"]  # class-id order
        assert seen["compose"]["class_ids"] == list(expected.class_ids) == [5, 7, 8]
        assert seen["describe"]["model_id"] == expected.model_id
        assert seen["describe"]["classes"] == seen["compose"]["classes"]
        assert seen["pool"] == expected.pool == "fashion-mnist@1"
        assert "Spaceship" in seen["unknown_error"]
    assert "poe-client[torch]" in got["blocking"]["load_error"]
    assert got["asyncio"]["pools"] == ["fashion-mnist@1"]
    assert got["asyncio"]["resolved_class_ids"] == [5, 7, 8]
    assert got["asyncio"]["library_sha256"] == got["asyncio"]["library_blob"]
    assert got["asyncio"]["tls"] is False


def test_asyncio_clients_match_the_blocking_ones(target):
    async def calls():
        async with AsyncComposer(target, timeout=20) as composer, AsyncRegistry(target) as registry:
            await composer.wait_ready(5)
            result = await composer.compose(classes=CLASSES, pool="fashion-mnist")
            header = await composer.describe(tasks=["footwear"], pool="fashion-mnist")
            with pytest.raises(InvalidArgument) as unknown:
                await composer.compose(classes=["Spaceship"], pool="fashion-mnist")
            with pytest.raises(InvalidArgument) as bad_format:
                await composer.compose(classes=CLASSES, format="gif")
            with pytest.raises(NotFound):
                await registry.get_pool("no-such-pool")
            with pytest.raises(InvalidArgument):
                await registry.download("not-a-sha256")
            return result, header, unknown.value, bad_format.value

    result, header, unknown, bad_format = asyncio.run(calls())
    with Composer(target) as composer:
        expected = composer.compose(classes=CLASSES, pool="fashion-mnist").header
    assert (result.header.model_id, result.header.sha256, result.header.classes) == \
        (expected.model_id, expected.sha256, expected.classes)
    with Composer(target) as composer:
        assert header.model_id == composer.describe(tasks=["footwear"], pool="fashion-mnist").model_id
    assert result.source == target and not result.tls
    assert getattr(unknown, "field", None) == "classes"
    assert getattr(bad_format, "field", None) == "format"


def test_an_unreachable_target_is_unavailable_to_the_asyncio_client():
    async def wait():
        async with AsyncComposer("127.0.0.1:1", token="") as composer:  # nothing listens on port 1
            await composer.wait_ready(0.3)

    with pytest.raises(Unavailable, match="not reachable"):
        asyncio.run(wait())


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_loading_with_torch_alone_gives_the_engines_model(target, fmt):
    """What `load` does in the slim client with its torch extra, next to the engine's loader."""
    with Composer(target) as composer:
        result = composer.compose(classes=CLASSES, pool="fashion-mnist", format=fmt)
    model, meta = result.load()
    slim_model, slim_meta = _load_with_torch(result)
    assert slim_meta == meta and slim_meta["classes"] == ["Sandal", "Sneaker", "Bag"]
    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(slim_model(images), model(images))
