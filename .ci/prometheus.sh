#!/usr/bin/env bash
# Makes sure tests/history.rs can check `qsem --metrics` with a real parser of
# Prometheus's text format: the `python3` on PATH with the prometheus_client
# package. pip first (a pyenv or venv python); where the python is Debian's
# own, which refuses pip installs (PEP 668), Debian's package instead.
# Idempotent, never reads stdin. Called by .ci/run.
set -euo pipefail

have() { python3 -c 'import prometheus_client.parser' >/dev/null 2>&1; }

. "$(dirname "$0")/apt.sh"
if ! command -v python3 >/dev/null 2>&1; then
    apt_install prometheus.sh python3
fi
if ! have; then
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore prometheus_client </dev/null || true
fi
if ! have; then
    apt_install prometheus.sh python3-prometheus-client
fi
have || { echo "prometheus.sh: python3 still cannot import prometheus_client" >&2; exit 1; }
echo "prometheus.sh: prometheus_client $(python3 -c 'from importlib.metadata import version; print(version("prometheus_client"))')"
