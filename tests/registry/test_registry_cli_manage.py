"""`poe registry describe | lineage | export | alias | version` against real registry servers, and the
round trip: shipped pool -> registry A -> `export` -> `import` -> registry B, composing the same
model on both."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest

from poe.cli.main import main
from poe.cli.output import (
    EXIT_CONFLICT,
    EXIT_DATA_LOSS,
    EXIT_FAILURE,
    EXIT_INVALID_ARGUMENT,
    EXIT_NOT_FOUND,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)
from poe.client.registry import RegistryClient
from poe.engine.errors import DataLoss
from poe_services.host import create_server

SHIPPED_POOL = Path(__file__).resolve().parents[2] / "pools" / "fashion-mnist"


@pytest.fixture
def server(pool_dir, tmp_path, sqlite_url, make_settings):
    """(target, blob directory) of a running registry holding test-pool@1."""
    blobs = tmp_path / "blobs"
    host = create_server("127.0.0.1:0", make_settings(tmp_path, sqlite_url, f"file://{blobs}"), ("registry",))
    host.start()
    target = f"127.0.0.1:{host.port}"
    with RegistryClient(target) as client:
        client.import_pool(pool_dir)
    yield target, blobs
    host.stop(None).wait(30)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of one `poe` command."""
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def one_line_error(err: str) -> str:
    """The error line, checked to be the last on stderr and the only one (export prints progress above it)."""
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("poe: error: "), err
    assert not [line for line in lines[:-1] if "error" in line], err
    return lines[-1]


def publish_copy(target: str, pool_dir: Path, where: Path, version: str) -> None:
    """Publish the same artifacts as another version of test-pool."""
    copy = where / f"v{version}"
    shutil.copytree(pool_dir, copy)
    manifest = json.loads((copy / "pool.json").read_text())
    manifest["version"] = version
    (copy / "pool.json").write_text(json.dumps(manifest))
    with RegistryClient(target) as client:
        client.import_pool(copy)


def test_describe_shows_the_version_with_its_parts(server, pool_dir, capsys):
    target, _ = server
    manifest = json.loads((pool_dir / "pool.json").read_text())
    status, out, _ = run(capsys, "registry", "describe", "test-pool@latest", "--target", target, "--json")
    assert status == 0
    doc = json.loads(out)
    assert (doc["pool"], doc["version"], doc["aliases"], doc["dataset"]) == ("test-pool@1", "1", ["latest"],
                                                                          "fashion-mnist")
    assert [x["task"] for x in doc["experts"]] == [x["task"] for x in manifest["experts"]]
    for got, want in zip(doc["experts"], manifest["experts"], strict=True):
        assert (got["sha256"], got["bytes"], got["params"], got["class_ids"]) == \
            (want["sha256"], want["bytes"], want["params"], want["class_ids"])
        assert got["val_accuracy"] == want["metrics"]["val_acc"]
    assert doc["experts"][-1]["classes"] == ["Bag"]
    assert (doc["library"]["sha256"], doc["library"]["bytes"]) == (manifest["library"]["sha256"],
                                                                  manifest["library"]["bytes"])
    assert doc["library"]["config"] == manifest["library"]["student_config"]
    assert (doc["oracle"]["sha256"], doc["oracle"]["params"]) == (manifest["oracle"]["sha256"],
                                                                  manifest["oracle"]["params"])
    assert doc["bytes"] == manifest["library"]["bytes"] + sum(x["bytes"] for x in manifest["experts"])
    assert doc["export_bytes"] == doc["bytes"] + manifest["oracle"]["bytes"]
    assert doc["params"] == manifest["library"]["params"] + sum(x["params"] for x in manifest["experts"])
    assert doc["hierarchy"]["tasks"]["footwear"] == ["Sandal", "Sneaker", "Ankle boot"]
    assert doc["info"] == manifest["info"]

    status, out, _ = run(capsys, "registry", "describe", "test-pool", "--target", target)
    assert status == 0
    assert "pool         test-pool@1" in out and "aliases      latest" in out
    footwear = next(line for line in out.splitlines() if line.startswith("footwear"))
    assert "Sandal, Sneaker, Ankle boot" in footwear and footwear.endswith(manifest["experts"][3]["sha256"][:12])

    status, _, err = run(capsys, "registry", "describe", "test-pool@7", "--target", target)
    assert status == EXIT_NOT_FOUND and "7" in one_line_error(err)
    status, _, err = run(capsys, "registry", "describe", "Not A Pool!", "--target", target)
    assert status == EXIT_INVALID_ARGUMENT
    one_line_error(err)
    status, _, err = run(capsys, "registry", "describe", "test-pool", "--target", "127.0.0.1:1")
    assert status == EXIT_UNAVAILABLE and "registry at 127.0.0.1:1" in one_line_error(err)


