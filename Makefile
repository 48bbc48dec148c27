# Two commands matter: `make demo` and `make test`. Both set up everything they need.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP_FLAGS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
FMNIST := /usr/share/datasets/fashion-mnist
POOL := pools/fashion-mnist

.PHONY: demo test venv data protos check-protos lint bench clean

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_FLAGS) -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# Debian's Fashion-MNIST, installed when missing and apt is usable (we are root in CI).
data:
	@if [ -z "$$POE_DATA_DIR" ] && [ ! -f $(FMNIST)/t10k-labels-idx1-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null; \
	  else echo "Fashion-MNIST missing: apt-get install dataset-fashion-mnist (or set POE_DATA_DIR)"; exit 1; fi; \
	fi

protos: venv
	$(PY) -m poe.protogen

check-protos: venv
	$(PY) -m poe.protogen --check

lint: venv
	$(VENV)/bin/ruff check .

test: venv data
	bash .ci/install-deploy-tools.sh
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# poe up, import the shipped pool, compose through ComposeModel, evaluate on the real test images.
demo: venv data
	$(PY) -m poe.cli.demo --pool $(POOL) --out out

clean:
	rm -rf $(VENV) build dist *.egg-info out
