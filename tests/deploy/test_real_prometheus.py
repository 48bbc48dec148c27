"""The dashboard and the alert rules in a real Prometheus, scraping a live server that has served
traffic.

A registry, a composer and an extractor run in this process on one port (create_server, as `poe up`
builds them) with the shipped pool imported, and /metrics on loopback. Debian's Prometheus server
(/usr/bin/prometheus, from the package .ci/install-deploy-tools.sh installs) scrapes it every second
with the target labels the chart's scrape setups give, reproduced as static labels: the composer and
extractor pods as annotation-based scraping (job `kubernetes-pods`, pod labels mapped) labels them,
the registry pod as the chart's ServiceMonitor does (job = the Service's name, `rel-poe-registry`),
plus a composer pod that does not answer. Prometheus loads alerts.yaml itself, and a copy of it
whose only change is a `for:` of 1 s (and a label telling the copies apart), so that alerts fire
within the test.

After ComposeModel traffic (some requests for an unknown class among them), every dashboard query
and every alert expression is evaluated through the HTTP API: it parses, and returns series, except
where the test says why not. The rules are reported healthy, and the error-ratio and target-down
alerts fire.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import helm_python
import pytest
import yaml
from deploy_paths import ALERTS, CHART, REPO, alert_rules, dashboard, require_tool
from k8s_checks import load_docs
from prometheus_client import REGISTRY
from promql import fill_dashboard_variables, metric_names_in
from relabel import STOCK_KUBERNETES_PODS, pod_discovery, scrape_pods, service_monitor_targets
from testenv import auth_env

NAMESPACE = "poe-test"
RATE_WINDOW = "1m"  # for $__rate_interval: spans every sample of this short test
SHIPPED_POOL = REPO / "pools" / "fashion-mnist"
OK_CLASS_SETS = (["Sandal", "Bag"], ["Coat"], ["Sneaker", "Ankle boot", "Trouser"], ["Sandal", "Bag"])
FAILING_REQUESTS = 3  # ComposeModel for an unknown class: INVALID_ARGUMENT

# Alert expressions that return series after this traffic: the error ratios are far above 5 %, and
# one target is down.
ALERTS_WITH_DATA = {"PoeGrpcErrorRatioHigh", "PoeComposeErrorRatioHigh", "PoeServiceDown"}
# The others hold for a healthy service, so they return nothing here. Each is also evaluated with
# its threshold relaxed (a textual change of the shipped expression), which must return series:
# every selector in it matches what the live server exports. alert -> (shipped text, relaxed text,
# series expected at least).
RELAXED = {
    # Latency: no slow traffic is sent (the SLO's p99 may still be crossed on a loaded machine, so
    # the shipped expression is not judged either way).
    "PoeComposeLatencyHigh": ("> 0.25", ">= 0", 1),
    "PoeComposeLatencyCritical": ("> 1\n", ">= 0\n", 1),
    # Degraded pools and failed extraction jobs need a corrupt blob or an extraction run.
    "PoeComposerPoolDegraded": ("> 0", ">= 0", 1),
    "PoeExtractionJobsFailing": ("> 0", ">= 0", 1),
    # Every service has a target: with `group by` instead of `absent`, one series per service.
    "PoeServiceAbsent": ("absent(", "group by (app_kubernetes_io_component) (", 3),
}
# Metrics whose series only appear with traffic this test does not make: a dashboard query may come
# back empty only if it reads one of them. (Failures are part of the traffic, and the extraction,
# blob-error and recording counters are exported at 0 from the start.)
NEEDS_OTHER_TRAFFIC = {
    "poe_grpc_stream_write_cancels_total": "a client that stops reading a response stream",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], object], timeout: float = 20.0, interval: float = 0.25):
    """check()'s first truthy result, polled until `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last result: {result!r}")
        time.sleep(interval)


# -- the live server -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """(gRPC target, metrics port): registry, composer and extractor in this process, shipped pool warm."""
    from poe.client.registry import RegistryClient
    from poe.engine.config import Settings
    from poe_services.host import create_server
    from poe_services.metrics import serve_metrics

    home = tmp_path_factory.mktemp("real-prometheus") / "home"
    settings = Settings.from_env({**auth_env(), "POE_HOME": str(home), "POE_DEFAULT_POOL": "fashion-mnist"})
    host = create_server("127.0.0.1:0", settings, ("registry", "composer", "extractor"), migrate=True, warm=False)
    host.start()
    try:
        target = f"127.0.0.1:{host.port}"
        with RegistryClient(target) as reg:
            reg.import_pool(SHIPPED_POOL)
        composer = host.runtimes["composer"]
        composer.engine.warm()
        assert composer.ready.wait(30), "the composer did not warm the shipped pool"
        yield target, serve_metrics(0, addr="127.0.0.1")
    finally:
        host.stop(1).wait()


# -- the scrape configuration: the chart's, in static form -----------------------------------------

