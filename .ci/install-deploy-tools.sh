#!/usr/bin/env bash
# Installs the command-line tools the deployment tests (tests/deploy) need and PyPI cannot give:
#   promtool    from Debian's `prometheus` package (`promtool check rules` / `promtool test rules`);
#   prometheus  the server binary of the same package (tests/deploy/test_real_prometheus.py starts
#               its own on loopback).
# kubectl (for `kubectl kustomize`) is on the machine image; helm-python-sdk and kubernetes-validate
# come from PyPI through the project's `dev` extra.
#
# Idempotent: does nothing when promtool is already on PATH. Installs only as root with apt-get;
# otherwise prints what to run and exits 0, so a developer without root still gets the other tests
# (tests/deploy fails instead of skipping when CI=true and promtool is missing).
#
# The package's Prometheus service is never started (the test runs the binary itself). Where no
# /usr/sbin/policy-rc.d exists, one that refuses every service start (exit 101, the Debian
# convention) is put in place for the duration of the install and removed afterwards.
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "promtool missing: run 'apt-get install prometheus' as root (tests/deploy needs promtool)" >&2
  exit 0
fi

policy=/usr/sbin/policy-rc.d
made_policy=
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\n# temporary, from .ci/install-deploy-tools.sh: start no service\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  made_policy=1
fi
cleanup() { if [ -n "$made_policy" ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v promtool >/dev/null || { echo "promtool still missing after installing prometheus" >&2; exit 1; }
