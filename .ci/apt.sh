# Sourced by the .ci/*.sh set-up scripts: `apt_install NAME PKG...` installs
# Debian packages quietly, as root, never reading stdin and starting no
# service (a package's own service would squat ports and clusters the tests
# make for themselves); `need_root NAME PKG...` stops with a clear line when
# not root. `NAME` prefixes the error.
need_root() {
    local name=$1
    shift
    if [ "$(id -u)" != 0 ]; then
        echo "$name: missing $*, and not root to install them" >&2
        exit 1
    fi
}

apt_install() {
    need_root "$@"
    shift
    local policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        policy=/usr/sbin/policy-rc.d
    fi
    local rc=0
    DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" </dev/null ||
        rc=$?
    [ -z "$policy" ] || rm -f "$policy"
    return $rc
}
