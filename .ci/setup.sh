#!/usr/bin/env bash
# Installs what the tests need beyond cargo, when it is missing: the servers
# the backend tests start for themselves (PostgreSQL, etcd) and Prometheus's
# parser for the --metrics test. Idempotent; starts nothing; never reads
# stdin. The README's test command and .ci/run call it.
set -euo pipefail
cd "$(dirname "$0")"
bash ./postgres.sh
bash ./etcd.sh
bash ./prometheus.sh
