#!/usr/bin/env bash
# Makes sure the PostgreSQL backend's tests (tests/postgres*.rs) can run here:
# PostgreSQL's server binaries (initdb, pg_ctl, psql, pg_basebackup) and the
# `postgres` user they run as, plus nftables for the partition tests,
# iproute2 and util-linux (ip netns, unshare) for the simulated hosts of
# tests/postgres_fleet.rs, openssl for the TLS test's certificates and
# PgBouncer for the pooler tests. The tests start their own throwaway
# clusters, pooler and namespaces; nothing is started here.
# Idempotent, needs root when something is missing, never reads stdin.
# Called by .ci/run.
set -euo pipefail

have_postgres() {
    local d
    for d in $(command -v initdb pg_ctl psql 2>/dev/null | xargs -r -n1 dirname | sort -u) \
             /usr/lib/postgresql/*/bin; do
        [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/psql" ] \
            && [ -x "$d/pg_basebackup" ] && return 0
    done
    return 1
}

missing=()
have_postgres || missing+=(postgresql)
command -v nft >/dev/null 2>&1 || missing+=(nftables)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
have_pgbouncer() { command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]; }
have_pgbouncer || missing+=(pgbouncer)

if [ ${#missing[@]} -gt 0 ]; then
    . "$(dirname "$0")/apt.sh"
    need_root postgres.sh "${missing[@]}"
    # Debian's package would create and start a cluster of its own; the tests
    # need only the binaries.
    mkdir -p /etc/postgresql-common
    if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
        echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf
    fi
    apt_install postgres.sh "${missing[@]}"
fi

have_postgres || { echo "postgres.sh: PostgreSQL binaries still missing" >&2; exit 1; }
id postgres >/dev/null 2>&1 || { echo "postgres.sh: no 'postgres' user" >&2; exit 1; }
command -v nft >/dev/null 2>&1 || { echo "postgres.sh: nft still missing" >&2; exit 1; }
command -v ip >/dev/null 2>&1 || { echo "postgres.sh: ip still missing" >&2; exit 1; }
have_pgbouncer || { echo "postgres.sh: pgbouncer still missing" >&2; exit 1; }
for d in /usr/lib/postgresql/*/bin; do [ -x "$d/initdb" ] && echo "postgres.sh: $("$d/initdb" --version)"; done
echo "postgres.sh: $(nft --version)"
echo "postgres.sh: $(PATH="$PATH:/usr/sbin" pgbouncer --version | head -n1)"
