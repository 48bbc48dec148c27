"""`poe extract` against real servers: start, follow (a progress bar; Ctrl-C detaches), status,
list, cancel, upload, and one-line errors."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys

import yaml

from poe.cli.main import main
from poe.cli.output import EXIT_CONFLICT, EXIT_INVALID_ARGUMENT, EXIT_NOT_FOUND
from poe.engine.hierarchy import builtin


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_extract_cli(extractor, registry, data, oracle, random_pool, tmp_path, capsys, poll):
    from poe.engine import pool as pool_mod

    client, runtime = extractor
    target = client.target
    partial = dataclasses.replace(random_pool, experts={t: e for t, e in random_pool.experts.items()
                                                        if t not in ("tops", "warm-layers")})
    registry.client.import_pool(pool_mod.save(partial, tmp_path / "partial"))  # test-pool@1
    h2 = builtin("fashion-mnist").to_dict()
    h2["version"] = 2
    tasks = dict(h2["tasks"])
    h2["tasks"] = {"upper-body": tasks.pop("tops") + tasks.pop("warm-layers"), **tasks}
    (tmp_path / "h2.yaml").write_text(yaml.safe_dump(h2, sort_keys=False))

    # Start with --follow in another process (a TorchScript oracle, a local hierarchy file, a new
    # expert on the base pool), then Ctrl-C: it detaches and the job keeps running.
    argv = [sys.executable, "-m", "poe.cli.main", "extract", "--target", target, "--dataset", data["idx"],
            "--oracle", oracle["torchscript"], "--hierarchy", str(tmp_path / "h2.yaml"), "--base-pool", "test-pool",
            "--expert-epochs", "12", "--batch-size", "10", "--views", "1", "--follow"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "POE_NO_PROGRESS": "0"})
    try:
        job_id = proc.stderr.readline().split()[1]  # "job <id> started"
        assert poll(lambda: client.get(job_id).progress.phase == "experts")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert f"detached; job {job_id} keeps running" in err and "%|" in err  # the progress bar was drawn
    assert client.get(job_id).job.state == 2  # RUNNING

    # A second job while the first runs: queued, printed as JSON, cancelled from the CLI. Its local
    # safetensors oracle is uploaded to the registry and sent by id.
    code, out, err = run_cli(capsys, "extract", "--target", target, "--registry", registry.target, "--dataset",
                             data["idx"], "--oracle", oracle["safetensors"], "--hierarchy", "fashion-mnist", "--name",
                             "other", "--json")
    assert code == 0, err
    queued = json.loads(out)
    assert queued["state"] == "pending" and queued["oracle_id"] and "uploaded: id" in err
    code, out, err = run_cli(capsys, "extract", "cancel", queued["id"], "--target", target)
    assert (code, out.strip()) == (0, f"job {queued['id']} cancelled")

    # Follow the first job to the end.
    code, out, err = run_cli(capsys, "extract", "status", job_id, "--follow", "--target", target)
    assert code == 0 and f"job {job_id} succeeded: published test-pool@2" in out
    pv = registry.client.get_pool("test-pool@2")
    assert pv.hierarchy.version == 2
    assert [x.task for x in pv.experts] == ["upper-body", "lower-body-and-dresses", "footwear", "bags"]

    code, out, err = run_cli(capsys, "extract", "status", job_id, "--target", target, "--json")
    status = json.loads(out)
    assert (status["state"], status["pool"], status["progress"]) == ("succeeded", "test-pool@2", 1.0)
    assert status["params"]["oracle"]["kind"] == "torchscript" and status["params"]["tasks"] == ["upper-body"]
    code, out, err = run_cli(capsys, "extract", "status", job_id, "--target", target)
    assert code == 0 and "state     succeeded" in out and "pool      test-pool@2" in out
    code, out, err = run_cli(capsys, "extract", "list", "--target", target)
    assert code == 0 and job_id in out and queued["id"] in out
    code, out, err = run_cli(capsys, "extract", "list", "--target", target, "--state", "cancelled", "--json")
    assert [j["id"] for j in json.loads(out)] == [queued["id"]]

    # Errors: one line, non-zero.
    code, out, err = run_cli(capsys, "extract", "cancel", job_id, "--target", target)
    assert code == EXIT_CONFLICT and err.strip() == f"poe: error: job {job_id} is already succeeded"
    code, out, err = run_cli(capsys, "extract", "--target", target, "--registry", registry.target, "--dataset",
                             data["rgb3"], "--oracle", oracle["safetensors"], "--hierarchy", "fashion-mnist")
    errors = [line for line in err.splitlines() if line.startswith("poe: error:")]  # after the upload's notice
    assert code == EXIT_INVALID_ARGUMENT and len(errors) == 1 and "class count mismatch" in errors[0]
    code, out, err = run_cli(capsys, "extract", "--target", target, "--oracle", oracle["safetensors"])
    assert code == EXIT_INVALID_ARGUMENT and "--dataset is required" in err
    code, out, err = run_cli(capsys, "extract", "status", "nope", "--target", target)
    assert code == EXIT_NOT_FOUND and "no job 'nope'" in err

    # A local safetensors oracle is registered in the registry before the job is checked (--upload
    # insists on it); the registry files it under a data set, so a data set that names no built-in
    # hierarchy needs one. A TorchScript file is never uploaded.
    code, out, err = run_cli(capsys, "extract", "--target", target, "--registry", registry.target, "--dataset",
                             data["idx"], "--oracle", oracle["safetensors"], "--upload")
    assert code == EXIT_INVALID_ARGUMENT and "give --hierarchy" in err
    code, out, err = run_cli(capsys, "extract", "--target", target, "--registry", registry.target, "--dataset",
                             data["idx"], "--hierarchy", "fashion-mnist", "--oracle", oracle["torchscript"], "--upload")
    assert code == EXIT_INVALID_ARGUMENT and "--upload sends local safetensors oracles only" in err
    code, out, err = run_cli(capsys, "extract", "--target", target, "--registry", registry.target, "--dataset",
                             data["idx"], "--hierarchy", "fashion-mnist", "--oracle", oracle["safetensors"], "--upload",
                             "--tasks", "hats")
    assert code == EXIT_INVALID_ARGUMENT and "unknown primitive tasks: 'hats'" in err
    uploaded = int(err.split("id ")[1].split()[0])
    assert registry.client.get_oracle(uploaded).dataset == "fashion-mnist"