def test_lineage_follows_the_version_to_its_oracle_and_job(server, pool_dir, capsys):
    target, _ = server
    manifest = json.loads((pool_dir / "pool.json").read_text())
    # Jobs are the extractor's to record: it calls with the service token.
    with RegistryClient(target, token=os.environ.get("POE_SERVICE_TOKEN")) as client:
        job = client.create_job({"note": "made by hand for this test"})
        client.update_job(job.id, state="succeeded", progress=1.0, pool="test-pool@1")
        client.create_job({"note": "another pool's job"})
    status, out, _ = run(capsys, "registry", "lineage", "test-pool", "--target", target, "--json")
    assert status == 0
    doc = json.loads(out)
    assert doc["pool"] == "test-pool@1"
    assert [n["kind"] for n in doc["nodes"]] == ["pool", "library", "oracle", "dataset"]
    assert [n["sha256"] for n in doc["nodes"]] == [None, manifest["library"]["sha256"], manifest["oracle"]["sha256"],
                                                  None]
    assert doc["nodes"][-1]["id"] == "fashion-mnist"
    assert [x["sha256"] for x in doc["experts"]] == [x["sha256"] for x in manifest["experts"]]
    assert {x["library_id"] for x in doc["experts"]} == {int(doc["nodes"][1]["id"])}
    assert [(j["id"], j["state"]) for j in doc["jobs"]] == [(job.id, "succeeded")]

    status, out, _ = run(capsys, "registry", "lineage", "test-pool@1", "--target", target)
    assert status == 0
    kinds = [line.split()[0] for line in out.splitlines()]
    assert kinds == ["pool", "library", "oracle", "dataset", *["expert"] * 5, "job"]
    assert f"job       {job.id} (succeeded" in out

    status, _, err = run(capsys, "registry", "lineage", "no-such-pool", "--target", target)
    assert status == EXIT_NOT_FOUND and "no-such-pool" in one_line_error(err)


def test_alias_set_moves_and_delete_removes(server, pool_dir, tmp_path, capsys):
    target, _ = server
    publish_copy(target, pool_dir, tmp_path, "2")
    status, out, _ = run(capsys, "registry", "alias", "set", "test-pool", "stable", "1", "--target", target, "--json")
    assert status == 0
    assert json.loads(out) == {"pool": "test-pool", "alias": "stable", "version": "1", "aliases": ["stable"]}
    status, out, _ = run(capsys, "registry", "alias", "set", "test-pool", "stable", "2", "--target", target)
    assert status == 0 and out.startswith("test-pool@stable -> 2")
    with RegistryClient(target) as client:
        assert client.get_pool("test-pool@stable").version == "2"
        assert list(client.get_pool("test-pool@1").aliases) == []

    for argv, code, says in (
            (("set", "test-pool", "latest", "1"), EXIT_INVALID_ARGUMENT, "latest"),  # the registry moves it
            (("set", "test-pool", "Bad Alias", "1"), EXIT_INVALID_ARGUMENT, "alias"),
            (("set", "test-pool", "canary", "9"), EXIT_NOT_FOUND, "9"),
            (("set", "no-such-pool", "canary", "1"), EXIT_NOT_FOUND, "no-such-pool"),
            (("delete", "test-pool", "canary"), EXIT_NOT_FOUND, "canary"),
            (("delete", "test-pool", "latest"), EXIT_INVALID_ARGUMENT, "latest")):
        status, _, err = run(capsys, "registry", "alias", *argv, "--target", target)
        assert status == code and says in one_line_error(err), (argv, err)

    status, out, _ = run(capsys, "registry", "alias", "delete", "test-pool", "stable", "--target", target, "--json")
    assert status == 0 and json.loads(out) == {"pool": "test-pool", "alias": "stable", "deleted": True}
    with RegistryClient(target) as client:
        assert list(client.get_pool("test-pool@2").aliases) == ["latest"]
    status, _, err = run(capsys, "registry", "alias", "delete", "test-pool", "stable", "--target", target)
    assert status == EXIT_NOT_FOUND and "stable" in one_line_error(err)