def chart_target_labels() -> dict[str, dict[str, str]]:
    """component -> target labels: composer and extractor as annotation-based scraping labels the
    chart's pods, the registry as the chart's ServiceMonitor labels its Service's endpoints."""
    values = {"metrics": {"serviceMonitor": {"enabled": True}}}
    with helm_python.Chart.load(CHART) as chart:
        rendered = chart.render(values, name="rel", namespace=NAMESPACE)
    objs = load_docs(t for p, t in rendered.items() if p.endswith(".yaml"))
    by_pods = scrape_pods(pod_discovery(objs, NAMESPACE), STOCK_KUBERNETES_PODS["relabel_configs"])
    (sm,) = [o for o in objs if o["kind"] == "ServiceMonitor"]
    by_monitor = service_monitor_targets(sm, [o for o in objs if o["kind"] == "Service"], NAMESPACE)
    labels = {t["app_kubernetes_io_component"]: t for t in by_pods}
    labels["registry"] = next(t for t in by_monitor if t["app_kubernetes_io_component"] == "registry")
    return labels


def prometheus_config(metrics_port: int, dead_port: int, fast_rules: Path) -> dict:
    labels = chart_target_labels()
    registry = dict(labels["registry"])
    registry_job = registry.pop("job")  # the operator names the job after the Service
    dead = dict(labels["composer"], pod=labels["composer"]["pod"] + "-dead")
    live_target = [f"127.0.0.1:{metrics_port}"]
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS), str(fast_rules)],
        "scrape_configs": [
            {"job_name": STOCK_KUBERNETES_PODS["job_name"], "static_configs": [
                {"targets": live_target, "labels": labels["composer"]},
                {"targets": live_target, "labels": labels["extractor"]},
                {"targets": [f"127.0.0.1:{dead_port}"], "labels": dead},
            ]},
            {"job_name": registry_job, "static_configs": [{"targets": live_target, "labels": registry}]},
        ],
    }


def fast_copy_of_the_rules() -> dict:
    """alerts.yaml with every `for:` at 1 s and a `rules: fast-copy` label; expressions untouched."""
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        group["name"] += " (fast copy)"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
            rule["labels"]["rules"] = "fast-copy"
    return rules


class Prometheus:
    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as e:  # a bad query answers 400 with the parser's message
            body = json.load(e)
        return body

    def query(self, expr: str) -> list[dict]:
        """An instant query's result; fails the test when Prometheus refuses the expression."""
        body = self.get("/api/v1/query", query=expr)
        assert body["status"] == "success", f"{expr}: {body.get('error')}"
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None


@pytest.fixture(scope="module")
def prometheus(live, tmp_path_factory):
    binary = require_tool("prometheus", "run .ci/install-deploy-tools.sh as root, or apt-get install prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    fast = tmp / "alerts-fast.yaml"
    fast.write_text(yaml.safe_dump(fast_copy_of_the_rules(), sort_keys=False))
    config = tmp / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(live[1], _free_port(), fast), sort_keys=False))
    port = _free_port()
    log = (tmp / "prometheus.log").open("w")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT)
    server = Prometheus(port)

    def ready() -> bool:
        assert proc.poll() is None, (tmp / "prometheus.log").read_text()
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        wait_for("Prometheus to start", ready)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# -- traffic ---------------------------------------------------------------------------------------

def _in_process(code: str) -> float:
    return REGISTRY.get_sample_value("poe_compose_requests_total", {"grpc_code": code}) or 0.0


def send_traffic(target: str, prom: Prometheus) -> None:
    """ComposeModel calls, successful and failing, then wait until Prometheus has scraped them all."""
    from poe.client.composer import Composer
    from poe.client.registry import RegistryClient
    from poe.engine.errors import InvalidArgument

    with Composer(target, retries=0) as composer:
        for classes in OK_CLASS_SETS:
            assert set(composer.compose(classes).header.classes) == set(classes)
        for _ in range(FAILING_REQUESTS):
            with pytest.raises(InvalidArgument):
                composer.compose(["Unicorn"])
    with RegistryClient(target) as reg:
        assert [p.name for p in reg.list_pools()] == ["fashion-mnist"]
    counts = {code: _in_process(code) for code in ("OK", "INVALID_ARGUMENT")}
    composer_pod = f'namespace="{NAMESPACE}",app_kubernetes_io_component="composer",pod!~".*-dead"'
    for code, count in counts.items():
        wait_for(f"the scrape of {count} {code} calls", lambda code=code, count=count: prom.value(
            f'poe_compose_requests_total{{{composer_pod},grpc_code="{code}"}}') == count)


@pytest.fixture(scope="module")
def after_traffic(live, prometheus):
    """Prometheus, once it has seen two rounds of traffic (a counter's first scrape shows no rate yet)."""
    expected_up = {"registry": 1.0, "composer": 1.0, "extractor": 1.0}
    wait_for("every target scraped once", lambda: {
        r["metric"]["app_kubernetes_io_component"]: float(r["value"][1])
        for r in prometheus.query(f'up{{namespace="{NAMESPACE}",pod!~".*-dead"}}')} == expected_up)
    for _ in range(2):
        send_traffic(live[0], prometheus)
    return prometheus


