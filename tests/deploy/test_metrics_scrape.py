"""The metric names of the dashboard and the rules, against a real /metrics endpoint served by
poe_services.metrics (the module every service exports from). A test with a running composer can do the
same with promql.exposed_metric_names(body of its /metrics)."""

from __future__ import annotations

import re
import urllib.request

import pytest
from deploy_paths import alert_rules, dashboard_exprs
from prometheus_client.metrics import MetricWrapperBase
from promql import exposed_metric_names, unknown_metrics
from testenv import eventually

from poe_services import metrics


@pytest.fixture(scope="module")
def body() -> str:
    port = metrics.serve_metrics(0, addr="127.0.0.1")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


@pytest.fixture(scope="module")
def exposed(body) -> set[str]:
    return exposed_metric_names(body)


def test_all_metric_names_are_exposed(exposed):
    ours = {n for n in exposed if n.startswith(("poe_", "grpc_server_"))}
    assert set(metrics.ALL_METRIC_NAMES) == ours
    assert all(n.startswith("poe_") for n in metrics.PRODUCT_METRIC_NAMES)


def _label_names(body: str, families: set[str]) -> dict[str, set[str]]:
    """family -> the label names of its samples in a text exposition."""
    out: dict[str, set[str]] = {}
    for line in body.splitlines():
        m = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)\{(.*)\}\s", line)
        if m:
            family = next((f for f in families if m.group(1) in (f, f + "_bucket", f + "_sum", f + "_count")), None)
            if family:
                out.setdefault(family, set()).update(re.findall(r'(\w+)="', m.group(2)))
    return out


def test_no_label_collides_with_target_labels(body):
    """A metric label named like one that Prometheus or the Prometheus Operator attaches to every
    series of a target would be renamed exported_* at scrape time (honor_labels off), or would
    overwrite the target's (on)."""
    seen = _label_names(body, set(metrics.ALL_METRIC_NAMES))  # the series exported before any traffic
    assert {"poe_build_info", "poe_extraction_jobs", "poe_extraction_jobs_finished_total",
            "poe_compose_blob_errors_total"} <= set(seen)
    for family, names in seen.items():
        assert not names & metrics.RESERVED_LABELS, family
    defined = [m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]
    assert len(defined) == len(metrics.ALL_METRIC_NAMES)
    for metric in defined:  # every label, also of series that appear with the first call
        assert not set(metric._labelnames) & metrics.RESERVED_LABELS, metric._name
    assert set(metrics.GRPC_HANDLED._labelnames) == {"grpc_type", "grpc_service", "grpc_method", "grpc_code"}


def test_dashboard_and_rules_read_exposed_metrics(exposed):
    exprs = [r["expr"] for r in alert_rules()] + dashboard_exprs()
    assert len(exprs) > 20
    unknown = {e: unknown_metrics(e, exposed) for e in exprs}
    assert {e: u for e, u in unknown.items() if u} == {}


def test_exposed_metric_names_parses_type_lines():
    body = ("# HELP a_total x\n# TYPE a_total counter\na_total 1\n"
            "# TYPE a_created gauge\na_created 1.7e9\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 0\n"
            "# TYPE g gauge\n# TYPE lonely_created gauge\n")
    assert exposed_metric_names(body) == {"a_total", "h", "g", "lonely_created"}


def test_extraction_jobs_live_gauge_and_finished_counter(tmp_path):
    """The extractor's job board keeps poe_extraction_jobs at the jobs it holds now and counts the
    finished ones in poe_extraction_jobs_finished_total, which only grows."""
    import threading

    from prometheus_client import REGISTRY

    from poe.v1 import common_pb2
    from poe_services.extractor.jobs import Job, JobBoard

    def live(state: str) -> float:
        return REGISTRY.get_sample_value("poe_extraction_jobs", {"state": state})

    def finished(state: str) -> float:
        return REGISTRY.get_sample_value("poe_extraction_jobs_finished_total", {"state": state})

    before = {s: finished(s) for s in ("succeeded", "failed", "cancelled")}
    # max_jobs=1 and a runner that ends each job when the test says: the first job runs, the second waits.
    outcomes = {"job-0": "failed", "job-1": "succeeded"}
    release = {job_id: threading.Event() for job_id in outcomes}

    def run(job) -> None:
        release[job.id].wait(30)
        board.finish(job, outcomes[job.id])

    board = JobBoard(None, 1, run, threading.Event(), threading.Event())
    jobs = [Job(f"job-{i}", None, tmp_path / f"run-{i}", common_pb2.ExtractionJob()) for i in range(2)]
    for job in jobs:
        assert board.enqueue(job)
    assert eventually(lambda: (live("running"), live("queued")) == (1, 1))
    release["job-0"].set()  # the queued job starts in its place
    assert eventually(lambda: (live("running"), live("queued")) == (1, 0))
    release["job-1"].set()
    assert eventually(lambda: (live("running"), live("queued")) == (0, 0))
    assert {s: finished(s) - before[s] for s in before} == {"succeeded": 1, "failed": 1, "cancelled": 0}
    board.close(timeout=5)
