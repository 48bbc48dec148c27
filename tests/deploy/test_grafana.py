"""The Grafana dashboard (deploy/helm/poe/files/poe-dashboard.json, the one copy: the chart ships
it as a ConfigMap). Grafana itself is not installable here, so the JSON is checked for the panels an
operator needs, for metric names that the services really export (services/metrics.py) and for
selectors that work whatever the scrape job is called; test_prometheus.py runs its queries through
promtool and test_real_prometheus.py evaluates them in a real Prometheus."""

from __future__ import annotations

import json
import re

import pytest
from deploy_paths import DASHBOARD as DASHBOARD_FILE
from deploy_paths import REPO
from promql import label_names_in, metric_names_in, unknown_metrics

from poe_services.metrics import ALL_METRIC_NAMES, GRPC_METRIC_NAMES

DASHBOARD = json.loads(DASHBOARD_FILE.read_text())
PANELS = [p for p in DASHBOARD["panels"] if p["type"] != "row"]


def exprs_of(panel: dict) -> list[str]:
    return [t["expr"] for t in panel.get("targets", [])]


def all_exprs() -> list[str]:
    return [e for p in PANELS for e in exprs_of(p)]


def template_queries() -> list[str]:
    out = []
    for var in DASHBOARD["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.*),\s*([A-Za-z_]\w*)\)", q)
            assert m, q
            out.append(m.group(1))
    return out


def test_dashboard_basics():
    assert DASHBOARD["uid"] == "poe-services" and DASHBOARD["title"]
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    names = {v["name"] for v in DASHBOARD["templating"]["list"]}
    assert {"datasource", "namespace", "pod"} <= names
    for p in PANELS:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and p.get("description"), p["title"]
        assert p["fieldConfig"]["defaults"].get("unit"), p["title"]
        for t in p["targets"]:
            assert t["refId"] and t["expr"].strip()


def test_panels_do_not_overlap():
    cells = set()
    for p in DASHBOARD["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, p["title"]
                cells.add((x, y))


@pytest.mark.parametrize("expr", all_exprs() + template_queries())
def test_queries_read_only_exported_metrics(expr):
    assert metric_names_in(expr)
    assert unknown_metrics(expr, ALL_METRIC_NAMES) == set()


def _panels_reading(metric: str) -> list[dict]:
    return [p for p in PANELS if any(metric in {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
                                                for n in metric_names_in(e)} for e in exprs_of(p))]


def test_required_views():
    # Compose latency p50/p95/p99 split by cache hit/miss.
    (lat,) = [p for p in _panels_reading("poe_compose_duration_seconds") if p["type"] == "timeseries"]
    ok = [e for e in exprs_of(lat) if 'grpc_code="OK"' in e]
    quantiles = sorted(re.search(r"histogram_quantile\(([\d.]+)", e).group(1) for e in ok)
    assert quantiles == ["0.5", "0.95", "0.99"]
    assert all("by (cache, le)" in e for e in ok)
    # ... and how long failed calls took, by code.
    (failed,) = set(exprs_of(lat)) - set(ok)
    assert "by (grpc_code, le)" in failed and 'grpc_code!="OK"' in failed
    # Request rate by status code.
    assert any("sum by (grpc_code)" in e for p in _panels_reading("poe_compose_requests_total") for e in exprs_of(p))
    # Cache hit ratio: hits / (hits + misses).
    ratio = [e for e in all_exprs() if {"poe_compose_cache_hits_total", "poe_compose_cache_misses_total"}
             <= metric_names_in(e)]
    assert ratio and all("/" in e for e in ratio)
    # In-flight, stages, extraction jobs and progress, per-RPC latency and errors, targets up.
    assert _panels_reading("poe_compose_in_flight_requests")
    assert any("by (stage" in e for p in _panels_reading("poe_compose_stage_duration_seconds") for e in exprs_of(p))
    assert any("by (state)" in e for p in _panels_reading("poe_extraction_jobs") for e in exprs_of(p))
    assert any("by (state) (increase(" in e
               for p in _panels_reading("poe_extraction_jobs_finished_total") for e in exprs_of(p))
    assert _panels_reading("poe_extraction_progress_ratio")
    assert any("by (grpc_service, grpc_method, le)" in e
               for p in _panels_reading("grpc_server_handling_seconds") for e in exprs_of(p))
    assert any("by (grpc_service, grpc_method, grpc_code)" in e and 'grpc_code!="OK"' in e
               for p in _panels_reading("grpc_server_handled_total") for e in exprs_of(p))
    assert _panels_reading("up")


def test_every_exported_metric_is_on_the_dashboard():
    shown = {n for e in all_exprs() for n in metric_names_in(e)}
    shown = {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for n in shown}
    assert set(ALL_METRIC_NAMES) <= shown


def test_selectors_work_whatever_the_job_is_called():
    """No query names a scrape job. Every query is narrowed by the namespace and pod variables; the
    gRPC metrics, which other applications export too, to the poe.v1 services; `up`, which every
    target has, to the targets labelled part-of poe."""
    variables = [v["query"]["query"] for v in DASHBOARD["templating"]["list"] if v["type"] == "query"]
    for expr in all_exprs() + variables:
        assert "job" not in label_names_in(expr), expr
    for expr in all_exprs():
        assert 'namespace=~"$namespace"' in expr and 'pod=~"$pod"' in expr, expr
        names = {n.removesuffix("_bucket") for n in metric_names_in(expr)}
        if names & set(GRPC_METRIC_NAMES):
            assert expr.count('grpc_service=~"poe[.]v1[.].+"') == expr.count("grpc_server_"), expr
        if "up" in names:
            assert 'app_kubernetes_io_part_of="poe"' in expr, expr
    # The variables list PoE pods by the metric every PoE process exports.
    assert variables == ["label_values(poe_build_info, namespace)",
                         'label_values(poe_build_info{namespace=~"$namespace"}, pod)']


def test_one_copy_of_the_dashboard():
    """The chart's files/poe-dashboard.json is the only one: a real file, no other copy in the tree."""
    assert DASHBOARD_FILE.is_file() and not DASHBOARD_FILE.is_symlink()
    skip = {".git", ".venv", "node_modules"}
    copies = [p for p in REPO.rglob("*.json") if not skip & set(p.relative_to(REPO).parts)
              and '"uid": "poe-services"' in p.read_text(errors="replace")]
    assert copies == [DASHBOARD_FILE]
