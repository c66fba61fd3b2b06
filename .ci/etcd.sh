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
    if [ "$(id -u)" != 0 ]; then
        echo "etcd.sh: missing ${missing[*]}, and not root to install them" >&2
        exit 1
    fi
    # Debian's etcd-server would start a service of its own: no service may
    # start during the install (unless a policy is already in place).
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q </dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
fi

command -v etcd >/dev/null 2>&1 || { echo "etcd.sh: etcd still missing" >&2; exit 1; }
echo "etcd.sh: $(etcd --version | head -n1)"