# -- the checks ------------------------------------------------------------------------------------

def test_every_dashboard_query_returns_series(after_traffic):
    prom = after_traffic
    queries = {}
    for panel in dashboard()["panels"]:
        for t in panel.get("targets", []):
            queries[f"{panel['title']} / {t['refId']}"] = fill_dashboard_variables(
                t["expr"], namespace=NAMESPACE, rate_interval=RATE_WINDOW)
    assert len(queries) > 30
    empty = {name: expr for name, expr in queries.items() if not prom.query(expr)}
    unexplained = {name: expr for name, expr in empty.items() if not metric_names_in(expr) & set(NEEDS_OTHER_TRAFFIC)}
    assert unexplained == {}
    # The namespace variable really narrows: another namespace shows nothing.
    first = next(p for p in dashboard()["panels"] if p.get("targets"))
    other = fill_dashboard_variables(first["targets"][0]["expr"], namespace="elsewhere")
    assert "elsewhere" in other and prom.query(other) == []


def test_dashboard_variables_list_the_poe_pods(after_traffic):
    def values(label: str, match: str) -> list[str]:
        body = after_traffic.get(f"/api/v1/label/{label}/values", **{"match[]": match})
        assert body["status"] == "success", body
        return body["data"]

    namespaces = values("namespace", "poe_build_info")
    assert namespaces == [NAMESPACE]
    pods = values("pod", f'poe_build_info{{namespace=~"{NAMESPACE}"}}')
    assert len(pods) == 3 and not any(p.endswith("-dead") for p in pods)


def test_every_alert_expression_evaluates(after_traffic):
    prom = after_traffic
    by_name = {r["alert"]: r["expr"] for r in alert_rules()}
    assert set(by_name) == ALERTS_WITH_DATA | set(RELAXED)
    for alert in ALERTS_WITH_DATA:
        assert prom.query(by_name[alert]), alert
    for alert, (shipped, relaxed, at_least) in RELAXED.items():
        prom.query(by_name[alert])  # parses and evaluates
        assert shipped in by_name[alert], alert
        result = prom.query(by_name[alert].replace(shipped, relaxed))
        assert len(result) >= at_least, (alert, result)
    # The error ratios name what failed: the composer, in this namespace.
    ratios = [r["metric"] for r in prom.query(by_name["PoeGrpcErrorRatioHigh"])]
    assert {"namespace": NAMESPACE, "grpc_service": "poe.v1.Composer"} in ratios
    (down,) = prom.query(by_name["PoeServiceDown"])
    assert down["metric"]["pod"].endswith("-dead") and down["metric"]["job"] == "kubernetes-pods"


def test_rules_load_healthy_and_alerts_fire(after_traffic):
    prom = after_traffic
    shipped_groups = [g["name"] for g in yaml.safe_load(ALERTS.read_text())["groups"]]

    def evaluated_groups() -> list[dict] | None:
        groups = prom.get("/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return groups if rules and all(r["health"] != "unknown" for r in rules) else None

    groups = wait_for("every rule evaluated", evaluated_groups)
    assert sorted(g["name"] for g in groups) == sorted(shipped_groups + [f"{n} (fast copy)" for n in shipped_groups])
    for g in groups:
        assert str(ALERTS) in g["file"] or g["name"].endswith("(fast copy)")
        for r in g["rules"]:
            assert (r["health"], r.get("lastError", "")) == ("ok", ""), r

    def states() -> dict[tuple[str, str], dict]:
        alerts = prom.get("/api/v1/alerts")["data"]["alerts"]
        return {(a["labels"]["alertname"], a["labels"].get("rules", "shipped")): a for a in alerts}

    must_fire = {"PoeComposeErrorRatioHigh", "PoeGrpcErrorRatioHigh", "PoeServiceDown"}
    firing = wait_for("the fast copies to fire", lambda: (lambda s: s if all(
        s.get((name, "fast-copy"), {}).get("state") == "firing" for name in must_fire) else None)(states()))
    compose = firing[("PoeComposeErrorRatioHigh", "fast-copy")]
    assert compose["labels"]["namespace"] == NAMESPACE
    assert compose["annotations"]["runbook_url"].startswith("https://")
    assert "{{" not in compose["annotations"]["summary"] + compose["annotations"]["description"]
    # The shipped rules see the same condition, pending for their full `for:`.
    for name in must_fire:
        assert firing[(name, "shipped")]["state"] == "pending", name
    # Nothing fires that should not.
    quiet = {"PoeServiceAbsent", "PoeComposerPoolDegraded", "PoeExtractionJobsFailing"}
    assert not {name for name, _ in firing} & quiet
