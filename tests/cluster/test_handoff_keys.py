"""The pods' hand-off keys on a real API server: the operator (with its chart RBAC) makes the Secret
``<name>-handoff`` for a MidRegistrar with etcd, owned by it and mounted into its pods, and rotates it in three
steps when the MidRegistrar is annotated (settle time 2 s here, 120 s by default)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from tests.cluster.cluster_helpers import Cluster, midregistrar
from tests.support.etcd import EtcdServer
from tests.support.wait import poll

pytestmark = pytest.mark.cluster


def keys_of(secret: dict[str, Any] | None) -> list[str]:
    if not secret:
        return []
    return base64.b64decode(secret["data"]["keys"]).decode().split()


def test_hand_off_keys_are_made_mounted_and_rotated(
    cluster: Cluster, operator: Any, ns: str, registrar_etcd: EtcdServer
) -> None:
    cluster.apply(midregistrar("hk", ns, etcd={"endpoints": [registrar_etcd.endpoint]}))
    secret = poll(lambda: cluster.get("secret", "hk-handoff", ns), 30)
    assert secret, "the operator makes the hand-off keys"
    [first] = keys_of(secret)
    assert len(first) == 64
    mr = cluster.get("midregistrar", "hk", ns)
    assert mr is not None
    (owner,) = secret["metadata"]["ownerReferences"]
    assert owner["uid"] == mr["metadata"]["uid"] and owner["controller"] is True
    deployment = poll(lambda: cluster.get("deployment", "hk", ns), 30)
    assert deployment
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert any(v["name"] == "handoff" and v["secret"]["secretName"] == "hk-handoff" for v in volumes)
    cm = cluster.get("configmap", "hk-config", ns)
    assert cm and "handoff_key_file: /etc/midregistrar/handoff/keys" in cm["data"]["config.yaml"]

    cluster.kubectl("annotate", "midregistrar", "hk", "-n", ns, "sip.midregistrar.io/rotate-handoff-key=r1")
    seen: list[list[str]] = []

    def step(keys: list[str]) -> bool:
        if not seen or seen[-1] != keys:
            seen.append(keys)
        return len(keys) == 1 and keys[0] != first

    assert poll(lambda: step(keys_of(cluster.get("secret", "hk-handoff", ns))), 60), seen
    new = seen[-1][0]
    # added second (accepted, unused), then first (in use, the old one still accepted), then alone
    assert [first, new] in seen and [new, first] in seen, seen
    assert seen.index([first, new]) < seen.index([new, first])
