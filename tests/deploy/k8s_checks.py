"""Checks that every rendered Kubernetes manifest set (Helm chart and kustomize overlays) must pass.

Each check returns a list of problems (strings) rather than asserting, so a test reports all of
them at once. `validate_strict` wraps kubernetes-validate (Kubernetes 1.30 schemas, strict: no
unknown fields); the two Prometheus Operator kinds and cert-manager's Certificate have no schema
there and are checked by hand in `custom_resource_problems`. `auth_problems` and `tls_problems`
check how the token file, the service token and the TLS files reach the services.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
from collections.abc import Iterable

import kubernetes_validate
import kubernetes_validate.utils as kv_utils
import yaml

K8S_VERSION = "1.30"
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "Certificate", "RayCluster"}  # RayCluster: test_chart_ray.py
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job", "CronJob", "Pod"}
POE_COMPONENTS = {"registry": "poe.v1.Registry", "composer": "poe.v1.Composer", "extractor": "poe.v1.Extractor"}
# The image's health-check script: the exec probe when the services serve TLS, and `helm test`.
HEALTH_PROBE = ["python", "/opt/poe/bin/grpc_health_probe.py"]
# The fields of a cert-manager.io/v1 Certificate's spec (cert-manager 1.16 CRD).
CERTIFICATE_SPEC_FIELDS = {
    "secretName", "secretTemplate", "commonName", "dnsNames", "ipAddresses", "uris", "emailAddresses",
    "otherNames", "subject", "literalSubject", "duration", "renewBefore", "renewBeforePercentage",
    "revisionHistoryLimit", "privateKey", "usages", "issuerRef", "isCA", "keystores", "encodeUsagesInRequest",
    "additionalOutputFormats", "nameConstraints"}
CERTIFICATE_USAGES = {
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any", "server auth",
    "client auth", "code signing", "email protection", "s/mime", "ipsec end system", "ipsec tunnel",
    "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"}
GO_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")

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
    """The pod (metadata and spec) a workload runs; a bare Pod is its own template."""
    if obj["kind"] == "Pod":
        return obj
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
        poe = component_of(obj) in (*POE_COMPONENTS, "migrate", "maintenance", "test")
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


def probe_target(probe: dict) -> tuple[str, int | None, str | None, str | None]:
    """(kind, port, health service name, TLS server name) of a probe: the kubelet's native gRPC probe,
    or the image's health-check script as an exec probe (needed when the services serve TLS)."""
    if "grpc" in probe:
        return "grpc", probe["grpc"].get("port"), probe["grpc"].get("service", ""), None
    command = (probe.get("exec") or {}).get("command") or []
    if command[:2] != HEALTH_PROBE:
        return "other", None, None, None
    flags = dict(zip(command[2::2], command[3::2], strict=False))
    host, _, port = flags.get("--addr", "").rpartition(":")
    port_number = int(port) if port.isdigit() and host == "127.0.0.1" else None
    return "exec", port_number, flags.get("--service", ""), flags.get("--tls-server-name")


def probe_problems(objs: list[dict]) -> list[str]:
    """Each PoE service container has startup/liveness/readiness probes of grpc.health.v1 on its gRPC
    container port: native gRPC probes, or with TLS the health-check script on 127.0.0.1 checking the
    certificate for a Service of the pod. Readiness asks for its own grpc.health.v1 service name."""
    problems = []
    seen = set()
    services = [o for o in objs if o["kind"] == "Service"]
    tls = any("POE_TLS_SERVER_CERT" in {e["name"] for e in c.get("env", [])}
              for o in objs if o["kind"] == "Deployment" for c in pod_spec(o)["containers"])
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
        if args[2:6] != ["--port", str(ports["grpc"]), "--metrics-port", str(ports["metrics"])]:
            problems.append(f"{name_of(obj)}: ports in args {args[2:]} differ from container ports {ports}")
        labels = pod_template(obj)["metadata"].get("labels", {})
        own_services = {s["metadata"]["name"] for s in services
                        if s["spec"].get("selector") and _selects({"matchLabels": s["spec"]["selector"]}, labels)}
        expected = "exec" if tls else "grpc"
        asked = {}
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = c.get(kind)
            if not probe:
                problems.append(f"{name_of(obj)}: no {kind}")
                continue
            how, port, service, server_name = probe_target(probe)
            asked[kind] = service
            if how != expected:
                problems.append(f"{name_of(obj)}: {kind} is {how}, expected {expected}"
                                + (" (the kubelet's gRPC probe cannot speak TLS)" if tls else ""))
                continue
            if port != ports["grpc"]:
                problems.append(f"{name_of(obj)}: {kind} on port {port}, gRPC is {ports['grpc']}")
            if how == "exec" and server_name not in own_services:
                problems.append(f"{name_of(obj)}: {kind} checks the certificate for {server_name!r}, not one of its "
                                f"Services {sorted(own_services)}")
        if asked.get("livenessProbe") != "liveness":
            problems.append(f"{name_of(obj)}: liveness asks for {asked.get('livenessProbe')!r}, not 'liveness' "
                            "(a registry outage would restart it)")
        if asked.get("readinessProbe") != POE_COMPONENTS[comp]:
            problems.append(f"{name_of(obj)}: readiness asks for {asked.get('readinessProbe')!r}, "
                            f"not {POE_COMPONENTS[comp]}")
    if seen != set(POE_COMPONENTS):
        problems.append(f"Deployments for {sorted(set(POE_COMPONENTS) - seen)} missing")
    return problems


