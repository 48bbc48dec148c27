# syntax=docker/dockerfile:1
# One image for every PoE service; the command picks the service:
#   docker run IMAGE serve composer  --port 50051 --metrics-port 9464
#   docker run IMAGE serve registry  --port 50051 --metrics-port 9464
#   docker run IMAGE serve extractor --port 50051 --metrics-port 9464
#   docker run IMAGE registry migrate          (the chart runs this as a pre-install/pre-upgrade Job)
# Build: docker build -t poe:0.1.0 .   (see docs/OPERATIONS.md, "Image").
#
# Two stages: `build` has the compilers and pip's caches and produces a virtual environment in
# /opt/venv; `runtime` copies only that environment onto a clean base, adds the Fashion-MNIST data
# set from Debian and runs as an unprivileged numeric user (10001, the UID the Helm chart and the
# kustomize manifests declare in runAsUser).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# The CPU-only wheel index: torch comes from there so that no CUDA build (several GB) is pulled.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# Compilers only for a dependency that would have to build from source on this platform.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, pinned as in pyproject.toml: `pip install .` then finds torch==2.13.0 satisfied
# (2.13.0+cpu matches the pin) and installs the rest from the ordinary index.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY poe/ poe/
COPY services/ services/
# A real (non-editable) install: the image imports what a wheel ships, as the tests check.
RUN pip install . \
 && pip check \
 && python -c "import torch, poe, poe_services.registry; assert torch.version.cuda is None, torch.version.cuda" \
 && python -m compileall -q /opt/venv/lib

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="poe" \
      org.opencontainers.image.description="Pool of Experts services: registry, composer, extractor (one image, the command picks)"
# Fashion-MNIST for the extractor (POE_DATA_DIR); nothing else from apt, no compilers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends dataset-fashion-mnist \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 poe \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/poe --shell /usr/sbin/nologin poe \
 && mkdir -p /var/lib/poe \
 && chown 10001:10001 /var/lib/poe
COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/grpc_health_probe.py /opt/poe/bin/grpc_health_probe.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/poe \
    POE_HOME=/var/lib/poe \
    POE_DATA_DIR=/usr/share/datasets/fashion-mnist \
    POE_DEVICE=cpu
WORKDIR /var/lib/poe
USER 10001:10001
EXPOSE 50051 9464
# For docker/podman/compose. Kubernetes ignores HEALTHCHECK: the chart uses native gRPC probes, or
# this script as an exec probe when the services serve TLS (it reads POE_TLS_CA, POE_TLS_CERT/KEY).
# A service started on another port than 50051 sets POE_HEALTH_ADDR (or POE_PORT) to match.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "/opt/poe/bin/grpc_health_probe.py"]
ENTRYPOINT ["poe"]
CMD ["--help"]
