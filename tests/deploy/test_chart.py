"""The Helm chart (deploy/helm/poe), rendered and linted offline with helm-python-sdk (Helm's own
Go SDK, no helm binary and no cluster), every object validated against the Kubernetes 1.30 schemas
(kubernetes-validate, strict), and the behaviour of the values checked on the rendered objects."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
from pathlib import Path

import helm_python
import pytest
import yaml
from deploy_paths import CHART, PROMETHEUS
from k8s_checks import (
    HEALTH_PROBE,
    auth_problems,
    custom_resource_problems,
    load_docs,
    probe_problems,
    reference_problems,
    schema_problems,
    security_problems,
    tls_problems,
    validate_strict,
)

CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
CASES = [p.name.removesuffix("-values.yaml") for p in CI_VALUES]
RELEASE, NAMESPACE = "poe", "poe-test"


def test_ci_values_cover_the_features():
    assert {"default", "dev", "prod", "in-cluster-deps", "monitoring", "maintenance", "tls", "extensions"} <= set(CASES)


@functools.cache
def _chart() -> helm_python.Chart:
    return helm_python.Chart.load(CHART)


def values_of(case: str) -> dict:
    return yaml.safe_load((CHART / "ci" / f"{case}-values.yaml").read_text()) or {}


def render(values: dict, name: str = RELEASE, namespace: str = NAMESPACE) -> dict[str, str]:
    return _chart().render(values, name=name, namespace=namespace)


@functools.cache
def _rendered_case(case: str) -> tuple[str, ...]:
    out = render(values_of(case))
    return tuple(text for path, text in sorted(out.items()) if path.endswith(".yaml"))


def objects(case: str) -> list[dict]:
    return load_docs(_rendered_case(case))


def merged(case: str) -> dict:
    return _chart().merge_values(values_of(case))


# What the extension points of ci/extensions-values.yaml refer to (the operator's objects).
EXTENSION_REFERENCES = {"external_secrets": ["egress-proxy"], "external_claims": ["poe-oracles"],
                        "external_configmaps": ["poe-oracle-index"]}


def externals(case: str) -> dict:
    """Names the operator supplies, by the case's values."""
    v = merged(case)
    secrets = [s for s in (v["database"]["auth"]["existingSecret"], v["objectStore"]["auth"]["existingSecret"],
                           v["auth"]["existingSecret"], v["tls"]["existingSecret"]) if s]
    claims = [v["extractor"]["persistence"]["existingClaim"]] if v["extractor"]["persistence"]["existingClaim"] else []
    accounts = [] if v["serviceAccount"]["create"] else [v["serviceAccount"]["name"] or "default"]
    found = {"external_secrets": secrets, "external_claims": claims, "external_accounts": accounts,
             "external_configmaps": []}
    if case == "extensions":
        for key, names in EXTENSION_REFERENCES.items():
            found[key] = found[key] + names
    return found


