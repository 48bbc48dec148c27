"""The `poe` command as a user runs it: a real subprocess, real files, real test images."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from poe.engine.pool import save as save_pool

POE = [sys.executable, "-m", "poe.cli.main"]


def run(*args, cwd=None):
    env = {**os.environ, "POE_NO_PROGRESS": "1"}
    return subprocess.run([*POE, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def pool_dir(random_pool, tmp_path_factory):
    return save_pool(random_pool, tmp_path_factory.mktemp("pool") / "test-pool")


def test_compose_local_then_eval(pool_dir, tmp_path):
    out = run("compose", "--local", str(pool_dir), "--classes", "Sandal,Sneaker", "--classes", "Bag",
              "-o", str(tmp_path / "m.pt"), "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["classes"] == ["Sandal", "Sneaker", "Bag"] and summary["experts"] == ["footwear", "bags"]
    assert (tmp_path / "m.pt").stat().st_size == summary["bytes"]

    ev = run("eval", str(tmp_path / "m.pt"), "--pool", str(pool_dir), "--json")
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout)
    assert result["images"] == 3000  # 1000 real test images per class
    assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["oracle_accuracy"] <= 1.0
    assert set(result["per_class"]) == {"Sandal", "Sneaker", "Bag"}
    assert result["oracle_params"] > 0

    text = run("eval", str(tmp_path / "m.pt"), "--pool", str(pool_dir))
    assert text.returncode == 0 and "oracle (restricted)" in text.stdout


@pytest.mark.parametrize("args, message", [
    (["compose", "--local", "{pool}", "--classes", "Sandal,Boots"], "unknown classes"),
    (["compose", "--local", "{pool}"], "empty request"),
    (["compose", "--local", "{tmp}/nowhere", "--classes", "Bag"], "not a pool directory"),
    (["eval", "{tmp}/missing.pt"], "no such file"),
])
def test_bad_input_exits_non_zero_with_one_line(pool_dir, tmp_path, args, message):
    args = [a.format(pool=pool_dir, tmp=tmp_path) for a in args]
    out = run(*args, "-o", str(tmp_path / "x.pt")) if args[0] == "compose" else run(*args)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("poe: error:") and message in lines[0], out.stderr


def test_every_command_has_help():
    for cmd in ([], ["train"], ["compose"], ["eval"]):
        out = run(*cmd, "--help")
        assert out.returncode == 0 and "usage: poe" in out.stdout


def test_compose_does_not_write_a_partial_file_on_error(pool_dir, tmp_path):
    target = tmp_path / "m.pt"
    assert run("compose", "--local", str(pool_dir), "--classes", "Nope", "-o", str(target)).returncode != 0
    assert not target.exists() and not list(Path(tmp_path).glob("*.tmp"))
