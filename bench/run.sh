#!/bin/sh
# The qsem benchmark (issue 3): qsem against bare `true`, flock(1), GNU sem and
# xargs -P4, in one run on this machine. Installs the peers if missing (Debian),
# builds qsem (release) and the timing helper, runs bench/bench.py, and writes
# the report to bench/out/latest.md (and stdout).
#
#   bench/run.sh            full run (about 5 minutes)
#   bench/run.sh --quick    smaller counts, for trying things out
#   bench/run.sh --only overhead,handoff,pipeline,idle,scale,memory
set -eu
cd "$(dirname "$0")/.."
need=""
command -v sem >/dev/null 2>&1 || need="$need parallel"
command -v flock >/dev/null 2>&1 || need="$need util-linux"
command -v python3 >/dev/null 2>&1 || need="$need python3"
command -v xargs >/dev/null 2>&1 || need="$need findutils"
if [ -n "$need" ]; then
    echo "bench: installing$need" >&2
    sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq && $sudo apt-get install -y -qq $need >&2
fi
# qsem as install.sh builds it: static-pie, with the release profile's
# LTO and panic=abort. The plain dynamic build is measured beside it
# (QSEM_BENCH_DYNAMIC=0 skips it).
host=$(rustc -vV | sed -n 's/^host: //p')
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked --target "$host" --target-dir target/static >&2
qsem="$PWD/target/static/$host/release/qsem"
other=""
if [ "${QSEM_BENCH_DYNAMIC:-1}" != 0 ]; then
    cargo build --release --locked >&2
    other="--static $PWD/target/release/qsem"
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/qsem-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
# Static, so that its own start (part of every handoff, for every tool) is short.
rustc -O --edition 2024 -C target-feature=+crt-static bench/stamp.rs -o "$work/stamp" >&2 \
    || rustc -O --edition 2024 bench/stamp.rs -o "$work/stamp" >&2
mkdir -p bench/out
python3 bench/bench.py "$qsem" "$work/stamp" "$work" $other "$@" | tee bench/out/latest.md
# The local engine's own targets (issue 10); QSEM_BENCH_ENGINE=0 skips them.
if [ "${QSEM_BENCH_ENGINE:-1}" != 0 ]; then
    case " $* " in *" --quick "*) bench/files.sh --quick ;; *) bench/files.sh ;; esac
fi
