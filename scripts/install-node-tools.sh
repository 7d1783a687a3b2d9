#!/usr/bin/env bash
# Install what the node tier of the tests and `make image` need, from Debian, when missing: containerd, runc,
# the CNI plugins, iptables (kube-proxy), buildah and debootstrap (images without Docker). Idempotent and fast
# when present. Nothing is started here: tests/support/node.py runs containerd with its own config.
set -euo pipefail

need=()
command -v containerd >/dev/null 2>&1 || need+=(containerd)
command -v runc >/dev/null 2>&1 || need+=(runc)
[ -x /usr/lib/cni/ptp ] || need+=(containernetworking-plugins)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
command -v buildah >/dev/null 2>&1 || need+=(buildah)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v nsenter >/dev/null 2>&1 || need+=(util-linux)
[ "${#need[@]}" -eq 0 ] && exit 0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install-node-tools: need root to install: ${need[*]}" >&2; exit 1; }
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
apt_install() {
    $SUDO apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@"
}
echo "install-node-tools: installing ${need[*]}" >&2
if ! apt_install "${need[@]}"; then
    $SUDO apt-get update -q
    apt_install "${need[@]}"
fi
# The Debian package may start a containerd service on /run/containerd; the rig runs its own.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now containerd >/dev/null 2>&1 || true
fi
