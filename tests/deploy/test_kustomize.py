"""The kustomize base and overlays (deploy/k8s), built with `kubectl kustomize` (offline) and held
to the same checks as the Helm chart; the base must not drift from the chart's defaults."""

from __future__ import annotations

import functools
import subprocess

import helm_python
import pytest
from deploy_paths import CHART, KUSTOMIZE
from k8s_checks import (
    load_docs,
    probe_problems,
    reference_problems,
    schema_problems,
    security_problems,
)

TARGETS = {"base": KUSTOMIZE / "base", "dev": KUSTOMIZE / "overlays" / "dev", "prod": KUSTOMIZE / "overlays" / "prod"}
# Secrets the operator creates (the dev overlay generates its own).
EXTERNAL_SECRETS = {"base": ["poe-postgresql", "poe-minio"], "dev": [], "prod": ["poe-postgresql", "poe-minio"]}


@functools.cache
def _built(kubectl: str, target: str) -> str:
    out = subprocess.run([kubectl, "kustomize", str(TARGETS[target])], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def build(kubectl: str, target: str) -> list[dict]:
    return load_docs([_built(kubectl, target)])


def by_name(objs, kind):
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def container(obj, name):
    (c,) = [c for c in obj["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


@pytest.mark.parametrize("target", TARGETS)
def test_valid_kubernetes_1_30(kubectl, target):
    objs = build(kubectl, target)
    assert len(objs) >= 15
    assert schema_problems(objs) == []


@pytest.mark.parametrize("target", TARGETS)
def test_pods_are_unprivileged_with_resources(kubectl, target):
    assert security_problems(build(kubectl, target)) == []


@pytest.mark.parametrize("target", TARGETS)
def test_native_grpc_probes(kubectl, target):
    assert probe_problems(build(kubectl, target)) == []


@pytest.mark.parametrize("target", TARGETS)
def test_references_resolve(kubectl, target):
    assert reference_problems(build(kubectl, target), external_secrets=EXTERNAL_SECRETS[target]) == []


def test_overlays(kubectl):
    dev, prod = build(kubectl, "dev"), build(kubectl, "prod")
    assert {o["metadata"].get("namespace") for o in dev} == {"poe-dev"}
    assert {o["metadata"].get("namespace") for o in prod} == {"poe"}
    # dev: generated throwaway credentials, in-cluster dependencies, no claim for the extractor.
    assert {n.rsplit("-", 1)[0] for n in by_name(dev, "Secret")} == {"poe-postgresql", "poe-minio"}
    assert set(by_name(dev, "StatefulSet")) == {"postgresql", "minio"}
    assert "PersistentVolumeClaim" not in {o["kind"] for o in dev}
    assert container(by_name(dev, "Deployment")["poe-composer"], "composer")["image"] == "poe:dev"
    (dev_cm,) = by_name(dev, "ConfigMap").values()
    assert dev_cm["data"]["POE_LOG_LEVEL"] == "DEBUG"
    # prod: no Secret in the manifests, pinned image, external endpoints, closed composer.
    assert "Secret" not in {o["kind"] for o in prod}
    assert container(by_name(prod, "Deployment")["poe-composer"], "composer")["image"] == \
        "registry.example.com/poe/poe:0.1.0"
    (prod_cm,) = by_name(prod, "ConfigMap").values()
    assert prod_cm["data"]["POE_DATABASE_QUERY"] == "?sslmode=require"
    assert prod_cm["data"]["POE_S3_SECURE"] == "true"
    hpa = by_name(prod, "HorizontalPodAutoscaler")["poe-composer"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 20)
    assert by_name(prod, "Deployment")["poe-registry"]["spec"]["replicas"] == 3
    ingress = by_name(prod, "NetworkPolicy")["poe-composer"]["spec"]["ingress"][0]
    assert {"namespaceSelector": {"matchLabels": {"poe-client": "true"}}} in ingress["from"]


def _pod_shape(deploy: dict) -> dict:
    spec = deploy["spec"]["template"]["spec"]
    shape = {"pod": spec["securityContext"], "grace": spec.get("terminationGracePeriodSeconds"),
             "init": [c["name"] for c in spec.get("initContainers", [])]}
    for c in spec["containers"]:
        shape[c["name"]] = {k: c.get(k) for k in ("command", "args", "ports", "startupProbe", "livenessProbe",
                                                   "readinessProbe", "resources", "securityContext")}
        env = c.get("env", [])
        shape[c["name"]]["env"] = sorted(e["name"] for e in env if not e["name"].startswith("POE_DATABASE"))
    return shape


def test_base_matches_the_chart_defaults(kubectl):
    """Same Deployments, commands, probes, resources and security in both ways to deploy."""
    base = by_name(build(kubectl, "base"), "Deployment")
    with helm_python.Chart.load(CHART) as chart:
        rendered = chart.render({}, name="poe", namespace="poe")
    chart_objs = load_docs(t for p, t in rendered.items() if p.endswith(".yaml"))
    helm = by_name(chart_objs, "Deployment")
    assert set(base) == set(helm)
    for name in base:
        assert _pod_shape(base[name]) == _pod_shape(helm[name]), name
    helm_cm = set(by_name(chart_objs, "ConfigMap")["poe-config"]["data"])
    (base_cm,) = by_name(build(kubectl, "base"), "ConfigMap").values()
    assert helm_cm <= set(base_cm["data"])
    for kind in ("HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "Service"):
        helm_names = set(by_name(chart_objs, kind)) - {"poe-composer-headless"}
        assert set(by_name(build(kubectl, "base"), kind)) == helm_names, kind
