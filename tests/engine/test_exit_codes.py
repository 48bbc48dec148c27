"""Exit statuses a script can rely on, from the real `poe` process, and the typed reading of POE_* settings."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from testenv import auth_env

from poe.cli.output import (
    EXIT_CODES,
    EXIT_FAILURE,
    EXIT_FSCK_PROBLEMS,
    EXIT_INTERRUPTED,
    EXIT_INVALID_ARGUMENT,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    exit_code,
)
from poe.engine import config, errors
from poe.engine.config import Settings

POE = [sys.executable, "-m", "poe.cli.main"]
SHIPPED_POOL = Path(__file__).resolve().parents[2] / "pools" / "fashion-mnist"


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*POE, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "POE_NO_PROGRESS": "1", **env})


def error_line(out: subprocess.CompletedProcess) -> str:
    """The one line `poe` prints on a domain error (no traceback)."""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("poe: error: "), out.stderr
    return lines[0]


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:  # bound and closed again: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the real command ------------------------------------------------------------------------------

def test_missing_pool_directory_is_not_found(tmp_path):
    out = run("compose", "--local", str(tmp_path / "nowhere"), "--classes", "Bag", "-o", str(tmp_path / "m.pt"))
    assert out.returncode == EXIT_NOT_FOUND
    assert "not a pool directory" in error_line(out)


def test_pool_unknown_to_a_served_registry_is_not_found(tmp_path):
    from poe_services.host import create_server

    settings = Settings.from_env({**auth_env(), "POE_HOME": str(tmp_path)})
    host = create_server("127.0.0.1:0", settings, ("registry", "composer"), migrate=True, warm=False)
    host.start()
    try:
        out = run("compose", "--target", f"127.0.0.1:{host.port}", "--pool", "nope", "--classes", "Bag",
                  "--timeout", "20", "-o", str(tmp_path / "m.pt"))
    finally:
        host.stop(None).wait(30)
    assert out.returncode == EXIT_NOT_FOUND
    assert "nope" in error_line(out)


def test_unknown_class_is_invalid_argument(tmp_path):
    out = run("compose", "--local", str(SHIPPED_POOL), "--classes", "Sandal,Boots", "-o", str(tmp_path / "m.pt"))
    assert out.returncode == EXIT_INVALID_ARGUMENT
    assert "unknown classes" in error_line(out)
    assert not (tmp_path / "m.pt").exists()


def test_closed_port_is_unavailable(tmp_path, closed_port):
    out = run("compose", "--target", f"127.0.0.1:{closed_port}", "--timeout", "1", "--classes", "Bag",
              "-o", str(tmp_path / "m.pt"))
    assert out.returncode == EXIT_UNAVAILABLE
    assert f"127.0.0.1:{closed_port}" in error_line(out)


@pytest.mark.parametrize("args", [["compose", "--bogus"], [], ["registry", "gc", "--older-than", "soon"]],
                         ids=["unknown-flag", "no-command", "bad-flag-value"])
def test_usage_errors_keep_argparse_status(args):
    out = run(*args)
    assert out.returncode == EXIT_USAGE and "usage: poe" in out.stderr


@pytest.mark.parametrize("command", [["compose", "--classes", "Bag"], ["up", "--port", "0"]],
                         ids=["compose", "up"])
def test_bad_size_setting_names_the_variable_without_traceback(command):
    out = run(*command, POE_CACHE_BYTES="lots")
    assert out.returncode == EXIT_INVALID_ARGUMENT
    assert error_line(out) == ("poe: error: POE_CACHE_BYTES: expected a whole number of bytes such as 536870912 "
                               "or 512Mi, got 'lots'")


def test_binary_size_setting_is_accepted(closed_port):
    # Settings are read (POE_COMPOSER_ADDR) and accepted: the call goes on to fail on the closed port.
    out = run("compose", "--classes", "Bag", "--timeout", "1",
              POE_CACHE_BYTES="512Mi", POE_COMPOSER_ADDR=f"127.0.0.1:{closed_port}")
    assert out.returncode == EXIT_UNAVAILABLE, out.stderr
    assert "POE_CACHE_BYTES" not in out.stderr
    assert Settings.from_env({"POE_CACHE_BYTES": "512Mi"}).cache_bytes == 536870912


def test_help_lists_every_exit_status():
    out = run("--help")
    assert out.returncode == EXIT_OK
    epilog = out.stdout.split("exit status:", 1)[1]
    listed = {int(line.split()[0]) for line in epilog.strip().splitlines()}
    assert listed == {EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_FSCK_PROBLEMS, EXIT_INTERRUPTED, *EXIT_CODES.values()}


# -- the table ------------------------------------------------------------------------------------

@pytest.mark.parametrize("error, status", [
    (errors.InvalidArgument("x"), EXIT_INVALID_ARGUMENT),
    (errors.DataError("truncated"), EXIT_INVALID_ARGUMENT),  # a subclass takes its base's status
    (errors.field_error("classes", "empty"), EXIT_INVALID_ARGUMENT),
    (errors.NotFound("x"), EXIT_NOT_FOUND),
    (errors.Unavailable("x"), EXIT_UNAVAILABLE),
    (errors.Cancelled("x"), EXIT_FAILURE),
    (errors.PoeError("x"), EXIT_FAILURE),
], ids=lambda v: type(v).__name__ if isinstance(v, Exception) else None)
def test_exit_code_of_each_error_class(error, status):
    assert exit_code(error) == status


def test_error_classes_have_their_own_statuses():
    assert exit_code(errors.PermissionDenied("x")) == exit_code(errors.Unauthenticated("x"))
    assert exit_code(errors.AlreadyExists("x")) == exit_code(errors.FailedPrecondition("x"))
    distinct = {exit_code(cls("x")) for cls in (errors.InvalidArgument, errors.NotFound, errors.AlreadyExists,
                                                errors.Unavailable, errors.PermissionDenied, errors.DataLoss)}
    assert len(distinct) == 6
    assert not distinct & {EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_FSCK_PROBLEMS, EXIT_INTERRUPTED}


# -- the config helpers ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [
    ("0", 0), ("536870912", 536870912), ("512Mi", 512 * 2**20), ("1Gi", 2**30), ("4Ki", 4096),
    (" 2 Mi ", 2 * 2**20), ("512MiB", 512 * 2**20),
])
def test_bytes_accepts_plain_numbers_and_binary_suffixes(text, value):
    assert config._bytes({"POE_X_BYTES": text}, "POE_X_BYTES", 7) == value


@pytest.mark.parametrize("text", ["lots", "512M", "512mi", "1.5Gi", "-1", "Mi", "1Ti"])
def test_bytes_rejects_anything_else_naming_the_variable(text):
    with pytest.raises(errors.InvalidArgument) as info:
        config._bytes({"POE_X_BYTES": text}, "POE_X_BYTES", 7)
    assert str(info.value) == f"POE_X_BYTES: expected a whole number of bytes such as 536870912 or 512Mi, got {text!r}"


def test_unset_or_empty_values_give_the_default():
    for env in ({}, {"POE_V": ""}, {"POE_V": "  "}):
        assert config._int(env, "POE_V", 3) == 3
        assert config._float(env, "POE_V", 2.5) == 2.5 and config._float(env, "POE_V", None) is None
        assert config._bytes(env, "POE_V", 9) == 9
        assert config._bool(env, "POE_V", True) is True


def test_int_float_and_bool_read_their_forms():
    assert config._int({"POE_V": " 12 "}, "POE_V", 1) == 12
    assert config._float({"POE_V": "0.25"}, "POE_V", 1.0) == 0.25
    assert [config._bool({"POE_V": v}, "POE_V", False) for v in ("1", "TRUE", "yes", "on")] == [True] * 4
    assert [config._bool({"POE_V": v}, "POE_V", True) for v in ("0", "False", "no", "off")] == [False] * 4


@pytest.mark.parametrize("helper, text, expected", [
    (config._int, "1.5", "a whole number such as 3"),
    (config._float, "soon", "a number of seconds such as 2.5"),
    (config._float, "nan", "a number of seconds such as 2.5"),
    (config._bool, "maybe", "true or false (also 1/0, yes/no, on/off)"),
])
def test_int_float_and_bool_reject_other_forms(helper, text, expected):
    with pytest.raises(errors.InvalidArgument) as info:
        helper({"POE_V": text}, "POE_V", 3)
    assert str(info.value) == f"POE_V: expected {expected}, got {text!r}"


TYPED_SETTINGS = [f for f in dataclasses.fields(Settings) if f.type in ("int", "float", "bool", "float | None")]


@pytest.mark.parametrize("field", TYPED_SETTINGS, ids=lambda f: f.name)
def test_every_typed_setting_names_its_variable_on_bad_input(field):
    variable = f"POE_{field.name.upper()}"
    with pytest.raises(errors.InvalidArgument, match=f"^{variable}: expected "):
        Settings.from_env({variable: "not-a-value"})


def test_size_settings_take_suffixes_and_defaults_are_kept():
    assert len(TYPED_SETTINGS) >= 20  # the parametrized test above is not vacuous
    sizes = {f.name for f in dataclasses.fields(Settings) if f.name.endswith("_bytes")}
    assert sizes == {"cache_bytes", "model_cache_bytes", "template_cache_bytes", "upload_quota_bytes"}
    s = Settings.from_env({f"POE_{name.upper()}": "3Mi" for name in sizes})
    assert all(getattr(s, name) == 3 * 2**20 for name in sizes)
    defaults = Settings.from_env({})
    assert (defaults.cache_bytes, defaults.model_cache_bytes, defaults.template_cache_bytes,
            defaults.upload_quota_bytes) == (2**29, 2**28, 2**26, 2**31)
    assert defaults.shutdown_drain is None and defaults.shutdown_grace == 10.0 and defaults.record_compositions
