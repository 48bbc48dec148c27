"""The chart's optional RayCluster (KubeRay, ray.io/v1) that the extractor's Ray executor runs on,
rendered offline. Kubernetes has no schema for it and KubeRay's CRD is not vendored here, so its
fields are checked against the RayCluster v1 API (KubeRay's `raycluster_types.go`, below), and
every pod template is validated strictly as a Kubernetes 1.30 PodTemplate."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import helm_python
import pytest
import yaml
from deploy_paths import CHART
from k8s_checks import load_docs, validate_strict

from poe.engine.config import Settings

RELEASE, NAMESPACE = "poe", "poe-test"
# ray.io/v1 RayClusterSpec, HeadGroupSpec and WorkerGroupSpec (json names; required ones apart).
SPEC_FIELDS = {"suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
               "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs"}
HEAD_FIELDS = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
HEAD_REQUIRED = {"template", "rayStartParams"}
WORKER_FIELDS = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                 "rayStartParams", "template", "scaleStrategy", "numOfHosts"}
WORKER_REQUIRED = {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"}


@functools.cache
def _chart() -> helm_python.Chart:
    return helm_python.Chart.load(CHART)


def ci_values() -> dict:
    return yaml.safe_load((CHART / "ci" / "ray-values.yaml").read_text())


def render(values: dict) -> list[dict]:
    out = _chart().render(values, name=RELEASE, namespace=NAMESPACE)
    return load_docs(text for path, text in sorted(out.items()) if path.endswith(".yaml"))


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    (obj,) = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    return obj


def groups(cluster: dict) -> list[tuple[str, dict]]:
    spec = cluster["spec"]
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def extractor_container(objs: list[dict]) -> dict:
    (c,) = one(objs, "Deployment", f"{RELEASE}-extractor")["spec"]["template"]["spec"]["containers"]
    return c


def test_off_by_default():
    objs = render({})
    assert not [o for o in objs if o["kind"] == "RayCluster"]
    config = one(objs, "ConfigMap", f"{RELEASE}-config")["data"]
    assert not [k for k in config if k.startswith("POE_RAY")]
    assert "RAY_AUTH_TOKEN" not in {e["name"] for e in extractor_container(objs).get("env", [])}
    assert Settings.from_env(config).ray_address == ""  # the extractor's own local Ray


def test_raycluster_follows_the_v1_api():
    cluster = one(render(ci_values()), "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["metadata"]["name"] == f"{RELEASE}-ray"
    spec = cluster["spec"]
    assert set(spec) <= SPEC_FIELDS, set(spec) - SPEC_FIELDS
    # The pods run the Ray that pyproject.toml pins.
    pinned = re.search(r'"ray\[train\]==([\d.]+)"', (Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert spec["rayVersion"] == pinned.group(1)
    assert spec["enableInTreeAutoscaling"] is False
    head = spec["headGroupSpec"]
    assert HEAD_REQUIRED <= set(head) <= HEAD_FIELDS
    assert head["rayStartParams"] == {"num-cpus": "0", "include-dashboard": "false",
                                      "object-store-memory": "1000000000"}
    for group in spec["workerGroupSpecs"]:
        assert WORKER_REQUIRED <= set(group) <= WORKER_FIELDS, group["groupName"]
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"]
    for name, group in groups(cluster):
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), name  # map[string]string


def test_ray_pods_are_valid_unprivileged_and_share_the_token():
    objs = render(ci_values())
    cluster = one(objs, "RayCluster")
    assert [name for name, _ in groups(cluster)] == ["head", "cpu", "gpu"]
    for name, group in groups(cluster):
        template = group["template"]
        problem = validate_strict({"apiVersion": "v1", "kind": "PodTemplate",
                                   "metadata": {"name": f"ray-{name}"}, "template": template})
        assert problem is None, problem
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
        (c,) = pod["containers"]
        assert c["image"] == "registry.example.com/poe:0.1.0-ray"
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
        assert {m["mountPath"] for m in c["volumeMounts"]} == {"/tmp", "/dev/shm"}
        # Probes of our own (KubeRay's would call the dashboard agent with wget, which the image lacks).
        assert c["readinessProbe"]["exec"]["command"] == c["livenessProbe"]["exec"]["command"] == \
            ["ray", "health-check"]
        assert {"name": "shm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and env["HOME"]["value"] == "/tmp"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": f"{RELEASE}-auth", "key": "service-token"}
    extractor_env = {e["name"]: e for e in extractor_container(objs)["env"]}
    assert extractor_env["RAY_AUTH_MODE"]["value"] == "token"
    assert extractor_env["RAY_AUTH_TOKEN"] == env["RAY_AUTH_TOKEN"]


def test_worker_groups_get_their_nodes_and_gpus():
    values = ci_values()
    cluster = one(render(values), "RayCluster")
    by_name = dict(groups(cluster))
    head_pod = by_name["head"]["template"]["spec"]
    assert head_pod["nodeSelector"] == {"pool": "system"}
    assert {p["name"]: p["containerPort"] for p in head_pod["containers"][0]["ports"]} == \
        {"gcs-server": 6379, "client": 10001}
    cpu = by_name["cpu"]
    assert cpu["replicas"] == 3 and cpu["rayStartParams"] == {}
    assert cpu["template"]["spec"]["nodeSelector"] == {"pool": "cpu"}
    assert "nvidia.com/gpu" not in cpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpu = by_name["gpu"]
    assert gpu["replicas"] == 1 and gpu["rayStartParams"] == {"num-gpus": "2"}
    gpu_pod = gpu["template"]["spec"]
    assert gpu_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert gpu_pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert gpu_pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    # No GPU worker group at all when it has no replicas.
    values["ray"]["gpuWorkers"]["replicas"] = 0
    assert [name for name, _ in groups(one(render(values), "RayCluster"))] == ["head", "cpu"]


def test_the_extractor_runs_on_the_cluster():
    objs = render(ci_values())
    config = one(objs, "ConfigMap", f"{RELEASE}-config")["data"]
    # KubeRay names the head's Service CLUSTER-head-svc; the extractor is a Ray Client of its port 10001.
    assert config["POE_RAY_ADDRESS"] == f"ray://{one(objs, 'RayCluster')['metadata']['name']}-head-svc:10001"
    settings = Settings.from_env(config)  # what `poe serve extractor` reads
    assert (settings.ray_workers, settings.ray_cpus_per_task, settings.ray_gpus_per_task) == (4, 2.0, 0.5)


def test_network_policies_let_the_extractor_reach_the_head_only():
    objs = render(ci_values())
    ray_policy = one(objs, "NetworkPolicy", f"{RELEASE}-ray")["spec"]
    ray_pods = {"app.kubernetes.io/name": "poe", "app.kubernetes.io/instance": RELEASE,
                "app.kubernetes.io/component": "ray"}
    extractor_pods = {**ray_pods, "app.kubernetes.io/component": "extractor"}
    assert ray_policy["podSelector"]["matchLabels"] == ray_pods
    from_ray, from_extractor = ray_policy["ingress"]
    assert from_ray == {"from": [{"podSelector": {"matchLabels": ray_pods}}]}
    assert from_extractor == {"ports": [{"port": 10001, "protocol": "TCP"}],
                              "from": [{"podSelector": {"matchLabels": extractor_pods}}]}
    # Egress restricted (ci values): the extractor gets a second policy for the Ray Client port.
    extra = one(objs, "NetworkPolicy", f"{RELEASE}-extractor-ray")["spec"]
    assert extra["podSelector"]["matchLabels"] == extractor_pods and extra["policyTypes"] == ["Egress"]
    assert extra["egress"] == [{"to": [{"podSelector": {"matchLabels": ray_pods}}],
                                "ports": [{"port": 10001, "protocol": "TCP"}]}]
    values = ci_values()
    values["networkPolicy"]["egress"]["enabled"] = False  # then the extractor's egress stays open
    assert not [o for o in render(values) if o["metadata"]["name"] == f"{RELEASE}-extractor-ray"]


@pytest.mark.parametrize("bad", [{"cpusPerTask": 0}, {"gpusPerTask": -1}, {"workers": -1},
                                 {"gpuWorkers": {"gpus": 0}}, {"version": "latest"}, {"cpuWorkers": {"size": 3}}])
def test_values_schema_refuses_bad_ray_values(bad):
    values = {"ray": {"enabled": True, **bad}}
    report = helm_python.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    assert report["errors"] or [m for m in report["messages"] if m["severity"] >= 3], bad
