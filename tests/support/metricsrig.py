"""The metrics pipeline's binaries (scripts/metrics-rig.sh): Prometheus, promtool, prometheus-adapter and
metrics-server built from Go modules, and the Prometheus Operator's CRDs. The build is cached by version; the
first call of :func:`metrics_bindir` in a fresh cache builds them (minutes), every later one returns at once."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

from tests.support import REPO

METRICS_RIG = REPO / "scripts" / "metrics-rig.sh"


class MetricsRigError(RuntimeError):
    pass


@functools.cache
def metrics_bindir() -> Path:
    """Build (or reuse) the pipeline's binaries and return their directory."""
    proc = subprocess.run(
        ["bash", str(METRICS_RIG), "build"], check=False, capture_output=True, text=True, timeout=3600
    )
    if proc.returncode != 0:
        raise MetricsRigError(f"{METRICS_RIG} build failed (make metrics-rig):\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def promtool() -> Path:
    return metrics_bindir() / "promtool"


def operator_crds() -> list[Path]:
    """The PodMonitor, ServiceMonitor and PrometheusRule CRDs of the Prometheus Operator."""
    return sorted((metrics_bindir() / "crds").glob("*.yaml"))
