#!/bin/sh
# Builds qsem and installs it: the binary, the manual, shell completions, and
# (on request) a `sem` link for GNU sem's command lines.
#
#   ./install.sh [--with-sem-link] [--uninstall]
#
# PREFIX defaults to ~/.local for a user and /usr/local for root; DESTDIR is
# prepended to every path, for packagers.
set -eu

usage() {
    echo "usage: [PREFIX=dir] [DESTDIR=dir] ./install.sh [--with-sem-link] [--uninstall]" >&2
    exit 2
}

with_sem_link=0
uninstall=0
for arg in "$@"; do
    case $arg in
        --with-sem-link) with_sem_link=1 ;;
        --uninstall) uninstall=1 ;;
        -h|--help) usage ;;
        *) echo "install.sh: unknown option: $arg" >&2; usage ;;
    esac
done

if [ -z "${PREFIX:-}" ]; then
    if [ "$(id -u)" = 0 ]; then PREFIX=/usr/local; else PREFIX="$HOME/.local"; fi
fi
DESTDIR=${DESTDIR:-}
bindir="$DESTDIR$PREFIX/bin"
mandir="$DESTDIR$PREFIX/share/man/man1"
bashdir="$DESTDIR$PREFIX/share/bash-completion/completions"
zshdir="$DESTDIR$PREFIX/share/zsh/site-functions"
fishdir="$DESTDIR$PREFIX/share/fish/vendor_completions.d"
cd "$(dirname "$0")"

if [ "$uninstall" = 1 ]; then
    for f in "$bindir/qsem" "$mandir/qsem.1" "$bashdir/qsem" "$zshdir/_qsem" "$fishdir/qsem.fish"; do
        if [ -e "$f" ]; then rm -f "$f" && echo "removed $f"; fi
    done
    if [ "$(readlink "$bindir/sem" 2>/dev/null)" = qsem ]; then
        rm -f "$bindir/sem" && echo "removed $bindir/sem"
    fi
    exit 0
fi

command -v cargo >/dev/null 2>&1 || {
    echo "install.sh: cargo is needed to build qsem (https://rustup.rs)" >&2
    exit 1
}
# Linked statically as a position-independent executable (static-pie), with
# the release profile's LTO and panic=abort: no dynamic loader and no shared
# libraries to map at each start, which is most of a job's overhead
# (bench/RESULTS.md), while qsem's own code keeps its address randomisation.
# QSEM_STATIC=0 builds a plain dynamic binary; so does a host whose C library
# cannot be linked statically.
host=$(rustc -vV | sed -n 's/^host: //p')
if [ "${QSEM_STATIC:-1}" != 0 ] &&
    RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
        cargo build --release --locked --quiet --target "$host" --target-dir target/static; then
    bin=target/static/$host/release/qsem
else
    [ "${QSEM_STATIC:-1}" = 0 ] || echo "install.sh: a static build failed; building a dynamic one" >&2
    cargo build --release --locked --quiet
    bin=target/release/qsem
fi

mkdir -p "$bindir" "$mandir"
# Install through a temporary name, so that running qsem processes keep theirs.
cp "$bin" "$bindir/.qsem.new" && chmod 755 "$bindir/.qsem.new" && mv -f "$bindir/.qsem.new" "$bindir/qsem"
echo "installed $bindir/qsem"
cp man/qsem.1 "$mandir/qsem.1" && chmod 644 "$mandir/qsem.1"
echo "installed $mandir/qsem.1"

completion() { # shell, directory, file name
    mkdir -p "$2"
    "$bin" --completions "$1" > "$2/$3.tmp" && mv -f "$2/$3.tmp" "$2/$3"
    echo "installed $2/$3"
}
completion bash "$bashdir" qsem
completion zsh "$zshdir" _qsem
completion fish "$fishdir" qsem.fish

if [ "$with_sem_link" = 1 ]; then
    link="$bindir/sem"
    if [ -e "$link" ] && [ "$(readlink "$link" 2>/dev/null)" != qsem ]; then
        echo "install.sh: $link exists (GNU parallel's sem?); not replacing it" >&2
        exit 1
    fi
    ln -sfn qsem "$link"
    echo "installed $link -> qsem"
fi

case ":$PATH:" in
    *":$PREFIX/bin:"*) ;;
    *) echo "note: $PREFIX/bin is not on your PATH; add it, e.g. export PATH=\"$PREFIX/bin:\$PATH\"" ;;
esac
