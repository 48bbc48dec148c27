"""Alert rules (deploy/prometheus/alerts.yaml) with the real promtool: syntax, unit tests, the metric
names every expression reads (against services/metrics.py), and the target labels they select on,
which every shipped way of scraping must give the PoE pods."""

from __future__ import annotations

import json
import re
import subprocess

import helm_python
import pytest
import yaml
from deploy_paths import ALERTS, CHART, KUSTOMIZE, OPERATIONS_DOC, PROMETHEUS, alert_rules, dashboard_exprs
from k8s_checks import load_docs
from promql import fill_dashboard_variables, label_names_in, metric_names_in, unknown_metrics
from relabel import STOCK_KUBERNETES_PODS, assert_rules_find_every_service, pod_discovery, scrape_pods

from poe_services.metrics import ALL_METRIC_NAMES, RESERVED_LABELS

POE_SERVICES = ("registry", "composer", "extractor")


def rules() -> list[dict]:
    return alert_rules()


def run_promtool(promtool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, cwd=PROMETHEUS)


def test_promtool_check_rules(promtool):
    out = run_promtool(promtool, "check", "rules", str(ALERTS))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules())} rules found" in out.stdout


def test_promtool_test_rules(promtool):
    out = run_promtool(promtool, "test", "rules", str(PROMETHEUS / "alerts_test.yaml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_has_a_unit_test():
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yaml").read_text())["tests"]
    firing = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    assert {r["alert"] for r in rules()} == firing


def test_promtool_catches_a_broken_rule(promtool, tmp_path):
    """The check above is not vacuous: an unknown function or a bad selector fails it."""
    bad = {"groups": [{"name": "x", "rules": [{"alert": "Bad", "expr": "rate(up[5m]"}]}]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert run_promtool(promtool, "check", "rules", str(path)).returncode != 0


def test_rules_read_only_exported_metrics():
    for r in rules():
        assert metric_names_in(r["expr"]), r["alert"]
        assert unknown_metrics(r["expr"], ALL_METRIC_NAMES) == set(), r["alert"]


def test_the_required_alerts():
    by_name = {r["alert"]: r for r in rules()}
    slo = by_name["PoeComposeLatencyHigh"]
    assert slo["for"] == "5m"
    assert "histogram_quantile(0.99" in slo["expr"]
    assert metric_names_in(slo["expr"]) >= {"poe_compose_duration_seconds_bucket"}
    err = by_name["PoeGrpcErrorRatioHigh"]
    assert 'grpc_code!="OK"' in err["expr"] and "grpc_server_handled_total" in metric_names_in(err["expr"])
    assert "by (namespace, grpc_service)" in err["expr"]
    down = by_name["PoeServiceDown"]
    assert re.fullmatch(r'up\{app_kubernetes_io_part_of="poe",app_kubernetes_io_component=~"registry\|composer\|'
                        r'extractor"\} == 0', down["expr"].strip())
    absent = by_name["PoeServiceAbsent"]["expr"]
    assert [m for m in re.findall(r'app_kubernetes_io_component="(\w+)"', absent)] == list(POE_SERVICES)
    failing = by_name["PoeExtractionJobsFailing"]
    assert metric_names_in(failing["expr"]) == {"poe_extraction_jobs_finished_total"}
    for r in rules():
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert {"summary", "description", "runbook_url"} <= set(r["annotations"]), r["alert"]


def test_rules_never_depend_on_the_scrape_job_name():
    """Job names differ between annotation-based scraping (kubernetes-pods), the ServiceMonitor
    (the Service's name, so the release's) and hand-written configurations: no rule selects on them,
    and no alert label reuses a target label's name."""
    for r in rules():
        assert "job" not in label_names_in(r["expr"]), r["alert"]
        assert not set(r["labels"]) & RESERVED_LABELS, r["alert"]
        assert "$labels.job" not in json.dumps(r["annotations"]), r["alert"]


def _doc_anchors() -> set[str]:
    """GitHub's anchors of the headings of docs/OPERATIONS.md."""
    anchors = set()
    for line in OPERATIONS_DOC.read_text().splitlines():
        m = re.match(r"#+\s+(.*)", line)
        if m:
            anchors.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def test_runbook_urls_are_absolute_links_to_sections_of_the_operations_guide():
    base = yaml.safe_load((CHART / "values.yaml").read_text())["metrics"]["prometheusRule"]["runbookBaseUrl"]
    assert base.startswith("https://") and base.endswith("docs/OPERATIONS.md")
    anchors = _doc_anchors()
    assert "alerts" in anchors
    for r in rules():
        url = r["annotations"]["runbook_url"]
        page, _, anchor = url.partition("#")
        assert page == base, r["alert"]  # the chart swaps this part for metrics.prometheusRule.runbookBaseUrl
        assert anchor in anchors, (r["alert"], anchor)


def test_dashboard_queries_are_valid_promql(promtool, tmp_path):
    """Every dashboard query, with Grafana's variables filled in, passes promtool as a recording rule."""
    recording = [{"record": f"poe_dashboard:query_{i}", "expr": fill_dashboard_variables(e)}
                 for i, e in enumerate(dashboard_exprs())]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recording}]}))
    out = run_promtool(promtool, "check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(recording)} rules found" in out.stdout


# -- the target labels the rules select on, from every shipped way of scraping ---------------------

def _chart_objects(values: dict | None = None) -> list[dict]:
    trial = {"postgresql": {"enabled": True}, "minio": {"enabled": True},
             "database": {"auth": {"existingSecret": "", "password": "p"}}}
    with helm_python.Chart.load(CHART) as chart:
        out = chart.render(trial | (values or {}), name="poe", namespace="poe")
    return load_docs(t for p, t in out.items() if p.endswith(".yaml"))


def _kustomize_objects(kubectl: str) -> list[dict]:
    out = subprocess.run([kubectl, "kustomize", str(KUSTOMIZE / "overlays" / "prod")], capture_output=True,
                         text=True, timeout=60, check=True)
    return load_docs([out.stdout])


def test_scrape_config_gives_the_labels_the_rules_select_on(promtool, tmp_path):
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    # Debian's promtool is built without Kubernetes discovery: check the rest with a static target.
    static = json.loads(json.dumps(config))
    static["scrape_configs"][0].pop("kubernetes_sd_configs")
    static["scrape_configs"][0]["static_configs"] = [{"targets": ["127.0.0.1:9464"]}]
    static["rule_files"] = [str(ALERTS)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(static))
    out = run_promtool(promtool, "check", "config", str(path))
    assert out.returncode == 0, out.stdout + out.stderr

    scraped = scrape_pods(pod_discovery(_chart_objects()), job["relabel_configs"])
    assert sorted(t["app_kubernetes_io_component"] for t in scraped) == sorted(POE_SERVICES)
    assert_rules_find_every_service(scraped)


@pytest.mark.parametrize("deployed_by", ["helm", "kustomize"])
def test_annotation_based_scraping_gives_the_labels_the_rules_select_on(deployed_by, request):
    """A stock Prometheus that scrapes annotated pods (job kubernetes-pods) needs no PoE-specific
    configuration: the pods' labels become the target labels the rules and the dashboard use."""
    objs = _chart_objects() if deployed_by == "helm" else _kustomize_objects(request.getfixturevalue("kubectl"))
    scraped = scrape_pods(pod_discovery(objs), STOCK_KUBERNETES_PODS["relabel_configs"])
    assert_rules_find_every_service(scraped)
    # Without the annotations (metrics.podAnnotations=false, for the ServiceMonitor) nothing is scraped twice.
    if deployed_by == "helm":
        quiet = _chart_objects({"metrics": {"podAnnotations": False}})
        assert scrape_pods(pod_discovery(quiet), STOCK_KUBERNETES_PODS["relabel_configs"]) == []


def test_selector_check_is_not_vacuous():
    """A target without the part-of label (a scrape configuration that drops pod labels) fails it."""
    target = {"namespace": "poe", "pod": "p", "app_kubernetes_io_component": "composer"}
    with pytest.raises(AssertionError):
        assert_rules_find_every_service([target])
    full = [{"namespace": "poe", "pod": f"p-{s}", "app_kubernetes_io_part_of": "poe",
             "app_kubernetes_io_component": s} for s in POE_SERVICES]
    assert_rules_find_every_service(full)
