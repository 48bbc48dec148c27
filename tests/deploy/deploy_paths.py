"""Paths and external tools of the deployment tests (imported by name: tests/deploy is on sys.path).

External tools: promtool and the Prometheus server (Debian's `prometheus`, installed by
.ci/install-deploy-tools.sh) and kubectl (for `kubectl kustomize`). A missing tool skips its tests
on a developer's machine and fails them in CI (CI=true), so a CI run can never pass without having
run them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CHART = REPO / "deploy" / "helm" / "poe"
KUSTOMIZE = REPO / "deploy" / "k8s"
PROMETHEUS = REPO / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yaml"
# The one copy of the Grafana dashboard: inside the chart, which ships it as a ConfigMap (Helm
# cannot read files outside the chart).
DASHBOARD = CHART / "files" / "poe-dashboard.json"
OPERATIONS_DOC = REPO / "docs" / "OPERATIONS.md"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str, install_hint: str) -> str:
    """The tool's path; skip the test without it, or fail in CI."""
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} not found ({install_hint})"
    if in_ci():
        pytest.fail(f"{message}: CI must run this test")
    pytest.skip(message)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    """The PromQL of every panel target, Grafana's variables still in."""
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
