"""The kustomize base, overlays and components (deploy/k8s), built with `kubectl kustomize`
(offline) and held to the same checks as the Helm chart; the base must not drift from the chart's
defaults."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import subprocess

import helm_python
import pytest
from deploy_paths import CHART, KUSTOMIZE
from k8s_checks import (
    auth_problems,
    custom_resource_problems,
    load_docs,
    probe_problems,
    reference_problems,
    schema_problems,
    security_problems,
    tls_problems,
)

TARGETS = {"base": KUSTOMIZE / "base", "dev": KUSTOMIZE / "overlays" / "dev", "prod": KUSTOMIZE / "overlays" / "prod",
           "prod-tls": KUSTOMIZE / "overlays" / "prod-tls"}
# Secrets the operator creates (the dev overlay generates its own).
STORAGE_SECRETS = ["poe-postgresql", "poe-minio", "poe-auth"]
EXTERNAL_SECRETS = {"base": STORAGE_SECRETS, "dev": [], "prod": STORAGE_SECRETS,
                    "prod-tls": [*STORAGE_SECRETS, "poe-tls"]}
# The TLS setting of each target: None (plaintext), "server" or "mutual".
TLS = {"base": None, "dev": None, "prod": None, "prod-tls": "mutual"}


@functools.cache
def _built(kubectl: str, target: str) -> str:
    out = subprocess.run([kubectl, "kustomize", str(TARGETS[target])], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def build_with_components(kubectl: str, tmp_path, *components: str) -> list[dict]:
    """The base with some of deploy/k8s/components, as an operator's own overlay would add them."""
    rel = os.path.relpath(KUSTOMIZE, tmp_path)
    listed = "".join(f"  - {rel}/components/{c}\n" for c in components)
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {rel}/base\ncomponents:\n{listed}")
    out = subprocess.run([kubectl, "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return load_docs([out.stdout])


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
def test_health_probes(kubectl, target):
    assert probe_problems(build(kubectl, target)) == []


@pytest.mark.parametrize("target", TARGETS)
def test_tokens_are_required_and_reach_every_service(kubectl, target):
    assert auth_problems(build(kubectl, target), anonymous_role="none") == []


@pytest.mark.parametrize("target", TARGETS)
def test_tls_follows_the_components(kubectl, target):
    objs = build(kubectl, target)
    if TLS[target]:
        assert tls_problems(objs, client_auth=TLS[target] == "mutual") == []
    else:
        assert tls_problems(objs, client_auth=False) != []


def test_tls_component_alone_is_server_tls(kubectl, tmp_path):
    objs = build_with_components(kubectl, tmp_path, "tls")
    assert tls_problems(objs, client_auth=False) == []
    assert probe_problems(objs) == [] and schema_problems(objs) == [] and custom_resource_problems(objs) == []
    assert reference_problems(objs, external_secrets=[*STORAGE_SECRETS, "poe-tls"]) == []
    # Mutual TLS needs the server component: alone it would leave the servers in plaintext.
    assert tls_problems(build_with_components(kubectl, tmp_path, "mtls"), client_auth=True) != []


def test_dev_tokens_match_their_hashes(kubectl):
    (secret,) = [s for n, s in by_name(build(kubectl, "dev"), "Secret").items() if n.startswith("poe-auth-")]
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    entries = {e["id"]: e for e in json.loads(data["tokens.json"])["tokens"]}
    assert entries["dev-service"]["sha256"] == hashlib.sha256(data["service-token"].encode()).hexdigest()
    # The admin token the overlay's comment gives developers.
    comment = (TARGETS["dev"] / "kustomization.yaml").read_text()
    (admin,) = [w.strip("()") for w in comment.split() if w.startswith("poe_dev-admin_")]
    assert entries["dev-admin"] == {**entries["dev-admin"], "role": "admin",
                                    "sha256": hashlib.sha256(admin.encode()).hexdigest()}


@pytest.mark.parametrize("target", TARGETS)
def test_references_resolve(kubectl, target):
    assert reference_problems(build(kubectl, target), external_secrets=EXTERNAL_SECRETS[target]) == []


def test_overlays(kubectl):
    dev, prod = build(kubectl, "dev"), build(kubectl, "prod")
    assert {o["metadata"].get("namespace") for o in dev} == {"poe-dev"}
    assert {o["metadata"].get("namespace") for o in prod} == {"poe"}
    # dev: generated throwaway credentials, in-cluster dependencies, no claim for the extractor.
    assert {n.rsplit("-", 1)[0] for n in by_name(dev, "Secret")} == {"poe-postgresql", "poe-minio", "poe-auth"}
    assert set(by_name(dev, "StatefulSet")) == {"postgresql", "minio"}
    assert "PersistentVolumeClaim" not in {o["kind"] for o in dev}
    dev_composer = container(by_name(dev, "Deployment")["poe-composer"], "composer")
    assert dev_composer["image"] == "poe:dev"
    env = {e["name"]: e.get("value") for e in dev_composer["env"]}
    assert (env["POE_CACHE_BYTES"], env["OMP_NUM_THREADS"]) == ("134217728", "1")
    assert {"POE_SHUTDOWN_DRAIN", "POE_TOKENS_FILE", "POE_SERVICE_TOKEN"} <= set(env)  # only the two values changed
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
        assert set(by_name(build(kubectl, "base"), kind)) == set(by_name(chart_objs, kind)), kind
