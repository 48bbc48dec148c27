"""The metric names of the dashboard and the rules, against a real /metrics endpoint served by
poe_services.metrics (the module every service exports from). A test with a running composer can do the
same with promql.exposed_metric_names(body of its /metrics)."""

from __future__ import annotations

import json
import urllib.request

import pytest
import yaml
from deploy_paths import GRAFANA, PROMETHEUS
from promql import exposed_metric_names, unknown_metrics

from poe_services import metrics


@pytest.fixture(scope="module")
def exposed() -> set[str]:
    port = metrics.serve_metrics(0, addr="127.0.0.1")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        body = response.read().decode()
    return exposed_metric_names(body)


def test_all_metric_names_are_exposed(exposed):
    poe = {n for n in exposed if n.startswith("poe_")}
    assert set(metrics.ALL_METRIC_NAMES) == poe


def test_dashboard_and_rules_read_exposed_metrics(exposed):
    exprs = [r["expr"] for g in yaml.safe_load((PROMETHEUS / "alerts.yaml").read_text())["groups"] for r in g["rules"]]
    dashboard = json.loads((GRAFANA / "poe-dashboard.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) > 20
    unknown = {e: unknown_metrics(e, exposed) for e in exprs}
    assert {e: u for e, u in unknown.items() if u} == {}


def test_exposed_metric_names_parses_type_lines():
    body = ("# HELP a_total x\n# TYPE a_total counter\na_total 1\n"
            "# TYPE a_created gauge\na_created 1.7e9\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 0\n"
            "# TYPE g gauge\n# TYPE lonely_created gauge\n")
    assert exposed_metric_names(body) == {"a_total", "h", "g", "lonely_created"}
