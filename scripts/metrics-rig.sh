#!/usr/bin/env bash
# The metrics pipeline of the node tier (tests/node/test_metrics.py) and of the rule checks: Prometheus and
# promtool, prometheus-adapter, metrics-server and kube-state-metrics built from the Go module proxy, plus the Prometheus
# Operator's CRDs (PodMonitor, ServiceMonitor, PrometheusRule) the chart's monitoring objects are checked
# against. Everything is cached by version outside the repo; a second run builds nothing.
#
#   scripts/metrics-rig.sh build     build (or reuse) everything; prints the directory on the last line
#   scripts/metrics-rig.sh bindir    print the cache directory (no build)
set -euo pipefail

PROMETHEUS_VERSION="${PROMETHEUS_VERSION:-v0.316.0}"   # the Go module of Prometheus 3.x
ADAPTER_VERSION="${ADAPTER_VERSION:-v0.12.0}"
METRICS_SERVER_VERSION="${METRICS_SERVER_VERSION:-v0.8.0}"
KSM_VERSION="${KSM_VERSION:-v2.19.1}"   # kube-state-metrics: the HPA and pod series the alerts read
PROM_OPERATOR_VERSION="${PROM_OPERATOR_VERSION:-v0.89.0}"   # only its CRD files are used
CACHE="${MIDREG_CACHE:-$HOME/.cache/kube-midregistrar}"
DIR="$CACHE/metrics/prometheus-$PROMETHEUS_VERSION-adapter-$ADAPTER_VERSION-ms-$METRICS_SERVER_VERSION-ksm-$KSM_VERSION"
NICE="${RIG_NICE:-nice -n 10}"
export GOFLAGS="${GOFLAGS:--buildvcs=false}"

log() { printf '[metrics-rig] %s\n' "$*" >&2; }

install_go() {
    # install_go BINARY PACKAGE@VERSION: `go install` into the cache unless the binary is there.
    local bin="$1" pkg="$2"
    if [[ -x "$DIR/$bin" ]]; then
        return 0
    fi
    log "building $bin from $pkg (CGO_ENABLED=0; slow cold)"
    local start tmp
    start=$(date +%s)
    tmp="$(mktemp -d)"
    CGO_ENABLED=0 GOBIN="$tmp" $NICE go install -trimpath -ldflags "-s -w" "$pkg"
    mv "$tmp"/* "$DIR/$bin"   # the one binary go named (…/v2 installs as kube-state-metrics)
    rm -rf "$tmp"
    log "$bin built in $(($(date +%s) - start)) s"
}

build_in_scratch() {
    # build_in_scratch BINARY MODULE VERSION PACKAGE: for modules whose version list the proxy refuses
    # (`go install pkg@version` asks for it): a scratch module requiring the exact version, then go build.
    local bin="$1" module="$2" version="$3" pkg="$4"
    if [[ -x "$DIR/$bin" ]]; then
        return 0
    fi
    local scratch="$CACHE/metrics/scratch-$bin-$version" start
    start=$(date +%s)
    log "building $bin from $module@$version in a scratch module (slow cold)"
    mkdir -p "$scratch"
    printf 'module midreg.local/%s\n\ngo 1.22\n\nrequire %s %s\n' "$bin" "$module" "$version" >"$scratch/go.mod"
    (cd "$scratch" && GOFLAGS=-mod=mod go get "$pkg@$version" >/dev/null 2>&1 || true)
    (cd "$scratch" && CGO_ENABLED=0 GOFLAGS=-mod=mod $NICE go build -trimpath -ldflags "-s -w" \
        -o "$DIR/$bin.tmp" "$pkg")
    mv "$DIR/$bin.tmp" "$DIR/$bin"
    log "$bin built in $(($(date +%s) - start)) s"
}

crds() {
    local out="$DIR/crds"
    if [[ -f "$out/.complete" ]]; then
        return 0
    fi
    log "fetching the Prometheus Operator CRDs ($PROM_OPERATOR_VERSION)"
    local src
    src="$(cd /tmp && GOFLAGS=-mod=mod go mod download -json \
        "github.com/prometheus-operator/prometheus-operator@$PROM_OPERATOR_VERSION" |
        sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')"
    mkdir -p "$out"
    for kind in podmonitors servicemonitors prometheusrules; do
        cp "$src/example/prometheus-operator-crd/monitoring.coreos.com_$kind.yaml" "$out/"
    done
    chmod -R u+w "$out"
    touch "$out/.complete"
}

build() {
    mkdir -p "$DIR"
    install_go prometheus "github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_VERSION"
    install_go promtool "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION"
    build_in_scratch prometheus-adapter sigs.k8s.io/prometheus-adapter "$ADAPTER_VERSION" \
        sigs.k8s.io/prometheus-adapter/cmd/adapter
    install_go metrics-server "sigs.k8s.io/metrics-server/cmd/metrics-server@$METRICS_SERVER_VERSION"
    install_go kube-state-metrics "k8s.io/kube-state-metrics/v2@$KSM_VERSION"
    crds
    log "metrics pipeline cached in $DIR"
    echo "$DIR"
}

case "${1:-build}" in
build) build ;;
bindir) echo "$DIR" ;;
*)
    echo "usage: $0 build|bindir" >&2
    exit 2
    ;;
esac
