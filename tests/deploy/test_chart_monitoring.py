"""The chart's monitoring objects (templates/monitoring/): the Grafana dashboard ConfigMap, the
ServiceMonitor's target labels and the PrometheusRule's runbook links, rendered offline with
helm-python-sdk like tests/deploy/test_chart.py."""

from __future__ import annotations

import functools
import json

import helm_python
import pytest
import yaml
from deploy_paths import ALERTS, CHART, DASHBOARD
from k8s_checks import custom_resource_problems, load_docs, schema_problems
from relabel import assert_rules_find_every_service, service_monitor_targets

from poe_services.metrics import RESERVED_LABELS

RELEASE, NAMESPACE = "rel", "poe"  # a release name unlike "poe": the job names differ from the old poe-COMPONENT
ALL_ON = {"metrics": {"podAnnotations": False, "serviceMonitor": {"enabled": True},
                      "prometheusRule": {"enabled": True}, "dashboard": {"enabled": True}}}
# Fields of the Prometheus Operator's Endpoint and RelabelConfig (monitoring.coreos.com/v1) the chart may use.
ENDPOINT_FIELDS = {"port", "path", "interval", "scrapeTimeout", "honorLabels", "relabelings", "metricRelabelings"}
RELABEL_FIELDS = {"sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement", "action"}


@functools.cache
def _chart() -> helm_python.Chart:
    return helm_python.Chart.load(CHART)


@functools.cache
def _rendered(values_json: str) -> tuple[str, ...]:
    out = _chart().render(json.loads(values_json), name=RELEASE, namespace=NAMESPACE)
    return tuple(text for path, text in sorted(out.items()) if path.endswith(".yaml"))


def objects(values: dict) -> list[dict]:
    """The rendered objects (fresh dicts on every call: tests may change them)."""
    return load_docs(_rendered(json.dumps(values, sort_keys=True)))


def only(objs: list[dict], kind: str) -> dict:
    (obj,) = [o for o in objs if o["kind"] == kind]
    return obj


def test_everything_on_lints_clean_and_validates():
    report = helm_python.lint(CHART, ALL_ON, strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    objs = objects(ALL_ON)
    assert schema_problems(objs) == []
    assert custom_resource_problems(objs) == []


def test_dashboard_configmap_for_the_grafana_sidecar():
    assert not [o for o in objects({}) if o["kind"] == "ConfigMap" and "poe-dashboard.json" in o.get("data", {})]
    cm = [o for o in objects(ALL_ON) if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "rel-poe-dashboard"]
    (cm,) = cm
    assert cm["metadata"]["namespace"] == NAMESPACE
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["labels"]["app.kubernetes.io/part-of"] == "poe"
    assert "annotations" not in cm["metadata"]
    # The one copy of the dashboard, unchanged.
    assert list(cm["data"]) == ["poe-dashboard.json"]
    assert json.loads(cm["data"]["poe-dashboard.json"]) == json.loads(DASHBOARD.read_text())

    custom = {"metrics": {"dashboard": {"enabled": True, "namespace": "monitoring", "labels": {"team": "ml"},
                                       "annotations": {"grafana_folder": "PoE"}}}}
    (cm,) = [o for o in objects(custom) if o["metadata"]["name"] == "rel-poe-dashboard"]
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["team"] == "ml"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"  # the default label stays beside new ones
    assert cm["metadata"]["annotations"] == {"grafana_folder": "PoE"}


def test_service_monitor_gives_the_labels_the_rules_select_on():
    objs = objects(ALL_ON)
    sm = only(objs, "ServiceMonitor")
    (ep,) = sm["spec"]["endpoints"]
    assert set(ep) <= ENDPOINT_FIELDS
    assert ep["honorLabels"] is False
    for r in ep["relabelings"]:
        assert set(r) <= RELABEL_FIELDS, r
        assert r["targetLabel"] not in ("job", "instance"), r  # the rules need no particular job name
    selected = [o for o in objs if o["kind"] == "Service"
                and o["metadata"]["labels"].get("app.kubernetes.io/component") in ("registry", "composer", "extractor")]
    targets = service_monitor_targets(sm, selected, NAMESPACE)
    assert sorted(t["job"] for t in targets) == ["rel-poe-composer", "rel-poe-extractor", "rel-poe-registry"]
    assert_rules_find_every_service(targets, namespace=NAMESPACE)
    for t in targets:
        assert t["app_kubernetes_io_part_of"] == "poe" and t["pod"].startswith(t["service"])


def test_service_monitor_without_the_relabelings_would_not_do():
    """The check above is not vacuous: the operator's labels alone lack what the rules select on."""
    sm = only(objects(ALL_ON), "ServiceMonitor")
    bare = json.loads(json.dumps(sm))
    bare["spec"]["endpoints"][0]["relabelings"] = []
    services = [o for o in objects(ALL_ON) if o["kind"] == "Service"]
    with pytest.raises(AssertionError):
        assert_rules_find_every_service(service_monitor_targets(bare, services, NAMESPACE), namespace=NAMESPACE)


def test_service_monitor_honor_labels_setting():
    values = {"metrics": {"serviceMonitor": {"enabled": True, "honorLabels": True}}}
    (ep,) = only(objects(values), "ServiceMonitor")["spec"]["endpoints"]
    assert ep["honorLabels"] is True
    with pytest.raises(helm_python.errors.HelmValuesError):
        objects({"metrics": {"serviceMonitor": {"enabled": True, "honorLabels": "yes"}}})


def _runbooks(rule: dict) -> list[str]:
    return [r["annotations"]["runbook_url"] for g in rule["spec"]["groups"] for r in g["rules"]]


def test_prometheus_rule_runbook_links_follow_the_base_url():
    source = yaml.safe_load(ALERTS.read_text())
    default = only(objects(ALL_ON), "PrometheusRule")
    assert default["spec"]["groups"] == source["groups"]  # the default base is the file's own

    base = "https://wiki.example.com/ops/poe"
    values = {"metrics": {"prometheusRule": {"enabled": True, "runbookBaseUrl": base}}}
    moved = only(objects(values), "PrometheusRule")
    urls = _runbooks(moved)
    assert urls and all(u.startswith(base + "#") for u in urls)
    assert [u.partition("#")[2] for u in urls] == [u.partition("#")[2] for u in _runbooks(default)]
    # Only the links changed.
    for group in moved["spec"]["groups"]:
        for r in group["rules"]:
            r["annotations"].pop("runbook_url")
    for group in source["groups"]:
        for r in group["rules"]:
            r["annotations"].pop("runbook_url")
    assert moved["spec"]["groups"] == source["groups"]


@pytest.mark.parametrize("base", ["docs/OPERATIONS.md", "https://example.com/ops#alerts", "ftp://example.com/x"])
def test_runbook_base_url_must_be_an_absolute_http_url_without_anchor(base):
    with pytest.raises(helm_python.errors.HelmValuesError, match="runbookBaseUrl"):
        objects({"metrics": {"prometheusRule": {"enabled": True, "runbookBaseUrl": base}}})


def test_alert_labels_avoid_target_label_names():
    rule = only(objects(ALL_ON), "PrometheusRule")
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            assert not set(r.get("labels", {})) & RESERVED_LABELS, r["alert"]
