#!/usr/bin/env bash
# Build (once, cached) bench/poissongen, the Poisson-paced SIP load generator of bench/poisson_bench.py, from
# its Go module (github.com/emiago/sipgo and its dependencies from the Go module proxy, pinned by go.sum).
# The binary is cached outside the repo under a name that hashes go.mod, go.sum and main.go, so a changed
# source builds anew and an unchanged one is never rebuilt. Prints the binary's path on the last line.
#
#   scripts/build-poissongen.sh           build (or reuse) the binary and print its path
#   scripts/build-poissongen.sh path      print where the binary is or would be (no build)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/bench/poissongen"
CACHE="${MIDREG_CACHE:-$HOME/.cache/kube-midregistrar}"
NICE="${RIG_NICE:-nice -n 10}"

log() { printf '[poissongen] %s\n' "$*" >&2; }

hash="$(cat "$SRC/go.mod" "$SRC/go.sum" "$SRC/main.go" | sha256sum | cut -c1-16)"
DIR="$CACHE/tools/poissongen-$hash"
BIN="$DIR/poissongen"

case "${1:-build}" in
path)
    echo "$BIN"
    exit 0
    ;;
build) ;;
*)
    echo "usage: $0 [build|path]" >&2
    exit 2
    ;;
esac

if [[ -x "$BIN" ]]; then
    log "cached in $DIR"
    echo "$BIN"
    exit 0
fi

GO="$(command -v go || true)"
if [[ -z "$GO" && -x /usr/local/go/bin/go ]]; then
    GO=/usr/local/go/bin/go
fi
if [[ -z "$GO" ]]; then
    log "go is required (the generator is built from Go modules)"
    exit 1
fi

mkdir -p "$DIR"
log "building $SRC with $("$GO" version | cut -d' ' -f3) into $DIR"
t0=$(date +%s)
(
    cd "$SRC"
    # -mod=readonly: go.mod and go.sum as committed, nothing resolved anew.
    CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false" $NICE "$GO" build -trimpath -ldflags "-s -w" \
        -o "$BIN.tmp.$$" .
)
mv "$BIN.tmp.$$" "$BIN"
log "built in $(($(date +%s) - t0)) s"
echo "$BIN"
