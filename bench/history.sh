#!/bin/sh
# The journal's cost per job (issue 12, item 3): qsem -- true with the
# journal off, on, and on with a small limit that rotates often, interleaved.
# Builds qsem (release) and runs bench/history.py; results in bench/RESULTS.md.
#
#   bench/history.sh            2000 rounds (about a minute)
#   bench/history.sh 300        fewer rounds
set -eu
cd "$(dirname "$0")/.."
command -v python3 >/dev/null 2>&1 || { echo "history.sh: needs python3" >&2; exit 1; }
cargo build --release --locked >&2
work=$(mktemp -d "${TMPDIR:-/tmp}/qsem-bench-history.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
python3 bench/history.py "$PWD/target/release/qsem" "${1:-2000}" "$work"