def reference_problems(objs: list[dict], *, external_secrets: Iterable[str] = (),
                       external_claims: Iterable[str] = (), external_accounts: Iterable[str] = (),
                       external_configmaps: Iterable[str] = ()) -> list[str]:
    """Every name a pod refers to exists: ConfigMaps, Secrets (rendered, written by a rendered
    cert-manager Certificate, or named as supplied by the operator), claims, ServiceAccounts, the
    volumes its containers mount; Services, PDBs, HPAs and NetworkPolicies select or target something
    that exists; $(VAR) references in env are defined earlier in the list."""
    problems = []
    by_kind: dict[str, dict[str, dict]] = {}
    for obj in objs:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
    secrets = set(by_kind.get("Secret", {})) | set(external_secrets)
    secrets |= {c["spec"]["secretName"] for c in by_kind.get("Certificate", {}).values()}
    configmaps = set(by_kind.get("ConfigMap", {})) | set(external_configmaps)
    claims = set(by_kind.get("PersistentVolumeClaim", {})) | set(external_claims)
    accounts = set(by_kind.get("ServiceAccount", {})) | {"default"} | set(external_accounts)
    pods = []  # (owner, labels, spec)
    for obj in objs:
        if obj["kind"] in WORKLOAD_KINDS:
            pods.append((obj, pod_template(obj)["metadata"].get("labels", {}), pod_spec(obj)))
        elif obj["kind"] == "RayCluster":  # KubeRay makes a pod of each group's template
            for group in [obj["spec"]["headGroupSpec"], *obj["spec"].get("workerGroupSpecs", [])]:
                pods.append((obj, group["template"]["metadata"].get("labels", {}), group["template"]["spec"]))
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
            secret = (v.get("secret") or {}).get("secretName")
            if secret and secret not in secrets:
                problems.append(f"{name_of(obj)}: Secret {secret} of volume {v['name']} missing")
            configmap = (v.get("configMap") or {}).get("name")
            if configmap and configmap not in configmaps:
                problems.append(f"{name_of(obj)}: ConfigMap {configmap} of volume {v['name']} missing")
        volumes = {v["name"] for v in spec.get("volumes", [])}
        claim_templates = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])} \
            if obj["kind"] == "StatefulSet" else set()
        for c in spec.get("initContainers", []) + spec["containers"]:
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes | claim_templates:
                    problems.append(f"{name_of(obj)} container {c['name']}: mounts {m['name']}, which is no volume")
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
                if "configMapKeyRef" in ref and ref["configMapKeyRef"]["name"] not in external_configmaps:
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
        elif obj["kind"] == "Certificate":
            problems.extend(_certificate_problems(obj, services))
        elif obj["kind"] == "PrometheusRule":
            if obj["apiVersion"] != "monitoring.coreos.com/v1":
                problems.append(f"{name_of(obj)}: apiVersion {obj['apiVersion']}")
            if set(obj["spec"]) != {"groups"} or not obj["spec"]["groups"]:
                problems.append(f"{name_of(obj)}: spec must hold only a non-empty `groups`")
    return problems


