#!/bin/sh
# The local engine's speed targets (issue 10): handoff with 1,000 waiters,
# 500 idle holders, -j1000 with 999 held, handoff against flock(1).
#
#   bench/files.sh            full run (a few minutes)
#   bench/files.sh --quick    smaller counts, for trying things out
set -eu
cd "$(dirname "$0")/.."
command -v flock >/dev/null 2>&1 && command -v python3 >/dev/null 2>&1 || {
    sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq && $sudo apt-get install -y -qq util-linux python3 >&2
}
cargo build --release --locked >&2
work=$(mktemp -d "${TMPDIR:-/tmp}/qsem-engine.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
rustc -O --edition 2024 -C target-feature=+crt-static bench/stamp.rs -o "$work/stamp" >&2 \
    || rustc -O --edition 2024 bench/stamp.rs -o "$work/stamp" >&2
mkdir -p bench/out
python3 bench/engine.py "$PWD/target/release/qsem" "$work/stamp" "$work" "$@" | tee bench/out/engine.md
