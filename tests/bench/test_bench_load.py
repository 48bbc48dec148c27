"""`poe bench load` in quick mode, so that the harness cannot rot: one run through the real command
line (in process) on a small pool with random weights, with both phases (the second with watch and
stuck streams); the tests check the JSON it writes, the Markdown it puts between its markers, and
that the figures agree with each other. Bad options exit with the invalid-argument status."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from poe.bench import load
from poe.cli.main import main
from poe.cli.output import EXIT_INVALID_ARGUMENT
from poe.engine.pool import save as save_pool


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def quick_run(random_pool, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench-load")
    pool_dir = save_pool(random_pool, tmp / "test-pool")
    docs, json_out = tmp / "BENCHMARKS.md", tmp / "load.json"
    docs.write_text("# Benchmarks\n\nHand-written text stays.\n")
    args = ("bench", "load", "--pool", str(pool_dir), "--watch-streams", "40", "--stuck-streams", "200",
            "--formats", "torchscript", "--quick", "--json-out", str(json_out), "--update-docs", "--docs", str(docs))
    rc, out, err = run_cli(*args)
    assert rc == 0, err
    return json.loads(json_out.read_text()), docs.read_text(), out, args


def test_both_phases_measure_every_operation(quick_run):
    result, _, _, _ = quick_run
    assert result["quick"] and list(result["phases"]) == ["baseline", "streams"]
    assert result["clients"] == 2 and result["formats"] == ["torchscript"]
    for phase in result["phases"].values():
        assert phase["errors"] == {}  # nothing refused or failed at this load
        assert phase["calls"] == sum(o["calls"] for o in phase["ops"].values()) > 0
        for op in load.MIX:
            o = phase["ops"][op]
            if o["calls"]:
                assert 0 < o["p50_ms"] <= o["p99_ms"] <= o["max_ms"]
        server = phase["server"]
        assert server["template_misses"] == {"torchscript": 0, "pt2": 0, "onnx": 0}
        rss = server["rss_mb"]
        assert 0 < rss["start"] <= rss["warm"] and rss["after_warmup"] > 0 and rss["end"] > 0
    streams = result["phases"]["streams"]
    # Quick mode caps the streams: 4 watches (open until the end), 8 ComposeModel streams never read.
    assert (streams["watch_streams"], streams["stuck_streams"]) == (4, 8)
    assert sum(streams["stream_outcomes"]["watch"].values()) == 4
    assert streams["stream_outcomes"]["watch"] == {"open": 4}
    assert sum(streams["stream_outcomes"]["stuck"].values()) == 8
    assert set(result["targets"]) == {"baseline", "streams", "streams_vs_baseline"}


def test_markdown_between_its_markers_with_the_command(quick_run):
    result, docs, out, args = quick_run
    assert result["command"] == "poe " + " ".join(args)
    assert "Hand-written text stays." in docs
    assert "<!-- bench:load:start -->" not in docs  # the default mix's section; this one asked for TorchScript only
    start, end = docs.index("<!-- bench:load-torchscript:start -->"), docs.index("<!-- bench:load-torchscript:end -->")
    section = docs[start:end]
    assert f"Command: `{result['command']}`" in section and "*Quick run" in section
    for op in load.MIX:
        assert f"| {op} |" in section
    assert "Targets, baseline:" in section and "Targets, streams:" in section
    assert section.strip().endswith(out.strip().splitlines()[-1])  # printed as written


@pytest.mark.parametrize("extra, message", [
    (("--clients", "0"), "--clients: must be at least 1"),
    (("--formats", "torchscript,gif"), "--formats: expected some of torchscript, pt2, onnx"),
    (("--seconds", "0.1"), "--seconds: must be at least 0.5"),
    (("--pool", "/nonexistent/pool"), "is not a pool directory"),
])
def test_bad_options_exit_with_a_one_line_error(extra, message, tmp_path):
    rc, _, err = run_cli("bench", "load", "--docs", str(tmp_path / "B.md"), *extra)
    assert rc == EXIT_INVALID_ARGUMENT
    assert message in err and len(err.strip().splitlines()) == 1
    assert not Path(tmp_path / "B.md").exists()
