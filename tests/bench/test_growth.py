"""`poe bench growth` in quick mode, so that the harness cannot rot: one run through the real command
line (in process) against a real registry process and a real composer server, with synthetic pools
of 10 and 100 experts; the tests check the JSON it writes, that its figures agree with each other,
and the Markdown it puts between its markers. Bad options exit with the invalid-argument status."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from poe.bench import growth
from poe.cli.main import main
from poe.cli.output import EXIT_INVALID_ARGUMENT


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench-growth")
    docs, json_out = tmp / "BENCHMARKS.md", tmp / "growth.json"
    docs.write_text("# Benchmarks\n\nHand-written text stays.\n")
    args = ("bench", "growth", "--quick", "--json-out", str(json_out), "--update-docs", "--docs", str(docs))
    rc, out, err = run_cli(*args)
    assert rc == 0, err
    return json.loads(json_out.read_text()), docs.read_text(), out, args


def _latencies_ok(s: dict, n: int) -> None:
    assert s["n"] == n
    assert 0 < s["p50_ms"] <= s["p99_ms"] and s["mean_ms"] > 0


def test_every_registry_size_is_measured(quick_run):
    result, _, _, _ = quick_run
    assert result["quick"] and result["part"] == "growth"
    rows = result["registry_size"]
    assert [r["experts"] for r in rows] == list(growth.QUICK_SIZES)
    for r in rows:
        _latencies_ok(r, 10)
        assert r["pools"] == 1 and r["query_pool_experts"] == r["experts"]  # under the pool width: one pool
        assert r["templates_made_while_timed"] == 0  # the layout was warm: no request waited for TorchScript
        assert r["first_view_s"] > 0 and r["populate_s"] >= 0
    ratio = result["registry_size_ratio"]
    assert ratio["largest_over_smallest_p50"] == pytest.approx(rows[-1]["p50_ms"] / rows[0]["p50_ms"], rel=1e-2)
    assert ratio["max_over_min_p50"] >= max(1.0, ratio["largest_over_smallest_p50"])


def test_experts_per_query_and_the_fitted_line(quick_run):
    result, _, _, _ = quick_run
    epq = result["experts_per_query"]
    assert epq["registry_experts"] == growth.QUICK_SIZES[-1] and epq["pool_experts"] == growth.QUICK_SIZES[-1]
    assert [r["experts"] for r in epq["rows"]] == list(growth.QUICK_EXPERTS_PER_QUERY)
    for r in epq["rows"]:
        _latencies_ok(r, 5)
        assert r["templates_made_while_timed"] == 0
    fit = epq["fit"]
    assert fit == {**growth.fit_line([r["experts"] for r in epq["rows"]], [r["p50_ms"] for r in epq["rows"]]),
                   "over": "p50 per number of experts"}
    assert fit["r2"] <= 1.0


def test_fit_line_recovers_a_known_line():
    fit = growth.fit_line([1, 2, 5, 10], [2.5 + 0.5 * x for x in (1, 2, 5, 10)])
    assert (fit["slope_ms_per_expert"], fit["intercept_ms"], fit["r2"]) == (0.5, 2.5, 1.0)
    assert growth.fit_line([1, 2, 3], [1.0, 3.0, 2.0])["r2"] < 1.0


def test_registry_reads_return_every_expert(quick_run):
    result, _, _, _ = quick_run
    reads = result["registry_reads"]
    assert reads["registry_experts"] == 100 and reads["pool"] == result["registry_size"][-1]["query_pool"]
    assert reads["get_pool"]["experts"] == 100 and reads["get_pool"]["bytes"] > 0
    assert reads["list_experts_all"]["experts"] == 100
    assert reads["list_experts_page"]["experts"] == 100  # the default page size is 100
    _latencies_ok(reads["get_pool"], 5)
    _latencies_ok(reads["list_experts_page"], 5)
    _latencies_ok(reads["list_experts_all"], 3)


def test_markdown_between_its_markers_with_the_command(quick_run):
    result, docs, out, args = quick_run
    assert result["command"] == "poe " + " ".join(args)
    assert "Hand-written text stays." in docs
    start, end = docs.index("<!-- bench:growth:start -->"), docs.index("<!-- bench:growth:end -->")
    section = docs[start:end]
    assert f"Command: `{result['command']}`" in section and "**Quick mode**" in section
    assert "2 cores shared" in section
    for r in result["registry_size"]:
        assert f"| {r['experts']:,} | {r['pools']} |" in section
    assert "ms per expert" in section and "| GetPool `growth-0@1`" in section
    assert section.strip().endswith(out.strip().splitlines()[-1])  # printed as written


@pytest.mark.parametrize("extra, message", [
    (("--requests", "0"), "--requests: must be at least 1"),
    (("--sizes", "1"), "--sizes: expected numbers of experts from 2 to 100000"),
    (("--experts-per-query", "0"), "--experts-per-query: expected numbers of experts of at least 1"),
])
def test_bad_options_exit_with_a_one_line_error(extra, message, tmp_path):
    rc, _, err = run_cli("bench", "growth", "--docs", str(tmp_path / "B.md"), *extra)
    assert rc == EXIT_INVALID_ARGUMENT
    assert message in err and len(err.strip().splitlines()) == 1
    assert not Path(tmp_path / "B.md").exists()
