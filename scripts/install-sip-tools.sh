#!/usr/bin/env bash
# Install the SIP peers used by tests/integration and bench/: SIPp (Debian `sip-tester`), Kamailio (with
# its TLS module), baresip (Debian `baresip-core`, a real phone: tests/integration/test_baresip.py) and
# libfaketime (tests/faults).
# Idempotent and fast when all are already present: it only calls apt when a binary is missing, and
# runs `apt-get update` only when the first install attempt fails without it.
set -euo pipefail

need=()
command -v sipp >/dev/null 2>&1 || need+=(sip-tester)
if ! command -v kamailio >/dev/null 2>&1 && [ ! -x /usr/sbin/kamailio ]; then
    need+=(kamailio)
fi
# Kamailio's TLS module: the main registrar over TLS (tests/integration/test_tls.py).
if [ ! -f /usr/lib/x86_64-linux-gnu/kamailio/modules/tls.so ] && ! dpkg -s kamailio-tls-modules >/dev/null 2>&1; then
    need+=(kamailio-tls-modules)
fi
command -v baresip >/dev/null 2>&1 || need+=(baresip-core)
# libfaketime: a registrar process with its clock off (the clock-skew runs of tests/faults).
[ -f /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] || need+=(libfaketime)

if [ "${#need[@]}" -eq 0 ]; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install-sip-tools: need root (or sudo) to install: ${need[*]}" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
apt_install() {
    $SUDO apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@"
}

echo "install-sip-tools: installing ${need[*]}" >&2
if ! apt_install "${need[@]}"; then
    echo "install-sip-tools: retrying after apt-get update" >&2
    $SUDO apt-get update -q
    apt_install "${need[@]}"
fi

# The Debian package enables and starts a kamailio service on 0.0.0.0:5060; tests and benchmarks
# run their own instances on loopback, so stop the packaged one when it got started.
if [[ " ${need[*]} " == *" kamailio "* ]] && command -v systemctl >/dev/null 2>&1 \
    && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now kamailio >/dev/null 2>&1 || true
fi

command -v sipp >/dev/null
command -v baresip >/dev/null
command -v kamailio >/dev/null 2>&1 || [ -x /usr/sbin/kamailio ]
