"""Session fixtures: a real control plane (built from Go modules, cached), the CRD, the operator's RBAC
identity, a registrar etcd, and the operator itself under kopf's KopfRunner.

Nothing here skips: when the binaries are missing, the fixture builds them (scripts/k8s-rig.sh build).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# The operator reads these when its handlers module is imported (the timer interval is fixed then).
os.environ.setdefault("MIDREG_OPERATOR_RESYNC_SECONDS", "2")
os.environ.setdefault("MIDREG_OPERATOR_RETRY_SECONDS", "2")
os.environ.setdefault("MIDREG_HANDOFF_SETTLE_SECONDS", "2")  # steps of a hand-off key rotation

from kopf.testing import KopfRunner

from tests.cluster.cluster_helpers import Cluster
from tests.support.controlplane import ControlPlane, control_plane
from tests.support.etcd import EtcdServer
from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "midregistrar.yaml"
RBAC = REPO / "operator" / "deploy" / "rbac.yaml"
OPERATOR_SUBJECT = (
    "/O=system:serviceaccounts/O=system:serviceaccounts:midreg-system"
    "/CN=system:serviceaccount:midreg-system:midreg-operator"
)


@pytest.fixture(scope="session")
def rig() -> Iterator[ControlPlane]:
    with control_plane(keep=bool(os.environ.get("MIDREG_RIG_KEEP"))) as cp:
        cp.add_fake_node("kwok-node-0")
        cp.kubectl("apply", "--server-side", "-f", str(CRD))
        cp.kubectl(
            "wait", "--for=condition=Established", "crd/midregistrars.sip.midregistrar.io", "--timeout=60s"
        )
        yield cp


@pytest.fixture(scope="session")
def cluster(rig: ControlPlane) -> Cluster:
    return Cluster(rig)


@pytest.fixture(scope="session")
def operator_kubeconfig(rig: ControlPlane) -> Path:
    """The operator's identity: its ServiceAccount with only the RBAC of operator/deploy/rbac.yaml."""
    rig.kubectl("create", "namespace", "midreg-system")
    rig.kubectl("apply", "-f", str(RBAC))
    return rig.identity_kubeconfig("midreg-operator", OPERATOR_SUBJECT)


@pytest.fixture(scope="session")
def registrar_etcd(rig: ControlPlane) -> Iterator[EtcdServer]:
    etcd = EtcdServer(rig.workdir, "registrar-etcd", compaction_retention="1h").start()
    yield etcd
    etcd.stop()


@pytest.fixture(scope="session")
def operator(rig: ControlPlane, operator_kubeconfig: Path) -> Iterator[KopfRunner]:
    old = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(operator_kubeconfig)
    # The sidecar injection webhook, served by this operator on loopback: the API server (on the host too)
    # calls it by URL; its certificate is made by the operator into midreg-system (tests/cluster/test_sidecar).
    port = free_port()
    os.environ.update(
        MIDREG_WEBHOOK_PORT=str(port),
        MIDREG_WEBHOOK_URL=f"https://127.0.0.1:{port}",
        MIDREG_WEBHOOK_NAMESPACE="midreg-system",
        MIDREG_WEBHOOK_SECRET="midreg-operator-webhook-tls",
    )
    runner = KopfRunner(
        ["run", "--all-namespaces", "--standalone", "--verbose", "-m", "midreg_operator.handlers"],
        timeout=60,
    )
    with runner:
        yield runner
    if old is None:
        os.environ.pop("KUBECONFIG", None)
    else:
        os.environ["KUBECONFIG"] = old
    assert runner.exception is None, runner.exception
    assert runner.exit_code == 0, runner.output[-3000:]
    # Everything the operator did, it did with the chart's RBAC alone: no request was refused. A 403 for a
    # namespace that is being deleted (the API server refuses new content there) is not an RBAC refusal.
    terminating = set(re.findall(r"in namespace (\S+) because it is being terminated", runner.output))
    refused = [
        line
        for line in runner.output.splitlines()
        if re.search(r'HTTP/1\.1" 403 |[Ff]orbidden', line)
        and not any(
            f"/namespaces/{ns}/" in line or f"[{ns}/" in line or f"namespace {ns} is being terminated" in line
            for ns in terminating
        )
    ]
    assert not refused, "\n".join(refused[:10])
    assert "Timer 'resync' succeeded" in runner.output, "the operator's log was not captured"


@pytest.fixture
def ns(cluster: Cluster) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