def _certificate_problems(cert: dict, services: list[dict]) -> list[str]:
    """A cert-manager.io/v1 Certificate: known fields, an issuer, durations, usages, and a DNS name
    for every PoE Service (short and namespace.svc forms)."""
    problems = []
    where = name_of(cert)
    if cert["apiVersion"] != "cert-manager.io/v1":
        problems.append(f"{where}: apiVersion {cert['apiVersion']}")
    spec = cert.get("spec") or {}
    if set(spec) - CERTIFICATE_SPEC_FIELDS:
        problems.append(f"{where}: unknown spec fields {sorted(set(spec) - CERTIFICATE_SPEC_FIELDS)}")
    if not spec.get("secretName"):
        problems.append(f"{where}: no secretName")
    issuer = spec.get("issuerRef") or {}
    if not issuer.get("name") or set(issuer) - {"name", "kind", "group"}:
        problems.append(f"{where}: issuerRef {issuer} needs a name and only name, kind, group")
    for field in ("duration", "renewBefore"):
        if field in spec and not GO_DURATION.match(str(spec[field])):
            problems.append(f"{where}: {field} {spec[field]!r} is no Go duration")
    if set(spec.get("usages", [])) - CERTIFICATE_USAGES:
        problems.append(f"{where}: unknown usages {sorted(set(spec['usages']) - CERTIFICATE_USAGES)}")
    if "server auth" not in spec.get("usages", []):
        problems.append(f"{where}: no 'server auth' usage")
    key = spec.get("privateKey") or {}
    if set(key) - {"algorithm", "size", "encoding", "rotationPolicy"} or \
            key.get("algorithm", "RSA") not in ("RSA", "ECDSA", "Ed25519"):
        problems.append(f"{where}: privateKey {key}")
    namespace = cert["metadata"].get("namespace")
    names = set(spec.get("dnsNames", []))
    for service in services:
        if component_of(service) not in POE_COMPONENTS:
            continue
        wanted = {service["metadata"]["name"]}
        if namespace:
            wanted.add(f"{service['metadata']['name']}.{namespace}.svc")
        if wanted - names:
            problems.append(f"{where}: dnsNames lack {sorted(wanted - names)}")
    return problems


# -- how the token file, the service token and the TLS files reach the services -------------------

def _env_values(container: dict, configmaps: dict[str, dict]) -> dict[str, dict]:
    """The container's variables as EnvVar-like dicts: its ConfigMap envFrom first, env over them."""
    values: dict[str, dict] = {}
    for source in container.get("envFrom", []):
        cm = configmaps.get((source.get("configMapRef") or {}).get("name"), {})
        for k, v in (cm.get("data") or {}).items():
            values[k] = {"name": k, "value": v}
    for e in container.get("env", []):
        values[e["name"]] = e
    return values


def _mounted_secret_file(spec: dict, container: dict, path: str) -> tuple[str, str] | str:
    """(Secret, key) whose file `path` is inside the container, or the reason it is not one. Only a
    read-only whole-directory mount counts: a subPath mount never sees an updated Secret."""
    directory, _, file_name = path.rpartition("/")
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"].rstrip("/") == directory]
    if len(mounts) != 1:
        return f"{path} is in no mounted directory"
    (mount,) = mounts
    if mount.get("subPath") or not mount.get("readOnly"):
        return f"{path}: mount {mount['name']} must be read-only without subPath"
    (volume,) = [v for v in spec.get("volumes", []) if v["name"] == mount["name"]] or [{}]
    secret = volume.get("secret")
    if not secret:
        return f"{path}: volume {mount['name']} is not a Secret"
    items = secret.get("items")
    if items is None:
        return secret["secretName"], file_name
    keys = [i["key"] for i in items if i["path"] == file_name]
    if not keys:
        return f"{path}: Secret volume {mount['name']} has no item at {file_name}"
    return secret["secretName"], keys[0]


def _poe_service_pods(objs: list[dict]):
    for obj in objs:
        comp = component_of(obj)
        if obj["kind"] == "Deployment" and comp in POE_COMPONENTS:
            spec = pod_spec(obj)
            (c,) = [c for c in spec["containers"] if c["name"] == comp]
            yield obj, comp, spec, c


def _secret_data(secret: dict) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    data.update(secret.get("stringData") or {})
    return data


