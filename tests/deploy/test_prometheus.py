"""Alert rules (deploy/prometheus/alerts.yaml) with the real promtool: syntax, unit tests, and the
metric names every expression reads, against services/metrics.py."""

from __future__ import annotations

import json
import re
import subprocess

import helm_python
import yaml
from deploy_paths import CHART, GRAFANA, PROMETHEUS
from k8s_checks import load_docs
from promql import metric_names_in, unknown_metrics

from poe_services.metrics import ALL_METRIC_NAMES

ALERTS = PROMETHEUS / "alerts.yaml"


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


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
    assert 'code!="OK"' in err["expr"] and "poe_grpc_server_handled_total" in metric_names_in(err["expr"])
    down = by_name["PoeServiceDown"]
    assert re.search(r"up\{job=~\"poe-\(registry\|composer\|extractor\)\"\} == 0", down["expr"])
    for r in rules():
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert {"summary", "description", "runbook_url"} <= set(r["annotations"]), r["alert"]


def test_dashboard_queries_are_valid_promql(promtool, tmp_path):
    """Every dashboard query, with Grafana's variables filled in, passes promtool as a recording rule."""
    dashboard = json.loads((GRAFANA / "poe-dashboard.json").read_text())
    recording = []
    for panel in dashboard["panels"]:
        for t in panel.get("targets", []):
            expr = t["expr"].replace("$__rate_interval", "5m").replace("$namespace", ".*")
            assert "$" not in expr.replace('"$1"', ""), expr
            recording.append({"record": f"poe_dashboard:panel_{panel['id']}_{t['refId']}", "expr": expr})
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recording}]}))
    out = run_promtool(promtool, "check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(recording)} rules found" in out.stdout


# -- prometheus.yml (for a Prometheus without the operator) ------------------------------------------

def _relabel(labels: dict[str, str], configs: list[dict]) -> dict[str, str] | None:
    """Prometheus' keep / replace relabelling, enough for prometheus.yml (anchored regexes)."""
    labels = dict(labels)
    for c in configs:
        value = c.get("separator", ";").join(labels.get(s, "") for s in c.get("source_labels", []))
        m = re.fullmatch(c.get("regex", "(.*)"), value)
        action = c.get("action", "replace")
        if action == "keep":
            if not m:
                return None
        elif action == "replace":
            if m:
                labels[c["target_label"]] = m.expand(c.get("replacement", "$1").replace("$", "\\"))
        else:
            raise AssertionError(f"relabel action {action} not simulated")
    return {k: v for k, v in labels.items() if not k.startswith("__")}


def _pod_targets(objs: list[dict]) -> list[dict[str, str]]:
    targets = []
    for o in objs:
        if o["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        tmpl = o["spec"]["template"]
        for c in tmpl["spec"]["containers"]:
            for p in c.get("ports", []) or [{}]:
                meta = {f"__meta_kubernetes_pod_label_{re.sub(r'[^a-zA-Z0-9_]', '_', k)}": v
                        for k, v in tmpl["metadata"]["labels"].items()}
                meta |= {"__meta_kubernetes_namespace": "poe",
                         "__meta_kubernetes_pod_name": o["metadata"]["name"] + "-x",
                         "__meta_kubernetes_pod_container_port_name": p.get("name", "")}
                targets.append(meta)
    return targets


def test_scrape_config_gives_the_job_names_the_rules_expect(promtool, tmp_path):
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

    with helm_python.Chart.load(CHART) as chart:
        objs = load_docs(t for p, t in chart.render({"postgresql": {"enabled": True}, "minio": {"enabled": True},
                                                      "database": {"auth": {"existingSecret": "", "password": "p"}}},
                                                     name="poe", namespace="poe").items() if p.endswith(".yaml"))
    scraped = [t for t in (_relabel(m, job["relabel_configs"]) for m in _pod_targets(objs)) if t is not None]
    assert sorted(t["job"] for t in scraped) == ["poe-composer", "poe-extractor", "poe-registry"]
    assert all(t["namespace"] == "poe" and t["pod"] for t in scraped)
