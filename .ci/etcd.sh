#!/usr/bin/env bash
# Makes sure the etcd backend's tests (tests/etcd.rs) can run here: Debian's
# etcd server (and etcdctl, for the benchmark's comparison). The tests start
# their own throwaway 3-member cluster; nothing is started here. Idempotent,
# needs root when something is missing, never reads stdin. Called by .ci/run.
set -euo pipefail

missing=()
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)

if [ ${#missing[@]} -gt 0 ]; then
    . "$(dirname "$0")/apt.sh"
    apt_install etcd.sh "${missing[@]}"
fi

command -v etcd >/dev/null 2>&1 || { echo "etcd.sh: etcd still missing" >&2; exit 1; }
echo "etcd.sh: $(etcd --version | head -n1)"