def by_name(objs: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def container(obj: dict, name: str) -> dict:
    (c,) = [c for c in obj["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


# -- every values file ----------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_lint_is_clean(case):
    report = helm_python.lint(CHART, values_of(case), strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []  # no warnings, no errors
    assert report["total_charts_linted"] == 1


@pytest.mark.parametrize("case", CASES)
def test_objects_are_valid_kubernetes_1_30(case):
    objs = objects(case)
    assert len(objs) >= 10
    assert schema_problems(objs) == []
    assert custom_resource_problems(objs) == []


@pytest.mark.parametrize("case", CASES)
def test_pods_are_unprivileged_with_resources(case):
    assert security_problems(objects(case)) == []


@pytest.mark.parametrize("case", CASES)
def test_native_grpc_probes(case):
    assert probe_problems(objects(case)) == []


@pytest.mark.parametrize("case", CASES)
def test_references_resolve(case):
    assert reference_problems(objects(case), **externals(case)) == []


@pytest.mark.parametrize("case", CASES)
def test_tokens_are_required_and_reach_every_service(case):
    assert auth_problems(objects(case), anonymous_role=merged(case)["auth"]["anonymousRole"]) == []


@pytest.mark.parametrize("case", CASES)
def test_tls_is_wired_when_enabled(case):
    v = merged(case)
    objs = objects(case)
    if v["tls"]["enabled"]:
        assert tls_problems(objs, client_auth=v["tls"]["clientAuth"]) == []
    else:
        assert tls_problems(objs, client_auth=False) != []  # the check sees that TLS is off
        assert not any(e["name"].startswith("POE_TLS_") for o in objs if o["kind"] == "Deployment"
                       for c in o["spec"]["template"]["spec"]["containers"] for e in c.get("env", []))


@pytest.mark.parametrize("case", CASES)
def test_names_are_namespaced_and_labelled(case):
    for obj in objects(case):
        meta = obj["metadata"]
        if obj["kind"] in ("ServiceMonitor", "PrometheusRule"):
            continue  # may live in the monitoring namespace
        assert meta.get("namespace") == NAMESPACE, obj["kind"]
        assert meta["labels"]["app.kubernetes.io/instance"] == RELEASE
        assert meta["labels"]["app.kubernetes.io/part-of"] == "poe"
        assert len(meta["name"]) <= 63


def test_the_validator_is_not_vacuous():
    (deploy,) = [o for o in objects("default") if o["kind"] == "Deployment" and o["metadata"]["name"] == "poe-composer"]
    assert validate_strict(deploy) is None
    typo = json.loads(json.dumps(deploy))
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    assert "imagePullPolice" in (validate_strict(typo) or "")
    wrong = json.loads(json.dumps(deploy))
    wrong["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"] = "grpc"
    assert validate_strict(wrong) is not None  # GRPCAction.port is an integer, never a name
    assert security_problems([_without_drop_all(deploy)]) != []


def _without_drop_all(deploy: dict) -> dict:
    d = json.loads(json.dumps(deploy))
    d["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"] = {}
    return d


# -- what the values do ---------------------------------------------------------------------------

def test_default_is_production_shaped():
    objs = objects("default")
    kinds = sorted({o["kind"] for o in objs})
    assert kinds == sorted(["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Job", "NetworkPolicy",
                            "PersistentVolumeClaim", "PodDisruptionBudget", "Pod", "Secret", "Service",
                            "ServiceAccount"])
    # Storage credentials only by reference; the one Secret is the generated service token.
    assert set(by_name(objs, "Secret")) == {"poe-auth"}
    assert set(by_name(objs, "Pod")) == {"poe-test"}  # the `helm test` hook
    deployments = by_name(objs, "Deployment")
    assert set(deployments) == {"poe-registry", "poe-composer", "poe-extractor"}
    assert "replicas" not in deployments["poe-composer"]["spec"]  # the HPA owns it
    assert deployments["poe-extractor"]["spec"]["strategy"]["type"] == "Recreate"

    cm = by_name(objs, "ConfigMap")["poe-config"]["data"]
    assert cm["POE_REGISTRY_ADDR"] == "poe-registry:50051"
    assert cm["POE_BLOB_URL"] == "s3://poe"
    assert cm["POE_S3_ENDPOINT"] == "minio:9000"
    assert not any("PASSWORD" in k or "SECRET" in k or "ACCESS_KEY" in k for k in cm)

    reg = env_of(container(deployments["poe-registry"], "registry"))
    assert reg["POE_DATABASE_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "poe-postgresql", "key": "password"}
    assert reg["POE_DATABASE_URL"]["value"] == (
        "postgresql+psycopg://$(POE_DATABASE_USERNAME):$(POE_DATABASE_PASSWORD)@postgresql:5432/poe")
    assert reg["POE_S3_SECRET_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "poe-minio", "key": "secret-key"}
    # Only the registry (and its migration) hold storage credentials.
    for name in ("composer", "extractor"):
        env = env_of(container(deployments[f"poe-{name}"], name))
        assert not any(k.startswith(("POE_DATABASE", "POE_S3_ACCESS", "POE_S3_SECRET")) for k in env), name
    assert env_of(container(deployments["poe-composer"], "composer"))["POE_CACHE_BYTES"]["value"] == "536870912"

    job = by_name(objs, "Job")["poe-migrate"]
    ann = job["metadata"]["annotations"]
    assert ann["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "hook-succeeded" in ann["helm.sh/hook-delete-policy"]
    mig = container(job, "migrate")
    assert mig["command"] + mig["args"] == ["poe", "registry", "migrate"]
    assert "serviceAccountName" not in job["spec"]["template"]["spec"]  # the chart's SA is not there yet
    assert "envFrom" not in mig  # nor is the ConfigMap

    hpa = by_name(objs, "HorizontalPodAutoscaler")["poe-composer"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 10)
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    assert set(by_name(objs, "PodDisruptionBudget")) == {"poe-registry", "poe-composer"}
    assert set(by_name(objs, "NetworkPolicy")) == {"poe-registry", "poe-composer", "poe-extractor", "poe-migrate"}


def _grpc_ingress_from(objs, name):
    rules = by_name(objs, "NetworkPolicy")[name]["spec"]["ingress"]
    (grpc,) = [r for r in rules if r["ports"][0]["port"] == "grpc"]
    return grpc.get("from")


def test_network_policy_opens_the_registry_only_to_the_release():
    objs = objects("default")
    assert _grpc_ingress_from(objs, "poe-composer") is None  # allowExternal: anyone may compose
    peers = _grpc_ingress_from(objs, "poe-registry")
    assert {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "poe", "app.kubernetes.io/instance": "poe"}}} \
        in peers
    prod = objects("prod")
    peers = _grpc_ingress_from(prod, "poe-composer")
    assert {"namespaceSelector": {"matchLabels": {"poe-client": "true"}}} in peers
    egress = by_name(prod, "NetworkPolicy")["poe-registry"]["spec"]["egress"]
    assert {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
            "ports": [{"port": 5432, "protocol": "TCP"}, {"port": 443, "protocol": "TCP"}]} in egress
    assert any(p.get("port") == 53 for rule in egress for p in rule.get("ports", []))


def test_in_cluster_dependencies_for_a_trial():
    objs = objects("in-cluster-deps")
    sts = by_name(objs, "StatefulSet")
    assert set(sts) == {"poe-postgresql", "poe-minio"}
    cm = by_name(objs, "ConfigMap")["poe-config"]["data"]
    assert cm["POE_S3_ENDPOINT"] == "poe-minio:9000"
    assert set(by_name(objs, "Service")) >= {"poe-postgresql", "poe-minio"}
    reg = env_of(container(by_name(objs, "Deployment")["poe-registry"], "registry"))
    assert "@poe-postgresql:5432/poe" in reg["POE_DATABASE_URL"]["value"]
    secrets = by_name(objs, "Secret")
    # The token Secret is an ordinary object: nothing that runs as a hook needs it.
    assert "annotations" not in secrets.pop("poe-auth")["metadata"]
    assert set(secrets) == {"poe-database", "poe-object-store"}
    assert secrets["poe-database"]["stringData"] == {"username": "poe", "password": "trial-password"}
    # The database exists only after the install: the migration runs post-install there, and the
    # chart-made Secrets are hooks that come before it.
    job_ann = by_name(objs, "Job")["poe-migrate"]["metadata"]["annotations"]
    assert job_ann["helm.sh/hook"] == "post-install,pre-upgrade"
    for s in secrets.values():
        assert "pre-install" in s["metadata"]["annotations"]["helm.sh/hook"]
        assert int(s["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(job_ann["helm.sh/hook-weight"])
    pg = env_of(container(sts["poe-postgresql"], "postgresql"))
    assert pg["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "poe-database"
    minio = env_of(container(sts["poe-minio"], "minio"))  # MinIO's stand-in for an incomplete-upload lifecycle rule
    assert minio["MINIO_API_STALE_UPLOADS_EXPIRY"]["value"] == "24h"
    assert minio["MINIO_API_STALE_UPLOADS_CLEANUP_INTERVAL"]["value"] == "6h"
    assert set(by_name(objs, "NetworkPolicy")) >= {"poe-postgresql", "poe-minio"}
    # With egress restricted, the registry may still reach both.
    egress = by_name(objs, "NetworkPolicy")["poe-registry"]["spec"]["egress"]
    assert {5432, 9000} <= {p["port"] for rule in egress for p in rule.get("ports", [])}


def test_prod_values():
    objs = objects("prod")
    deployments = by_name(objs, "Deployment")
    image = container(deployments["poe-composer"], "composer")["image"]
    assert image == "registry.example.com/poe/poe:0.1.0"
    reg = env_of(container(deployments["poe-registry"], "registry"))
    assert reg["POE_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "poe-postgresql", "key": "database-url"}
    assert "POE_DATABASE_PASSWORD" not in reg
    cm = by_name(objs, "ConfigMap")["poe-config"]["data"]
    assert cm["POE_BLOB_URL"] == "s3://poe-prod/registry"
    assert cm["POE_S3_SECURE"] == "true"
    assert by_name(objs, "PodDisruptionBudget")["poe-composer"]["spec"] == {
        "minAvailable": "50%",
        "selector": {"matchLabels": {"app.kubernetes.io/name": "poe", "app.kubernetes.io/instance": "poe",
                                     "app.kubernetes.io/component": "composer"}}}
    assert deployments["poe-registry"]["spec"]["replicas"] == 3
    assert by_name(objs, "ServiceMonitor") and by_name(objs, "PrometheusRule")
    for d in deployments.values():
        assert d["spec"]["template"]["metadata"]["labels"]["team"] == "ml-platform"


def test_dev_values_run_small():
    objs = objects("dev")
    assert "HorizontalPodAutoscaler" not in {o["kind"] for o in objs}
    assert by_name(objs, "Deployment")["poe-composer"]["spec"]["replicas"] == 1
    assert by_name(objs, "ConfigMap")["poe-config"]["data"]["POE_LOG_LEVEL"] == "DEBUG"
    assert "PersistentVolumeClaim" not in {o["kind"] for o in objs}


def test_fixed_replicas_values():
    objs = objects("fixed-replicas")
    kinds = {o["kind"] for o in objs}
    assert "HorizontalPodAutoscaler" not in kinds and "NetworkPolicy" not in kinds and "Job" not in kinds
    assert by_name(objs, "Deployment")["poe-composer"]["spec"]["replicas"] == 4
    assert "poe-composer-headless" not in by_name(objs, "Service")
    assert by_name(objs, "Service")["poe-composer"]["spec"]["type"] == "LoadBalancer"
    ext = by_name(objs, "Deployment")["poe-extractor"]["spec"]["template"]["spec"]
    assert {"name": "home", "persistentVolumeClaim": {"claimName": "poe-runs"}} in ext["volumes"]
    assert ext["serviceAccountName"] == "poe-runner"
    assert "initContainers" not in by_name(objs, "Deployment")["poe-registry"]["spec"]["template"]["spec"]


def test_monitoring_objects_are_switched():
    assert not any(o["kind"] in ("ServiceMonitor", "PrometheusRule") for o in objects("default"))
    objs = objects("monitoring")
    (sm,) = by_name(objs, "ServiceMonitor").values()
    assert sm["metadata"]["namespace"] == "monitoring"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] == "metrics" and ep["interval"] == "15s"
    # The target labels the alert rules select on (test_chart_monitoring.py checks them in full).
    assert {"sourceLabels": ["__meta_kubernetes_service_label_app_kubernetes_io_component"],
            "targetLabel": "app_kubernetes_io_component"} in ep["relabelings"]
    # The headless Service has no metrics port, so it is not scraped twice.
    headless = by_name(objs, "Service")["poe-composer-headless"]
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]
    pod_ann = by_name(objs, "Deployment")["poe-composer"]["spec"]["template"]["metadata"]["annotations"]
    assert "prometheus.io/scrape" not in pod_ann


def test_prometheus_rule_carries_the_alerts_file_verbatim():
    source = yaml.safe_load((PROMETHEUS / "alerts.yaml").read_text())
    (rule,) = by_name(objects("monitoring"), "PrometheusRule").values()
    assert rule["spec"]["groups"] == source["groups"]
    assert rule["metadata"]["namespace"] == "monitoring"
    # One source: the chart's copy is a link to deploy/prometheus/alerts.yaml (or, where links are
    # not kept, byte-identical to it).
    linked = CHART / "files" / "alerts.yaml"
    assert linked.resolve() == (PROMETHEUS / "alerts.yaml").resolve() or \
        linked.read_bytes() == (PROMETHEUS / "alerts.yaml").read_bytes()


def test_registry_maintenance_cronjob():
    assert not any(o["kind"] == "CronJob" for o in objects("default"))  # off by default
    objs = objects("maintenance")
    cron = by_name(objs, "CronJob")["poe-maintenance"]
    assert (cron["spec"]["schedule"], cron["spec"]["concurrencyPolicy"]) == ("15 4 * * 0", "Forbid")
    job = cron["spec"]["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    assert job["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    # gc first (init container), then fsck, each on the registry's storage settings.
    (gc,), (fsck,) = pod["initContainers"], pod["containers"]
    assert gc["command"] + gc["args"] == ["poe", "registry", "gc", "--apply", "--older-than", "2h"]
    assert fsck["command"] + fsck["args"] == ["poe", "registry", "fsck", "--json"]
    for c in (gc, fsck):
        env = env_of(c)
        assert "@poe-postgresql:5432/poe" in env["POE_DATABASE_URL"]["value"]
        assert env["POE_S3_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "poe-object-store"
        assert c["envFrom"] == [{"configMapRef": {"name": "poe-config"}}]  # POE_BLOB_URL, POE_S3_ENDPOINT
    policies = by_name(objs, "NetworkPolicy")
    assert policies["poe-maintenance"]["spec"]["ingress"] == []
    assert {5432, 9000} <= {p["port"] for rule in policies["poe-maintenance"]["spec"]["egress"]
                            for p in rule.get("ports", [])}
    for dependency in ("poe-postgresql", "poe-minio"):
        peers = policies[dependency]["spec"]["ingress"][0]["from"]
        assert any(p["podSelector"]["matchLabels"].get("app.kubernetes.io/component") == "maintenance" for p in peers)

    only_fsck = load_docs(t for p, t in render({"registry": {"maintenance": {
        "enabled": True, "gc": {"enabled": False, "args": []}}}}).items() if p.endswith(".yaml"))
    pod = by_name(only_fsck, "CronJob")["poe-maintenance"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert "initContainers" not in pod and [c["name"] for c in pod["containers"]] == ["fsck"]
    with pytest.raises(helm_python.HelmError, match="registry.maintenance.gc.enabled or"):
        render({"registry": {"maintenance": {"enabled": True, "gc": {"enabled": False, "args": []},
                                             "fsck": {"enabled": False, "args": []}}}})


def _checksums(values: dict) -> dict[str, dict[str, str]]:
    objs = load_docs(t for p, t in render(values).items() if p.endswith(".yaml"))
    return {n: {k: v for k, v in d["spec"]["template"]["metadata"]["annotations"].items() if k.startswith("checksum/")}
            for n, d in by_name(objs, "Deployment").items()}


def test_checksum_annotations_restart_pods_on_config_or_secret_change():
    own_tokens = {"auth": {"existingSecret": "poe-tokens"}}
    base = _checksums(own_tokens)
    assert base == _checksums(own_tokens)  # stable
    assert set(base["poe-composer"]) == {"checksum/config", "checksum/secret", "checksum/secret-ref", "checksum/auth"}
    other_tokens = _checksums({"auth": {"existingSecret": "other-tokens"}})
    assert all(other_tokens[n]["checksum/auth"] != base[n]["checksum/auth"] for n in base)
    debug = _checksums({**own_tokens, "config": {"logLevel": "DEBUG"}})
    for name in base:
        assert debug[name]["checksum/config"] != base[name]["checksum/config"]
        assert debug[name]["checksum/secret"] == base[name]["checksum/secret"]
    moved = _checksums({**own_tokens, "database": {"auth": {"existingSecret": "other-secret"}}})
    assert all(moved[n]["checksum/secret-ref"] != base[n]["checksum/secret-ref"] for n in base)
    trial = {"database": {"auth": {"existingSecret": "", "password": "a"}}}
    rotated = {"database": {"auth": {"existingSecret": "", "password": "b"}}}
    assert _checksums(trial)["poe-registry"]["checksum/secret"] != \
        _checksums(rotated)["poe-registry"]["checksum/secret"]


@pytest.mark.parametrize(("values", "message"), [
    ({"database": {"auth": {"existingSecret": ""}}}, "database.auth.password"),
    ({"objectStore": {"auth": {"existingSecret": ""}}}, "objectStore.auth"),
    ({"database": {"host": ""}}, "database.host is required"),
    ({"composer": {"resources": {"requests": {"cpu": None}}}}, "composer.resources.requests.cpu"),
    ({"tls": {"enabled": True}}, "tls.enabled needs tls.existingSecret"),
    ({"tls": {"certManager": {"enabled": True, "issuerRef": {"name": "ca"}}}},
     "tls.certManager.enabled needs tls.enabled"),
    ({"tls": {"enabled": True, "certManager": {"enabled": True}}}, "tls.certManager.issuerRef.name is required"),
    ({"tls": {"enabled": True, "existingSecret": "a", "certManager": {"enabled": True, "issuerRef": {"name": "ca"}}}},
     "exclude each other"),
])
def test_incomplete_values_fail_with_a_reason(values, message):
    with pytest.raises(helm_python.HelmError, match=re.escape(message)):
        render(values)


@pytest.mark.parametrize("values", [
    {"composer": {"replicaz": 3}},
    {"composer": {"replicas": "three"}},
    {"config": {"logLevel": "LOUD"}},
    {"image": {"pullPolicy": "Sometimes"}},
    {"objectStore": {"bucket": "Not_A_Bucket"}},
    {"minio": {"staleUploads": {"expiry": "a day", "cleanupInterval": "6h"}}},
    {"ports": {"grpc": 70000}},
    {"auth": {"anonymousRole": "admin"}},  # nobody gets write access without a token
    {"auth": {"existingSecret": "Not_A_Name"}},
    {"tls": {"enabled": "yes"}},
    {"tls": {"certManager": {"enabled": False, "issuerRef": {"name": "ca"}, "duration": "90 days"}}},
    {"global": {"imageRegistry": "mirror example"}},
    {"composer": {"sidecars": [{"name": "no-image"}]}},
    {"registry": {"env": [{"value": "no name"}]}},
    {"extractor": {"extraVolumeMounts": [{"name": "data"}]}},
])
def test_schema_rejects_bad_values(values):
    with pytest.raises(helm_python.HelmValuesError):
        render(values)


def test_every_values_key_is_commented():
    """Each key of values.yaml has a comment line right above it, except inside Kubernetes
    structures that are passed through verbatim (security contexts, resources, probe timings)."""
    verbatim = {"podSecurityContext", "containerSecurityContext", "resources", "startup", "liveness", "readiness"}
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    missing = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z_][\w-]*):", line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [k for _, k in stack] + [key]
        stack.append((indent, key))
        if any(p in verbatim for p in path[:-1]):
            continue
        if not lines[i - 1].strip().startswith("#"):
            missing.append(".".join(path))
    assert missing == []
    # ... and every key is known to the schema (additionalProperties: false at the top).
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(yaml.safe_load((CHART / "values.yaml").read_text())) <= set(schema["properties"])


def test_notes_tell_which_secrets_must_exist():
    notes = render({})["poe/templates/NOTES.txt"]
    assert "poe-postgresql: keys username, password" in notes
    assert "poe-minio: keys access-key, secret-key" in notes
    assert "port-forward svc/poe-composer 50051:50051" in notes


def test_fullname_follows_the_release():
    objs = load_docs(t for p, t in render({}, name="acme").items() if p.endswith(".yaml"))
    assert "acme-poe-composer" in by_name(objs, "Deployment")
    cm = by_name(objs, "ConfigMap")["acme-poe-config"]["data"]
    assert cm["POE_REGISTRY_ADDR"] == "acme-poe-registry:50051"
    assert reference_problems(objs, external_secrets=["poe-postgresql", "poe-minio"]) == []


def test_chart_metadata():
    meta = _chart().metadata
    assert meta["apiVersion"] == "v2" and meta["name"] == "poe"
    pyproject = (Path(CHART).parents[2] / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert meta["appVersion"] == version  # the default image tag is the package version


# -- authentication, TLS, `helm test`, extension points ----------------------------------------------

def _decoded(secret: dict) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_the_generated_service_token_is_known_to_the_token_file_only_by_hash():
    objs = objects("default")
    data = _decoded(by_name(objs, "Secret")["poe-auth"])
    token = data["service-token"]
    assert re.fullmatch(r"poe_service_[A-Za-z0-9]{40}", token)
    (entry,) = json.loads(data["tokens.json"])["tokens"]
    assert entry["sha256"] == hashlib.sha256(token.encode()).hexdigest()
    assert (entry["id"], entry["role"], entry["expires"], entry["revoked"]) == ("service", "service", None, None)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", entry["created"])
    assert token not in data["tokens.json"]
    # One token per render, the same in the Secret and in every pod's checksum (the pods roll when the
    # Secret is replaced). Offline there is nothing to look up, so each render makes a new one.
    checksum = hashlib.sha256(by_name(objs, "Secret")["poe-auth"]["data"]["tokens.json"].encode()).hexdigest()
    for deploy in by_name(objs, "Deployment").values():
        assert deploy["spec"]["template"]["metadata"]["annotations"]["checksum/auth"] == checksum
    again = _decoded(by_name(load_docs(t for p, t in render({}).items() if p.endswith(".yaml")), "Secret")["poe-auth"])
    assert again["service-token"] != token
    # The operator's Secret replaces it.
    assert "Secret" not in {o["kind"] for o in objects("tls")}


def test_the_generated_secret_is_kept_across_upgrades_with_lookup():
    """`lookup` answers only against a cluster; the template must ask for the release's own Secret
    and reuse its data when both keys are there."""
    source = (CHART / "templates" / "_helpers.tpl").read_text()
    define = source[source.index('define "poe.generatedAuth"'):]
    define = define[:define.index("{{- end -}}\n\n")]
    assert 'lookup "v1" "Secret" .Release.Namespace (include "poe.authSecretName" .)' in define
    assert '"tokens.json" (index $existing.data "tokens.json")' in define
    assert '"service-token" (index $existing.data "service-token")' in define


def test_anonymous_callers_get_nothing_by_default():
    cm = by_name(objects("default"), "ConfigMap")["poe-config"]["data"]
    assert cm["POE_ANONYMOUS_ROLE"] == "none"
    reader = by_name(objects("extensions"), "ConfigMap")["poe-config"]["data"]
    assert reader["POE_ANONYMOUS_ROLE"] == "reader"


def test_tls_with_cert_manager_and_mutual_tls():
    objs = objects("tls")
    (cert,) = by_name(objs, "Certificate").values()
    spec = cert["spec"]
    assert spec["secretName"] == "poe-tls"
    assert spec["issuerRef"] == {"name": "poe-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert {"poe-registry", f"poe-composer.{NAMESPACE}.svc", f"poe-extractor.{NAMESPACE}.svc.cluster.local",
            "poe-composer-headless", "poe.example.com"} <= set(spec["dnsNames"])
    assert {"server auth", "client auth"} <= set(spec["usages"])
    composer = container(by_name(objs, "Deployment")["poe-composer"], "composer")
    assert composer["readinessProbe"]["exec"]["command"] == [
        *HEALTH_PROBE, "--addr", "127.0.0.1:50051", "--service", "poe.v1.Composer", "--tls-server-name", "poe-composer"]
    assert all(p["appProtocol"] == "https" for s in by_name(objs, "Service").values() for p in s["spec"]["ports"]
               if s["metadata"]["labels"]["app.kubernetes.io/component"] in ("registry", "composer", "extractor"))
    # Server TLS alone: no client-certificate variables, no client-auth usage.
    server_only = load_docs(t for p, t in render({"tls": {"enabled": True, "certManager": {
        "enabled": True, "issuerRef": {"name": "poe-ca"}}}}).items() if p.endswith(".yaml"))
    assert tls_problems(server_only, client_auth=False) == []
    assert "client auth" not in by_name(server_only, "Certificate")["poe-tls"]["spec"]["usages"]
    # The operator's Secret: no Certificate.
    own = load_docs(t for p, t in render({"tls": {"enabled": True, "existingSecret": "poe-tls"}}).items()
                    if p.endswith(".yaml"))
    assert "Certificate" not in {o["kind"] for o in own} and tls_problems(own, client_auth=False) == []
    assert tls_problems(_replaced(own, _without_tls_mount(by_name(own, "Deployment")["poe-registry"])),
                        client_auth=False) != []


def _without_tls_mount(deploy: dict) -> dict:
    d = json.loads(json.dumps(deploy))
    c = d["spec"]["template"]["spec"]["containers"][0]
    c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != "tls"]
    return d


def _test_pod(values: dict) -> dict:
    objs = load_docs(t for p, t in render(values).items() if p.endswith(".yaml"))
    return by_name(objs, "Pod")["poe-test"]


def test_helm_test_checks_health_and_tokens():
    pod = _test_pod({})
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    (c,) = pod["spec"]["containers"]
    script = c["args"][0]
    for component, service in (("registry", "Registry"), ("composer", "Composer"), ("extractor", "Extractor")):
        assert f"grpc_health_probe.py --addr poe-{component}:50051 --service poe.v1.{service}" in script
    assert 'if [ "$status" -ne 8 ]' in script  # anonymous call refused
    assert 'POE_TOKEN="$SERVICE_TOKEN" poe registry list --target poe-registry:50051' in script
    assert env_of(c)["SERVICE_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "poe-auth", "key": "service-token"}
    assert not any(k.startswith("POE_TLS") for k in env_of(c))
    # Anonymous readers allowed: no refusal to expect. TLS: the script and CLI get the CA and client cert.
    assert "-ne 8" not in _test_pod({"auth": {"anonymousRole": "reader"}})["spec"]["containers"][0]["args"][0]
    tls = _test_pod(values_of("tls"))["spec"]["containers"][0]
    assert {k: v["value"] for k, v in env_of(tls).items() if k.startswith("POE_TLS")} == {
        "POE_TLS_CA": "/etc/poe/tls/ca.crt", "POE_TLS_CERT": "/etc/poe/tls/tls.crt",
        "POE_TLS_KEY": "/etc/poe/tls/tls.key"}


@pytest.mark.parametrize(("registry", "repository", "image"), [
    ("", "poe", "poe:1.0"),
    ("mirror.example.com", "poe", "mirror.example.com/poe:1.0"),
    ("mirror.example.com/", "registry.example.com/poe/poe", "mirror.example.com/poe/poe:1.0"),
    ("mirror.example.com:5000", "localhost/poe", "mirror.example.com:5000/poe:1.0"),
    ("mirror.example.com/hub", "library/poe", "mirror.example.com/hub/library/poe:1.0"),
    ("mirror.example.com", "localhost:5000/team/poe", "mirror.example.com/team/poe:1.0"),
])
def test_global_image_registry(registry, repository, image):
    values = {"global": {"imageRegistry": registry}, "image": {"repository": repository, "tag": "1.0"}}
    objs = load_docs(t for p, t in render(values).items() if p.endswith(".yaml"))
    images = {c["image"] for o in objs if o["kind"] in ("Deployment", "Job", "Pod")
              for c in (o["spec"] if o["kind"] == "Pod" else o["spec"]["template"]["spec"])["containers"]}
    assert images == {image}


def test_extension_points():
    objs = objects("extensions")
    sts = by_name(objs, "StatefulSet")
    assert container(sts["poe-postgresql"], "postgresql")["image"] == \
        "mirror.example.com:5000/library/postgres:16-bookworm"
    assert container(sts["poe-minio"], "minio")["image"].startswith("mirror.example.com:5000/minio/minio:")
    deployments = by_name(objs, "Deployment")
    composer = deployments["poe-composer"]["spec"]["template"]
    assert composer["metadata"]["annotations"]["sidecar.example.com/inject"] == "false"
    assert [c["name"] for c in composer["spec"]["containers"]] == ["composer", "log-shipper"]
    assert composer["spec"]["containers"][1]["image"] == "docker.io/fluent/fluent-bit:3.2"  # sidecars as written
    main = composer["spec"]["containers"][0]
    assert main["env"][-1] == {"name": "HTTPS_PROXY",
                               "valueFrom": {"secretKeyRef": {"name": "egress-proxy", "key": "url"}}}
    assert {"name": "oracles", "mountPath": "/etc/poe/oracles", "readOnly": True} in main["volumeMounts"]
    assert {"name": "oracles", "configMap": {"name": "poe-oracle-index"}} in composer["spec"]["volumes"]
    extractor = container(deployments["poe-extractor"], "extractor")
    assert env_of(extractor)["POE_EXTRACTOR_ORACLE_DIR"]["value"] == "/etc/poe/oracles"
    # The chart's own settings stay; what a component does not set, it does not get.
    assert "POE_TOKENS_FILE" in env_of(main)
    assert len(deployments["poe-registry"]["spec"]["template"]["spec"]["containers"]) == 1


def test_the_auth_check_is_not_vacuous():
    objs = objects("default")
    assert auth_problems(objs, anonymous_role="reader") != []
    secret = json.loads(json.dumps(by_name(objs, "Secret")["poe-auth"]))
    secret["data"]["service-token"] = base64.b64encode(b"poe_service_AnotherTokenThanTheHashedOne0").decode()
    tampered = [secret if o["kind"] == "Secret" else o for o in objs]
    assert any("sha256" in p for p in auth_problems(tampered))
    registry = json.loads(json.dumps(by_name(objs, "Deployment")["poe-registry"]))
    (mount,) = [m for m in registry["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] if m["name"] == "auth"]
    mount["subPath"] = "tokens.json"  # a subPath mount never sees an updated Secret
    assert any("subPath" in p for p in auth_problems(_replaced(objs, registry)))
    composer = json.loads(json.dumps(by_name(objs, "Deployment")["poe-composer"]))
    c = composer["spec"]["template"]["spec"]["containers"][0]
    c["env"] = [e for e in c["env"] if e["name"] != "POE_SERVICE_TOKEN"]
    assert any("POE_SERVICE_TOKEN" in p for p in auth_problems(_replaced(objs, composer)))


def _replaced(objs: list[dict], new: dict) -> list[dict]:
    """`objs` with the object of `new`'s kind and name swapped for `new`."""
    same = (new["kind"], new["metadata"]["name"])
    return [new if (o["kind"], o["metadata"]["name"]) == same else o for o in objs]
