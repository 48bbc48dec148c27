"""Prometheus' target relabelling, enough to check the scrape configurations the deployment ships
(deploy/prometheus/prometheus.yml, the chart's ServiceMonitor) and the annotation-based one most
Prometheus installations already have, against the labels of the rendered objects; and whether the
resulting targets are the ones the alert rules' `up{...}` selectors find.

Debian's Prometheus is built without Kubernetes discovery, so these checks cannot run the real
relabelling; tests/deploy/test_real_prometheus.py gives a real Prometheus the labels computed here
as static target labels.
"""

from __future__ import annotations

import re

from deploy_paths import alert_rules
from promql import metric_names_in

POE_SERVICES = ("registry", "composer", "extractor")

# The `kubernetes-pods` job of the prometheus-community/prometheus Helm chart (its default
# configuration; its prometheus.io/port and /path handling left out), which scrapes every pod with
# the prometheus.io/scrape annotation and copies all pod labels to target labels.
STOCK_KUBERNETES_PODS = {
    "job_name": "kubernetes-pods",
    "kubernetes_sd_configs": [{"role": "pod"}],
    "relabel_configs": [
        {"source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"], "action": "keep",
         "regex": "true"},
        {"action": "labelmap", "regex": "__meta_kubernetes_pod_label_(.+)"},
        {"source_labels": ["__meta_kubernetes_namespace"], "action": "replace", "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "action": "replace", "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "Pending|Succeeded|Failed|Completed",
         "action": "drop"},
    ],
}


def meta_name(label: str) -> str:
    """A Kubernetes label as Prometheus' discovery names it: every invalid character becomes `_`."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def relabel(labels: dict[str, str], configs: list[dict]) -> dict[str, str] | None:
    """The target's labels after `configs` (Prometheus' snake_case keys), without the `__` ones; None
    when the target is dropped. Regexes are anchored, as in Prometheus."""
    labels = dict(labels)
    for c in configs:
        action = c.get("action", "replace")
        regex = c.get("regex", "(.*)")
        if action == "labelmap":
            replacement = c.get("replacement", "$1")
            for name, value in list(labels.items()):
                m = re.fullmatch(regex, name)
                if m:
                    labels[_expand(m, replacement)] = value
            continue
        value = c.get("separator", ";").join(labels.get(s, "") for s in c.get("source_labels", []))
        m = re.fullmatch(regex, value)
        if action == "keep":
            if not m:
                return None
        elif action == "drop":
            if m:
                return None
        elif action == "replace":
            if m:
                new = _expand(m, c.get("replacement", "$1"))
                if new:
                    labels[c["target_label"]] = new
                else:
                    labels.pop(c["target_label"], None)
        else:
            raise AssertionError(f"relabel action {action} not simulated")
    return {k: v for k, v in labels.items() if not k.startswith("__")}


def from_service_monitor(relabelings: list[dict]) -> list[dict]:
    """A ServiceMonitor endpoint's relabelings (camelCase keys) in Prometheus' own spelling."""
    keys = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    return [{keys.get(k, k): v for k, v in r.items()} for r in relabelings]


def _expand(m: re.Match, replacement: str) -> str:
    # Prometheus writes groups as $1 or ${1}.
    return re.sub(r"\$\{?(\w+)\}?", lambda g: m.group(int(g[1]) if g[1].isdigit() else g[1]) or "", replacement)


# -- targets, as discovery and relabelling make them of rendered objects ---------------------------

def pod_discovery(objs: list[dict], namespace: str = "poe") -> list[dict[str, str]]:
    """What Kubernetes pod discovery says of each container port of every rendered pod."""
    targets = []
    for o in objs:
        if o["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        meta = o["spec"]["template"]["metadata"]
        for c in o["spec"]["template"]["spec"]["containers"]:
            for p in c.get("ports", []) or [{}]:
                labels = {f"__meta_kubernetes_pod_label_{meta_name(k)}": v for k, v in meta["labels"].items()}
                labels |= {f"__meta_kubernetes_pod_annotation_{meta_name(k)}": v
                           for k, v in (meta.get("annotations") or {}).items()}
                labels |= {"__meta_kubernetes_namespace": namespace, "__meta_kubernetes_pod_phase": "Running",
                           "__meta_kubernetes_pod_name": o["metadata"]["name"] + "-x",
                           "__meta_kubernetes_pod_container_port_name": p.get("name", "")}
                targets.append(labels)
    return targets


def scrape_pods(pods: list[dict[str, str]], relabel_configs: list[dict]) -> list[dict[str, str]]:
    """The targets a pod-discovery scrape job with `relabel_configs` makes of `pods`."""
    targets = [t for t in (relabel(m, relabel_configs) for m in pods) if t is not None]
    # Pod discovery yields one target per container port; the stock job scrapes each pod once
    # (on its prometheus.io/port), so count pods.
    return list({(t["namespace"], t["pod"]): t for t in targets}.values())


def service_monitor_targets(sm: dict, services: list[dict], namespace: str) -> list[dict[str, str]]:
    """What the operator's Prometheus makes of every Service the ServiceMonitor selects: its own
    labels (job = the Service's name, namespace, service, pod, endpoint), then our relabelings."""
    (ep,) = sm["spec"]["endpoints"]
    targets = []
    for svc in services:
        if ep["port"] not in {p["name"] for p in svc["spec"]["ports"]}:
            continue
        name = svc["metadata"]["name"]
        meta = {f"__meta_kubernetes_service_label_{meta_name(k)}": v for k, v in svc["metadata"]["labels"].items()}
        meta |= {"__meta_kubernetes_namespace": namespace, "__meta_kubernetes_service_name": name,
                 "__meta_kubernetes_pod_name": f"{name}-abc12"}
        operator = {**meta, "job": name, "namespace": namespace, "service": name, "pod": f"{name}-abc12",
                    "endpoint": ep["port"]}
        target = relabel(operator, from_service_monitor(ep["relabelings"]))
        assert target is not None
        targets.append(target)
    return targets


# -- what the alert rules select on ----------------------------------------------------------------

def matches(selector: str, labels: dict[str, str]) -> bool:
    """Whether `labels` satisfy the matchers of one `{...}` selector."""
    for name, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', selector):
        have = labels.get(name, "")
        ok = {"=": have == value, "!=": have != value, "=~": re.fullmatch(value, have) is not None,
              "!~": re.fullmatch(value, have) is None}[op]
        if not ok:
            return False
    return True


def up_selectors() -> dict[str, list[str]]:
    """alert -> the `up{...}` selectors of its expression."""
    return {r["alert"]: re.findall(r"\bup\{([^}]*)\}", r["expr"])
            for r in alert_rules() if "up" in metric_names_in(r["expr"])}


def assert_rules_find_every_service(targets: list[dict[str, str]], namespace: str = "poe") -> None:
    """Each PoE service has a target that PoeServiceDown watches and that satisfies the selector
    PoeServiceAbsent has for it; every PoE target has namespace and pod (the dashboard's variables)."""
    selectors = up_selectors()
    (down,) = selectors["PoeServiceDown"]
    watched = [t for t in targets if matches(down, t)]
    assert sorted(t["app_kubernetes_io_component"] for t in watched) == sorted(POE_SERVICES), targets
    for service, selector in zip(POE_SERVICES, selectors["PoeServiceAbsent"], strict=True):
        assert f'"{service}"' in selector
        assert [t for t in watched if matches(selector, t)], service
    assert all(t.get("namespace") == namespace and t.get("pod") for t in watched)
