"""Session fixtures of the node tier: one real node (tests/node/noderig.py) with its control plane, the chart
installed by the real helm from the images built here, the chart's etcd on a local volume, and Kamailio on
the host as the main registrar.

Nothing here skips: a missing prerequisite is an error that names the make target installing it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from midreg_operator.testing.rig import wait_for
from tests.helmkit import CHART, Helm
from tests.node import noderig

INTEGRATION = Path(__file__).resolve().parents[1] / "integration"
for extra in (INTEGRATION, INTEGRATION / "kamailio"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import thrkit  # noqa: E402

RELEASE = "kube-midregistrar"
SYSTEM_NS = "midreg-system"
ETCD_ENDPOINT = f"{RELEASE}-etcd.{SYSTEM_NS}.svc:2379"
ETCD_IMAGE_TAG = "v3.6.16"
STORAGE_CLASS = "midreg-local"


class Kube:
    """kubectl as cluster admin on the node's control plane, with JSON reads and waits."""

    def __init__(self, node: noderig.Node) -> None:
        self.node = node

    def __call__(self, *args: str, input: str | None = None, check: bool = True) -> str:
        return self.node.kubectl(*args, input=input, check=check).stdout

    def json(self, *args: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self(*args, "-o", "json"))
        return data

    def apply(self, obj: dict[str, Any] | str) -> None:
        self("apply", "-f", "-", input=obj if isinstance(obj, str) else json.dumps(obj))

    def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.json("get", "pods", "-n", namespace, "-l", selector)["items"]
        return items

    def ready_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return [p for p in self.pods(namespace, selector) if pod_ready(p)]

    def wait(self, fn: Any, timeout: float, what: str) -> None:
        try:
            wait_for(fn, timeout, what)
        except noderig.RigError as exc:
            raise AssertionError(f"{exc}\n{self.node.logs(8)}") from None


def pod_ready(pod: dict[str, Any]) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    conds = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


@pytest.fixture(scope="session")
def node() -> Iterator[noderig.Node]:
    with noderig.node() as n:
        yield n


@pytest.fixture(scope="session")
def kube(node: noderig.Node) -> Kube:
    return Kube(node)


@pytest.fixture(scope="session")
def kamailio(tmp_path_factory: pytest.TempPathFactory, node: noderig.Node) -> Iterator[thrkit.KamailioMain]:
    """The main registrar, on the host's end of the node's link (the pods reach it there)."""
    kam = thrkit.KamailioMain(
        tmp_path_factory.mktemp("kamailio-main"),
        auth=False,
        listen_ip=noderig.HOST_IP,
        extra_defines={"USE_PATH": 1},
    ).start()
    yield kam
    kam.stop()


def local_volume(node: noderig.Node, kube: Kube, name: str) -> None:
    """A local PersistentVolume for the chart's etcd (the node has no provisioner), owned by its user."""
    path = node.workdir / "volumes" / name
    path.mkdir(parents=True)
    os.chown(path, 10001, 10001)
    path.chmod(0o700)
    kube.apply(
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {"name": STORAGE_CLASS},
            "provisioner": "kubernetes.io/no-provisioner",
            "volumeBindingMode": "WaitForFirstConsumer",
        }
    )
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": name},
            "spec": {
                "capacity": {"storage": "4Gi"},
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": STORAGE_CLASS,
                "persistentVolumeReclaimPolicy": "Delete",
                "local": {"path": str(path)},
                "nodeAffinity": {
                    "required": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {
                                        "key": "kubernetes.io/hostname",
                                        "operator": "In",
                                        "values": [noderig.NODE_NAME],
                                    }
                                ]
                            }
                        ]
                    }
                },
            },
        }
    )


@pytest.fixture(scope="session")
def helm(node: noderig.Node) -> Helm:
    assert node.cp is not None
    return Helm(node.cp)


@pytest.fixture(scope="session")
def platform(node: noderig.Node, kube: Kube, helm: Helm) -> dict[str, float]:
    """`helm install` of the chart with the locally built operator image and the chart's etcd."""
    local_volume(node, kube, "etcd-data-0")
    t0 = time.monotonic()
    helm(
        "install",
        RELEASE,
        str(CHART),
        "-n",
        SYSTEM_NS,
        "--create-namespace",
        "--set", "etcd.enabled=true",
        "--set", "etcd.image.repository=ghcr.io/kube-midregistrar/etcd",
        "--set", f"etcd.image.tag={ETCD_IMAGE_TAG}",
        "--set", f"etcd.storage.storageClassName={STORAGE_CLASS}",
        "--set", "operator.resyncSeconds=5",
        "--set", "operator.retrySeconds=3",
        "--wait",
        "--timeout", "240s",
        timeout=300,
    )  # fmt: skip
    return {"helm_install_s": time.monotonic() - t0}