def auth_problems(objs: list[dict], *, anonymous_role: str = "none") -> list[str]:
    """Every PoE service reads its token file (POE_TOKENS_FILE) from a read-only mount of a Secret's
    tokens.json and gives callers without a token `anonymous_role`; the composer and the extractor
    send the service token of the same Secret (key service-token). When that Secret is rendered, the
    sha256 of its service token is in its tokens.json with role service (else the registry would
    refuse its own components)."""
    problems = []
    configmaps = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap"}
    secrets = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Secret"}
    token_secrets = set()
    for obj, comp, spec, c in _poe_service_pods(objs):
        env = _env_values(c, configmaps)
        role = (env.get("POE_ANONYMOUS_ROLE") or {}).get("value")
        if role != anonymous_role:
            problems.append(f"{name_of(obj)}: POE_ANONYMOUS_ROLE is {role!r}, not {anonymous_role!r}")
        path = (env.get("POE_TOKENS_FILE") or {}).get("value")
        if not path:
            problems.append(f"{name_of(obj)}: no POE_TOKENS_FILE")
            continue
        found = _mounted_secret_file(spec, c, path)
        if isinstance(found, str):
            problems.append(f"{name_of(obj)}: {found}")
            continue
        secret, key = found
        token_secrets.add(secret)
        if key != "tokens.json":
            problems.append(f"{name_of(obj)}: the token file is key {key} of {secret}, not tokens.json")
        ref = ((env.get("POE_SERVICE_TOKEN") or {}).get("valueFrom") or {}).get("secretKeyRef")
        if comp == "registry":
            continue
        if ref != {"name": secret, "key": "service-token"}:
            problems.append(f"{name_of(obj)}: POE_SERVICE_TOKEN comes from {ref}, not key service-token of {secret}")
    if len(token_secrets) > 1:
        problems.append(f"the services read different token Secrets: {sorted(token_secrets)}")
    for name in token_secrets & set(secrets):
        data = _secret_data(secrets[name])
        if set(data) != {"tokens.json", "service-token"}:
            problems.append(f"Secret/{name}: keys {sorted(data)}, not tokens.json and service-token")
            continue
        digest = hashlib.sha256(data["service-token"].encode()).hexdigest()
        entries = json.loads(data["tokens.json"])["tokens"]
        if not any(e["sha256"] == digest and e["role"] == "service" and not e.get("revoked") for e in entries):
            problems.append(f"Secret/{name}: the service token's sha256 is not in tokens.json with role service")
        token_id = data["service-token"].split("_")[1] if data["service-token"].count("_") >= 2 else None
        if not re.fullmatch(r"poe_[a-z0-9-]{1,40}_[A-Za-z0-9]{20,}", data["service-token"]) or \
                not any(e["id"] == token_id for e in entries):
            problems.append(f"Secret/{name}: the service token is not poe_<id>_<secret> with its id in tokens.json")
    return problems


TLS_FILES = {"POE_TLS_SERVER_CERT": "tls.crt", "POE_TLS_SERVER_KEY": "tls.key", "POE_TLS_CA": "ca.crt"}
MTLS_FILES = {"POE_TLS_CLIENT_CA": "ca.crt", "POE_TLS_CERT": "tls.crt", "POE_TLS_KEY": "tls.key"}


def tls_problems(objs: list[dict], *, client_auth: bool) -> list[str]:
    """TLS is on for every PoE service: the server certificate, key and CA come from one
    kubernetes.io/tls Secret's tls.crt, tls.key and ca.crt through read-only mounts; with
    `client_auth` the servers require client certificates and the components present theirs; the
    Services and scrape annotations say TLS; a rendered Certificate writes that Secret."""
    problems = []
    configmaps = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap"}
    tls_secrets = set()
    wanted = {**TLS_FILES, **(MTLS_FILES if client_auth else {})}
    for obj, _comp, spec, c in _poe_service_pods(objs):
        env = _env_values(c, configmaps)
        for var, key in wanted.items():
            path = (env.get(var) or {}).get("value")
            found = _mounted_secret_file(spec, c, path) if path else f"no {var}"
            if isinstance(found, str):
                problems.append(f"{name_of(obj)}: {found}")
            elif found[1] != key:
                problems.append(f"{name_of(obj)}: {var} is key {found[1]} of {found[0]}, not {key}")
            else:
                tls_secrets.add(found[0])
        if not client_auth and set(MTLS_FILES) & set(env):
            problems.append(f"{name_of(obj)}: mutual-TLS variables {sorted(set(MTLS_FILES) & set(env))} without it")
        annotations = pod_template(obj)["metadata"].get("annotations") or {}
        if "prometheus.io/scrape" in annotations and annotations.get("prometheus.io/scheme") != "https":
            problems.append(f"{name_of(obj)}: scrape annotations without prometheus.io/scheme: https")
    if len(tls_secrets) != 1:
        problems.append(f"the services read TLS files from {sorted(tls_secrets)}, not one Secret")
    for svc in (o for o in objs if o["kind"] == "Service" and component_of(o) in POE_COMPONENTS):
        for port in svc["spec"]["ports"]:
            if port.get("appProtocol") in ("kubernetes.io/h2c", "http"):
                problems.append(f"{name_of(svc)}: port {port['name']} says {port['appProtocol']} (plaintext)")
    for cert in (o for o in objs if o["kind"] == "Certificate"):
        if cert["spec"].get("secretName") not in tls_secrets:
            problems.append(f"{name_of(cert)}: writes {cert['spec'].get('secretName')}, "
                            f"the services read {sorted(tls_secrets)}")
        if client_auth and "client auth" not in cert["spec"].get("usages", []):
            problems.append(f"{name_of(cert)}: no 'client auth' usage, but the components present it as clients")
    return problems