def test_version_delete_needs_consent_and_respects_aliases(server, pool_dir, tmp_path, capsys, monkeypatch):
    target, _ = server
    publish_copy(target, pool_dir, tmp_path, "2")
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # not a terminal: no one to ask
    status, _, err = run(capsys, "registry", "version", "delete", "test-pool", "2", "--target", target)
    assert status == EXIT_USAGE and "--yes" in one_line_error(err)
    with RegistryClient(target) as client:
        client.get_pool("test-pool@2")  # still there
        client.set_alias("test-pool", "stable", "1")
    status, _, err = run(capsys, "registry", "version", "delete", "test-pool", "1", "--yes", "--target", target)
    assert status == EXIT_CONFLICT and "stable" in one_line_error(err)
    status, _, err = run(capsys, "registry", "version", "delete", "test-pool", "3", "--yes", "--target", target)
    assert status == EXIT_NOT_FOUND and "3" in one_line_error(err)

    status, out, _ = run(capsys, "registry", "version", "delete", "test-pool", "2", "-y", "--target", target, "--json")
    assert status == 0
    assert json.loads(out) == {"pool": "test-pool@2", "deleted": True, "deleted_cache_entries": 0, "latest": "1"}
    with RegistryClient(target) as client:
        assert client.get_pool("test-pool").version == "1"
        client.delete_alias("test-pool", "stable")
    status, out, _ = run(capsys, "registry", "version", "delete", "test-pool", "1", "--yes", "--target", target)
    assert status == 0 and "test-pool has no versions left" in out
    status, _, err = run(capsys, "registry", "describe", "test-pool", "--target", target)
    assert status == EXIT_NOT_FOUND


def test_version_delete_asks_on_a_terminal(server, pool_dir, tmp_path, capsys, monkeypatch):
    target, _ = server
    publish_copy(target, pool_dir, tmp_path, "2")
    for answer, code in ((b"n\n", EXIT_FAILURE), (b"y\n", 0)):
        controller, terminal = os.openpty()
        with open(terminal, closefd=True) as tty:
            os.write(controller, answer)
            monkeypatch.setattr("sys.stdin", tty)
            status, _, err = run(capsys, "registry", "version", "delete", "test-pool", "2", "--target", target)
        os.close(controller)
        assert status == code and "delete pool version test-pool@2?" in err, err
        with RegistryClient(target) as client:
            assert [p.version for p in client.list_pools(name="test-pool")].count("2") == (code != 0)


def test_export_refuses_to_overwrite_and_stops_on_corrupt_blobs(server, pool_dir, tmp_path, capsys):
    target, blobs = server
    manifest = json.loads((pool_dir / "pool.json").read_text())
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    status, _, err = run(capsys, "registry", "export", "test-pool", str(busy), "--target", target)
    assert status == EXIT_CONFLICT and "--force" in one_line_error(err)
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]

    status, out, _ = run(capsys, "registry", "export", "test-pool@1", str(busy), "--force", "--target", target,
                         "--json")
    assert status == 0
    doc = json.loads(out)
    assert doc["pool"] == "test-pool@1" and len(doc["files"]) == 7
    assert (busy / "notes.txt").read_text() == "keep me"  # --force replaces the pool's files only
    assert not [p for p in busy.iterdir() if p.name.startswith(".export-")]
    for entry in [manifest["library"], manifest["oracle"], *manifest["experts"]]:
        assert (busy / entry["file"]).read_bytes() == (pool_dir / entry["file"]).read_bytes()

    status, _, err = run(capsys, "registry", "export", "no-such-pool", str(tmp_path / "nothing"), "--target", target)
    assert status == EXIT_NOT_FOUND and not (tmp_path / "nothing").exists()
    one_line_error(err)

    # A blob rotten at rest: the registry refuses to serve it, nothing is written.
    sha = manifest["experts"][2]["sha256"]
    stored = blobs / "sha256" / sha[:2] / sha
    stored.write_bytes(stored.read_bytes()[:-4] + b"rot!")
    status, _, err = run(capsys, "registry", "export", "test-pool", str(tmp_path / "rotten"), "--target", target)
    assert status == EXIT_DATA_LOSS and not (tmp_path / "rotten").exists()
    one_line_error(err)
    status, _, err = run(capsys, "registry", "export", "test-pool", str(busy), "--force", "--target", target)
    assert status == EXIT_DATA_LOSS
    rotten = manifest["experts"][2]["file"]
    assert (busy / rotten).read_bytes() == (pool_dir / rotten).read_bytes()  # the earlier export, untouched
    assert not [p for p in busy.iterdir() if p.name.startswith(".export-")]


