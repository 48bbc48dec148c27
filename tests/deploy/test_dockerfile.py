"""The Dockerfile, read statically (no container engine here), and its health-check script run
against a real gRPC health server."""

from __future__ import annotations

import fnmatch
import re
import shlex
import socket
import subprocess
import sys
from concurrent import futures

import grpc
import pytest
import yaml
from deploy_paths import CHART, KUSTOMIZE, REPO
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

DOCKERFILE = REPO / "Dockerfile"
PROBE = REPO / "deploy" / "docker" / "grpc_health_probe.py"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def final() -> list[tuple[str, str]]:
    return stages()[-1]


def args_of(stage, word) -> list[str]:
    return [a for w, a in stage if w == word]


def test_multi_stage_with_a_build_and_a_runtime_stage():
    s = stages()
    assert len(s) >= 2
    assert re.search(r"\bAS build\b", s[0][0][1]) and re.search(r"\bAS runtime\b", s[-1][0][1])
    assert any("--from=build" in a for a in args_of(final(), "COPY"))


def test_runs_as_a_numeric_non_root_user_matching_the_manifests():
    users = args_of(final(), "USER")
    assert users, "no USER in the final stage"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    # Kubernetes can verify runAsNonRoot only for a numeric USER; the chart and kustomize use it.
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == int(uid)
    assert values["podSecurityContext"]["runAsGroup"] == int(gid)
    assert f"runAsUser: {uid}" in (KUSTOMIZE / "base" / "registry.yaml").read_text()
    # USER comes after every RUN of the final stage (nothing after it runs as root).
    words = [w for w, _ in final()]
    assert "RUN" not in words[words.index("USER"):]


def test_final_stage_has_no_build_tools_and_installs_nothing_with_pip():
    runs = " ".join(args_of(final(), "RUN"))
    for tool in ("build-essential", "gcc", "g++", "make ", "git", "curl", "wget", "pip install", "-dev "):
        assert tool not in runs, tool
    assert "--no-install-recommends" in runs and "rm -rf /var/lib/apt/lists" in runs
    assert "dataset-fashion-mnist" in runs  # the extractor's data (POE_DATA_DIR)
    env = " ".join(args_of(final(), "ENV"))
    assert "POE_DATA_DIR=/usr/share/datasets/fashion-mnist" in env


def test_torch_is_the_pinned_cpu_wheel():
    build = " ".join(args_of(stages()[0], "RUN"))
    pin = re.search(r'"torch==([\w.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    m = re.search(r'pip install --index-url "?\$\{TORCH_INDEX_URL\}"? torch==([\w.]+)', build)
    assert m and m.group(1) == pin
    index = [a for a in args_of(stages()[0], "ARG") if a.startswith("TORCH_INDEX_URL=")]
    assert index and index[0].rstrip("/").endswith("/whl/cpu")
    # torch goes in before the project, so `pip install .` finds the pin satisfied.
    assert build.index("torch==") < build.index("pip install .")
    assert "torch.version.cuda is None" in build
    assert "pip install -e" not in build  # a real install, as a wheel would ship


def test_one_image_for_every_service():
    (entry,) = args_of(final(), "ENTRYPOINT")
    assert entry == '["poe"]'
    assert set(args_of(final(), "EXPOSE")[0].split()) == {"50051", "9464"}
    hc = args_of(final(), "HEALTHCHECK")
    assert hc and "grpc_health_probe.py" in hc[0]


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for p in patterns:
        neg = p.startswith("!")
        pat = p[1:] if neg else p
        pat = pat.rstrip("/")
        if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path, pat + "/*") or \
                any(fnmatch.fnmatch(path, pat.replace("**/", "") + s) for s in ("", "/*")):
            ignored = not neg
    return ignored


def test_copy_sources_exist_and_are_in_the_build_context():
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    assert patterns[0] == "*"  # an allow-list: .venv, runs/, .git never reach the daemon
    for w, a in instructions():
        if w != "COPY" or "--from=" in a:
            continue
        sources = shlex.split(a)[:-1]
        for src in sources:
            assert (REPO / src).exists(), src
            assert not _ignored(src.rstrip("/"), patterns), f"{src} is excluded by .dockerignore"
    assert _ignored(".venv", patterns) and _ignored("tests", patterns) and _ignored("runs", patterns)


# -- the HEALTHCHECK script against a real grpc.health.v1 server ------------------------------------

@pytest.fixture()
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, text=True, timeout=30)


def test_health_probe_follows_the_serving_status(health_server):
    servicer, addr = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("poe.v1.Composer", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert probe("--addr", addr).returncode == 0
    out = probe("--addr", addr, "--service", "poe.v1.Composer")
    assert out.returncode == 1 and "NOT_SERVING" in out.stderr
    out = probe("--addr", addr, "--service", "poe.v1.Unknown")
    assert out.returncode == 1 and "NOT_FOUND" in out.stderr
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert probe("--addr", addr).returncode == 1


def test_health_probe_fails_when_nothing_listens():
    # A port that was free a moment ago: bind and close a socket.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    out = probe("--addr", f"127.0.0.1:{free}", "--timeout", "2")
    assert out.returncode == 1 and "unhealthy" in out.stderr
