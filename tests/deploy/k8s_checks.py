"""Checks that every rendered Kubernetes manifest set (Helm chart and kustomize overlays) must pass.

Each check returns a list of problems (strings) rather than asserting, so a test reports all of
them at once. `validate_strict` wraps kubernetes-validate (Kubernetes 1.30 schemas, strict: no
unknown fields); the two Prometheus Operator kinds have no schema there and are checked by hand in
`custom_resource_problems`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

import kubernetes_validate
import kubernetes_validate.utils as kv_utils
import yaml

K8S_VERSION = "1.30"
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job", "CronJob"}
POE_COMPONENTS = {"registry": "poe.v1.Registry", "composer": "poe.v1.Composer", "extractor": "poe.v1.Extractor"}

# kubernetes-validate reads the 1.2 MB definitions file on every call; the files never change.
kv_utils.schema_contents = functools.lru_cache(maxsize=None)(kv_utils.schema_contents)


def load_docs(texts: Iterable[str]) -> list[dict]:
    docs: list[dict] = []
    for text in texts:
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def name_of(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def validate_strict(obj: dict) -> str | None:
    """None when `obj` is valid for Kubernetes 1.30 (strict), else the reason."""
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        return f"{name_of(obj)}: {path}: {e.message}"
    return None


def schema_problems(objs: list[dict]) -> list[str]:
    problems = []
    for obj in objs:
        if obj["kind"] in CRD_KINDS:
            try:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                continue  # checked by custom_resource_problems
            problems.append(f"{name_of(obj)}: expected no built-in schema for a CRD kind")
            continue
        try:
            err = validate_strict(obj)
        except kubernetes_validate.SchemaNotFoundError:
            err = f"{name_of(obj)}: no Kubernetes {K8S_VERSION} schema for {obj['apiVersion']} {obj['kind']}"
        if err:
            problems.append(err)
    return problems


def pod_template(obj: dict) -> dict:
    spec = obj["spec"]["jobTemplate"]["spec"] if obj["kind"] == "CronJob" else obj["spec"]
    return spec["template"]


def pod_spec(obj: dict) -> dict:
    return pod_template(obj)["spec"]


def component_of(obj: dict) -> str | None:
    return obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def _selects(selector: dict, labels: dict) -> bool:
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        present = expr["key"] in labels
        value = labels.get(expr["key"])
        op = expr["operator"]
        if op == "In" and value not in expr["values"]:
            return False
        if op == "NotIn" and value in expr["values"]:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


def security_problems(objs: list[dict], *, uid: int = 10001) -> list[str]:
    """PoE pods run as the image's unprivileged user with a read-only root and no capabilities;
    every container (PoE or in-cluster dependency) has resources and drops ALL capabilities."""
    problems = []
    for obj in objs:
        if obj["kind"] not in WORKLOAD_KINDS:
            continue
        spec = pod_spec(obj)
        psc = spec.get("securityContext") or {}
        poe = component_of(obj) in (*POE_COMPONENTS, "migrate", "maintenance")
        if psc.get("runAsNonRoot") is not True:
            problems.append(f"{name_of(obj)}: pod securityContext.runAsNonRoot is not true")
        if not psc.get("runAsUser"):
            problems.append(f"{name_of(obj)}: pod securityContext.runAsUser missing or 0")
        if poe and (psc.get("runAsUser"), psc.get("runAsGroup")) != (uid, uid):
            problems.append(f"{name_of(obj)}: runAsUser/runAsGroup {psc.get('runAsUser')}/{psc.get('runAsGroup')} "
                            f"!= the image's {uid}")
        if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{name_of(obj)}: no RuntimeDefault seccomp profile")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{name_of(obj)}: automountServiceAccountToken is not false")
        for c in spec.get("initContainers", []) + spec["containers"]:
            where = f"{name_of(obj)} container {c['name']}"
            sc = c.get("securityContext") or {}
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: readOnlyRootFilesystem is not true")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{where}: capabilities do not drop ALL")
            if sc.get("privileged"):
                problems.append(f"{where}: privileged")
            res = c.get("resources") or {}
            if not (res.get("requests") or {}).get("memory") or not (res.get("limits") or {}).get("memory"):
                problems.append(f"{where}: no memory request and limit")
            if not (res.get("requests") or {}).get("cpu"):
                problems.append(f"{where}: no cpu request")
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            if "/tmp" not in mounts:
                problems.append(f"{where}: no writable /tmp under the read-only root")
    return problems


def probe_problems(objs: list[dict]) -> list[str]:
    """Each PoE service container has native gRPC startup/liveness/readiness probes on its gRPC
    container port; readiness asks for its own grpc.health.v1 service name."""
    problems = []
    seen = set()
    for obj in objs:
        comp = component_of(obj)
        if obj["kind"] != "Deployment" or comp not in POE_COMPONENTS:
            continue
        seen.add(comp)
        (c,) = [c for c in pod_spec(obj)["containers"] if c["name"] == comp]
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        if set(ports) != {"grpc", "metrics"}:
            problems.append(f"{name_of(obj)}: container ports {sorted(ports)} != grpc, metrics")
            continue
        args = c.get("args", [])
        if c.get("command") != ["poe"] or args[:2] != ["serve", comp]:
            problems.append(f"{name_of(obj)}: runs {c.get('command')} {args}, not `poe serve {comp}`")
        if args[2:] != ["--port", str(ports["grpc"]), "--metrics-port", str(ports["metrics"])]:
            problems.append(f"{name_of(obj)}: ports in args {args[2:]} differ from container ports {ports}")
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = c.get(kind)
            if not probe or "grpc" not in probe:
                problems.append(f"{name_of(obj)}: no native gRPC {kind}")
                continue
            if probe["grpc"].get("port") != ports["grpc"]:
                problems.append(f"{name_of(obj)}: {kind} on port {probe['grpc'].get('port')}, gRPC is {ports['grpc']}")
        live = (c.get("livenessProbe") or {}).get("grpc", {})
        if live.get("service") != "liveness":
            problems.append(f"{name_of(obj)}: liveness asks for {live.get('service')!r}, not 'liveness' (a registry "
                            "outage would restart it)")
        ready = (c.get("readinessProbe") or {}).get("grpc", {})
        if ready.get("service") != POE_COMPONENTS[comp]:
            problems.append(f"{name_of(obj)}: readiness asks for {ready.get('service')!r}, not {POE_COMPONENTS[comp]}")
    if seen != set(POE_COMPONENTS):
        problems.append(f"Deployments for {sorted(set(POE_COMPONENTS) - seen)} missing")
    return problems


def reference_problems(objs: list[dict], *, external_secrets: Iterable[str] = (),
                       external_claims: Iterable[str] = (), external_accounts: Iterable[str] = ()) -> list[str]:
    """Every name a pod refers to exists: ConfigMaps, Secrets (rendered, or named as supplied by
    the operator), claims, ServiceAccounts; Services, PDBs, HPAs and NetworkPolicies select or
    target something that exists; $(VAR) references in env are defined earlier in the list."""
    problems = []
    by_kind: dict[str, dict[str, dict]] = {}
    for obj in objs:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
    secrets = set(by_kind.get("Secret", {})) | set(external_secrets)
    configmaps = set(by_kind.get("ConfigMap", {}))
    claims = set(by_kind.get("PersistentVolumeClaim", {})) | set(external_claims)
    accounts = set(by_kind.get("ServiceAccount", {})) | {"default"} | set(external_accounts)
    pods = []  # (owner, labels, spec)
    for obj in objs:
        if obj["kind"] in WORKLOAD_KINDS:
            pods.append((obj, pod_template(obj)["metadata"].get("labels", {}), pod_spec(obj)))
    for obj, labels, spec in pods:
        sa = spec.get("serviceAccountName", "default")
        if sa not in accounts:
            problems.append(f"{name_of(obj)}: ServiceAccount {sa} not rendered")
        if obj["kind"] in ("Deployment", "StatefulSet"):
            if not _selects(obj["spec"]["selector"], labels):
                problems.append(f"{name_of(obj)}: selector does not match its pod labels")
        for v in spec.get("volumes", []):
            claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
            if claim and claim not in claims:
                problems.append(f"{name_of(obj)}: claim {claim} missing")
        for c in spec.get("initContainers", []) + spec["containers"]:
            defined: set[str] = set()
            for ef in c.get("envFrom", []):
                if "configMapRef" in ef and ef["configMapRef"]["name"] not in configmaps:
                    problems.append(f"{name_of(obj)}: ConfigMap {ef['configMapRef']['name']} missing")
                if "secretRef" in ef and ef["secretRef"]["name"] not in secrets:
                    problems.append(f"{name_of(obj)}: Secret {ef['secretRef']['name']} missing")
            for e in c.get("env", []):
                ref = (e.get("valueFrom") or {})
                if "secretKeyRef" in ref and ref["secretKeyRef"]["name"] not in secrets:
                    problems.append(f"{name_of(obj)}: Secret {ref['secretKeyRef']['name']} missing")
                if "configMapKeyRef" in ref:
                    cm = by_kind.get("ConfigMap", {}).get(ref["configMapKeyRef"]["name"])
                    if cm is None or ref["configMapKeyRef"]["key"] not in cm.get("data", {}):
                        problems.append(f"{name_of(obj)}: ConfigMap key {ref['configMapKeyRef']} missing")
                for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", e.get("value", "")):
                    if var not in defined:
                        problems.append(f"{name_of(obj)}: {e['name']} uses $({var}) before it is defined")
                defined.add(e["name"])
    for kind in ("Service", "PodDisruptionBudget", "NetworkPolicy"):
        for obj in by_kind.get(kind, {}).values():
            if kind == "Service":
                selector = {"matchLabels": obj["spec"].get("selector", {})}
            elif kind == "PodDisruptionBudget":
                selector = obj["spec"]["selector"]
            else:
                selector = obj["spec"]["podSelector"]
            matched = [o for o, labels, _ in pods if _selects(selector, labels)]
            if not matched:
                problems.append(f"{name_of(obj)}: selects no pod")
            if kind == "Service":
                for port in obj["spec"]["ports"]:
                    target = port.get("targetPort", port["port"])
                    for o in matched:
                        names = {p.get("name") for c in pod_spec(o)["containers"] for p in c.get("ports", [])}
                        numbers = {p["containerPort"] for c in pod_spec(o)["containers"] for p in c.get("ports", [])}
                        if target not in names and target not in numbers:
                            problems.append(f"{name_of(obj)}: targetPort {target} not a port of {name_of(o)}")
    for hpa in by_kind.get("HorizontalPodAutoscaler", {}).values():
        ref = hpa["spec"]["scaleTargetRef"]
        target = by_kind.get(ref["kind"], {}).get(ref["name"])
        if target is None:
            problems.append(f"{name_of(hpa)}: target {ref['kind']}/{ref['name']} missing")
            continue
        if "replicas" in target["spec"]:
            problems.append(f"{name_of(hpa)}: {name_of(target)} sets replicas, which fights the HPA")
        for c in pod_spec(target)["containers"]:
            if not (c.get("resources") or {}).get("requests", {}).get("cpu"):
                problems.append(f"{name_of(hpa)}: {name_of(target)} has no cpu request to scale on")
    return problems


def custom_resource_problems(objs: list[dict]) -> list[str]:
    """ServiceMonitor and PrometheusRule, which kubernetes-validate has no schema for."""
    problems = []
    services = [o for o in objs if o["kind"] == "Service"]
    for obj in objs:
        if obj["kind"] == "ServiceMonitor":
            if obj["apiVersion"] != "monitoring.coreos.com/v1":
                problems.append(f"{name_of(obj)}: apiVersion {obj['apiVersion']}")
            spec = obj["spec"]
            selected = [s for s in services if _selects(spec["selector"], s["metadata"].get("labels", {}))]
            if not selected:
                problems.append(f"{name_of(obj)}: selects no Service")
            # The operator scrapes the selected Services that have the endpoint's port (by name) and
            # skips the rest (e.g. a headless Service with only the gRPC port).
            for ep in spec["endpoints"]:
                scraped = {component_of(s) for s in selected if ep["port"] in {p["name"] for p in s["spec"]["ports"]}}
                if scraped != set(POE_COMPONENTS):
                    problems.append(f"{name_of(obj)}: port {ep['port']} scrapes {sorted(scraped)}, "
                                    f"not every PoE service")
            if set(spec) - {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels"}:
                problems.append(f"{name_of(obj)}: unexpected spec keys {sorted(spec)}")
        elif obj["kind"] == "PrometheusRule":
            if obj["apiVersion"] != "monitoring.coreos.com/v1":
                problems.append(f"{name_of(obj)}: apiVersion {obj['apiVersion']}")
            if set(obj["spec"]) != {"groups"} or not obj["spec"]["groups"]:
                problems.append(f"{name_of(obj)}: spec must hold only a non-empty `groups`")
    return problems