def test_download_file_checks_the_size_it_was_told(server, pool_dir, tmp_path):
    target, _ = server
    entry = json.loads((pool_dir / "pool.json").read_text())["library"]
    with RegistryClient(target) as client:
        assert client.download_file(entry["sha256"], tmp_path / "lib", size=entry["bytes"]) == entry["bytes"]
        assert hashlib.sha256((tmp_path / "lib").read_bytes()).hexdigest() == entry["sha256"]
        with pytest.raises(DataLoss, match="size"):
            client.download_file(entry["sha256"], tmp_path / "short", size=entry["bytes"] - 1)
    assert not (tmp_path / "short").exists()


def start(tmp_path: Path, name: str, make_settings, services=("registry",)):
    """A started server on a fresh SQLite database and blob directory under tmp_path/name."""
    settings = make_settings(tmp_path / name, f"sqlite:///{tmp_path / f'{name}.sqlite3'}",
                             f"file://{tmp_path / name / 'blobs'}")
    host = create_server("127.0.0.1:0", settings, services, migrate=True, warm=False)
    host.start()
    if "composer" in services:
        assert host.runtimes["composer"].ready.wait(10)
    return host


def test_export_keeps_the_metadata_import_reads(pool_dir, tmp_path, make_settings, capsys):
    # Metrics and distillation settings of library and oracle that pool.json carries in their entries
    # (an extracted pool's), not derived from `info`, survive export and import.
    source = tmp_path / "source"
    shutil.copytree(pool_dir, source)
    manifest = json.loads((source / "pool.json").read_text())
    manifest["library"].update(metrics={"test_acc": 0.51}, loss={"temperature": 4.0})
    manifest["oracle"]["metrics"] = {"test_acc": 0.61}
    manifest["experts"][0]["metrics"] = {"val_acc": 0.25, "val_images": 12}
    (source / "pool.json").write_text(json.dumps(manifest))
    hosts = [start(tmp_path, name, make_settings) for name in ("a", "b")]
    try:
        a, b = (f"127.0.0.1:{h.port}" for h in hosts)
        assert main(["registry", "import", str(source), "--target", a]) == 0
        assert main(["registry", "export", "test-pool", str(tmp_path / "out"), "--target", a]) == 0
        assert json.loads((tmp_path / "out" / "pool.json").read_text()) == manifest
        assert main(["registry", "import", str(tmp_path / "out"), "--target", b]) == 0
        capsys.readouterr()
        status, out, _ = run(capsys, "registry", "describe", "test-pool", "--target", b, "--json")
        doc = json.loads(out)
        assert (doc["library"]["metrics"], doc["library"]["loss"]) == ({"test_acc": 0.51}, {"temperature": 4.0})
        assert doc["oracle"]["metrics"] == {"test_acc": 0.61}
        assert doc["experts"][0]["val_accuracy"] == 0.25
    finally:
        for h in hosts:
            h.stop(None).wait(30)


def test_export_then_import_composes_the_same_model(tmp_path, make_settings, capsys):
    from poe.client.composer import Composer

    hosts = [start(tmp_path, name, make_settings, ("registry", "composer")) for name in ("a", "b")]
    try:
        a, b = (f"127.0.0.1:{h.port}" for h in hosts)
        assert main(["registry", "import", str(SHIPPED_POOL), "--target", a]) == 0
        exported = tmp_path / "exported"
        status, out, err = run(capsys, "registry", "export", "fashion-mnist", str(exported), "--target", a)
        assert status == 0 and "sha256 verified" in out and "[7/7]" in err
        # The same pool directory: the same files byte for byte and the same manifest.
        original = json.loads((SHIPPED_POOL / "pool.json").read_text())
        assert json.loads((exported / "pool.json").read_text()) == original
        for entry in [original["library"], original["oracle"], *original["experts"]]:
            assert (exported / entry["file"]).read_bytes() == (SHIPPED_POOL / entry["file"]).read_bytes()
        assert (exported / "hierarchy.yaml").read_text() == (SHIPPED_POOL / "hierarchy.yaml").read_text()

        assert main(["registry", "import", str(exported), "--target", b]) == 0
        capsys.readouterr()
        models = []
        for target in (a, b):
            with Composer(target) as composer:
                models.append(composer.compose(["Sandal", "Sneaker", "Bag"], pool="fashion-mnist@1"))
        assert models[0].header.sha256 == models[1].header.sha256
        assert models[0].data == models[1].data
        _, meta = models[1].load()
        assert meta["classes"] == ["Sandal", "Sneaker", "Bag"] and meta["pool"] == "fashion-mnist@1"
    finally:
        for h in hosts:
            h.stop(None).wait(30)
