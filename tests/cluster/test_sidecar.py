"""Sidecar mode on a real API server: the operator (KopfRunner, with its chart RBAC) serves the injection
webhook on loopback and keeps the MutatingWebhookConfiguration; the API server calls it for the pods of a
PBX Deployment labelled for a sidecar MidRegistrar, and the stored pods carry the registrar container. The
CRD's CEL rules refuse what a sidecar cannot have. When the API server cannot trust the webhook (its CA
replaced in the configuration), failurePolicy Fail refuses the pod and Ignore creates it without the sidecar,
which the operator then reports (event, status). Pods run on kwok's simulated node: nothing executes."""

from __future__ import annotations

import base64
import json
import socket
import time
from typing import Any

import pytest

from midreg_operator.webhook import new_ca
from tests.cluster.cluster_helpers import Cluster, condition, midregistrar
from tests.support.wait import poll

pytestmark = pytest.mark.cluster

LABEL = "sip.midregistrar.io/sidecar"
CONFIGURATION = "midregistrar-sidecar"


def sidecar_midregistrar(name: str, ns: str, policy: str = "Fail") -> dict[str, Any]:
    obj = midregistrar(name, ns, deployment="sidecar", sidecar={"pbxPort": 5070, "failurePolicy": policy})
    del obj["spec"]["mainRegistrar"]  # a sidecar relays to the PBX on the pod's loopback
    return obj


def pbx_pod(name: str, ns: str, midreg: str) -> dict[str, Any]:
    """A bare PBX pod labelled for ``midreg``'s sidecar."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": "pbx", LABEL: midreg}},
        "spec": {"containers": [{"name": "pbx", "image": "kamailio:test"}]},
    }


def pbx_deployment(name: str, ns: str, midreg: str, replicas: int = 1) -> dict[str, Any]:
    labels = {"app": name, LABEL: midreg}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {
                            "name": "pbx",
                            "image": "kamailio:test",
                            "ports": [
                                {"name": "sip-udp", "containerPort": 5060, "protocol": "UDP"},
                                {"name": "sip-tcp", "containerPort": 5060, "protocol": "TCP"},
                            ],
                        }
                    ]
                },
            },
        },
    }


def webhook_entry(cluster: Cluster, name: str, ns: str) -> dict[str, Any] | None:
    conf = cluster.get("mutatingwebhookconfiguration", CONFIGURATION)
    for hook in (conf or {}).get("webhooks") or []:
        if hook["name"] == f"{name}.{ns}.sidecar.sip.midregistrar.io":
            return dict(hook)
    return None


def pods(cluster: Cluster, ns: str, app: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", "pods", "-n", ns, "-l", f"app={app}", "-o", "json").stdout
    return list(json.loads(out)["items"])


def test_pbx_pods_get_the_sidecar_and_the_status_counts_them(
    cluster: Cluster, operator: Any, ns: str
) -> None:
    cluster.apply(sidecar_midregistrar("edge", ns))
    hook = poll(lambda: webhook_entry(cluster, "edge", ns), 30)
    assert hook, "the operator adds the webhook entry"
    assert hook["failurePolicy"] == "Fail" and hook["objectSelector"] == {"matchLabels": {LABEL: "edge"}}
    assert hook["clientConfig"]["url"].endswith("/sidecar") and hook["clientConfig"]["caBundle"]
    cm = poll(lambda: cluster.get("configmap", "edge-config", ns), 30)
    assert cm and "main_registrar: sip:127.0.0.1:5070" in cm["data"]["config.yaml"]
    assert cluster.get("deployment", "edge", ns) is None and cluster.get("service", "edge", ns) is None

    cluster.apply(pbx_deployment("pbx", ns, "edge", replicas=2))
    made = poll(lambda: len(pods(cluster, ns, "pbx")) == 2 and pods(cluster, ns, "pbx"), 60)
    assert made, "the ReplicaSet creates both pods through the webhook"
    for pod in made:
        pbx, mid = pod["spec"]["containers"]
        assert mid["name"] == "midregistrar" and mid["args"][-1] == "/etc/midregistrar/config.yaml"
        assert "ports" not in pbx, "the PBX's SIP ports moved to the sidecar"
        assert {"name": "MIDREGISTRAR_PBX_PORT", "value": "5070"} in pbx["env"]
        assert {v["name"] for v in pod["spec"]["volumes"]} >= {"midreg-config"}
        assert pod["metadata"]["annotations"]["sip.midregistrar.io/injected"]

    def counted() -> dict[str, Any] | None:
        st = (cluster.get("midregistrar", "edge", ns) or {}).get("status") or {}
        return st if st.get("injectedPods") == 2 and st.get("readyInjectedPods") == 2 else None

    status = poll(counted, 60)
    assert status, cluster.get("midregistrar", "edge", ns)
    assert status["readyText"] == "2/2 injected" and status["notInjectedPods"] == 0
    assert condition(cluster.get("midregistrar", "edge", ns), "Ready")["reason"] == "SidecarsReady"

    # The MidRegistrar goes: so does its entry, and new PBX pods are created plain.
    cluster.kubectl("delete", "midregistrar", "edge", "-n", ns)
    assert poll(lambda: webhook_entry(cluster, "edge", ns) is None, 30)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sidecar": None}, "needs spec.sidecar.pbxPort"),
        ({"autoscaling": {"enabled": True}}, "a sidecar has no HPA"),
        ({"replicas": 3}, "a sidecar has no replicas of its own"),
        ({"sidecar": {"pbxPort": 5060}}, "sidecar.pbxPort must differ from every transport port"),
    ],
)
def test_the_crd_refuses_what_a_sidecar_cannot_have(
    cluster: Cluster, ns: str, change: dict[str, Any], message: str
) -> None:
    obj = sidecar_midregistrar("bad", ns)
    for key, value in change.items():
        if value is None:
            obj["spec"].pop(key)
        else:
            obj["spec"][key] = value
    proc = cluster.create(obj)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_the_shape_cannot_change(cluster: Cluster, ns: str) -> None:
    """A tier of pods never becomes a sidecar in place (nor back): its objects and its PBX pods would have
    to be swapped under the phones; a new MidRegistrar does that in the open."""
    cluster.apply(midregistrar("tier", ns))
    patch = {"spec": {"deployment": "sidecar", "sidecar": {"pbxPort": 5070}}}
    proc = cluster.kubectl(
        "patch", "midregistrar", "tier", "-n", ns, "--type=merge", "-p", json.dumps(patch), check=False
    )
    assert proc.returncode != 0 and "spec.deployment cannot change" in proc.stderr, proc.stderr


def test_a_tier_without_main_registrar_is_refused(cluster: Cluster, ns: str) -> None:
    obj = midregistrar("tier", ns)
    del obj["spec"]["mainRegistrar"]
    proc = cluster.create(obj)
    assert proc.returncode != 0 and "spec.mainRegistrar is required" in proc.stderr


@pytest.mark.parametrize("policy", ["Fail", "Ignore"])
def test_an_untrusted_webhook_fails_closed_or_open_as_declared(
    cluster: Cluster, operator: Any, ns: str, policy: str
) -> None:
    name = f"pol-{policy.lower()}"
    cluster.apply(sidecar_midregistrar(name, ns, policy))
    assert poll(lambda: webhook_entry(cluster, name, ns), 30)
    # The API server no longer trusts the webhook's certificate: another CA in the entry. The operator puts
    # its own back at its next resync (2 s here); when that came between the two steps, try again.
    stranger = base64.b64encode(new_ca()[0]).decode()
    pod = pbx_pod("pbx-0", ns, name)
    for _ in range(5):
        conf = cluster.get("mutatingwebhookconfiguration", CONFIGURATION)
        assert conf is not None
        index = next(i for i, h in enumerate(conf["webhooks"]) if h["name"].startswith(f"{name}.{ns}."))
        patch = [{"op": "replace", "path": f"/webhooks/{index}/clientConfig/caBundle", "value": stranger}]
        cluster.kubectl(
            "patch", "mutatingwebhookconfiguration", CONFIGURATION, "--type=json", "-p", json.dumps(patch)
        )
        proc = cluster.create(pod)
        stored = cluster.get("pod", "pbx-0", ns) if proc.returncode == 0 else None
        if stored is None or len(stored["spec"]["containers"]) == 1:
            break  # the untrusted webhook was called
        cluster.kubectl("delete", "pod", "pbx-0", "-n", ns, "--grace-period=0", "--force")  # restored first
    if policy == "Fail":
        assert proc.returncode != 0, "fail closed: no PBX pod without its sidecar"
        assert "failed calling webhook" in proc.stderr and "sidecar.sip.midregistrar.io" in proc.stderr, (
            proc.stderr
        )
        return
    assert proc.returncode == 0, proc.stderr
    assert stored and [c["name"] for c in stored["spec"]["containers"]] == ["pbx"], "fail open: created plain"

    def reported() -> bool:
        st = (cluster.get("midregistrar", name, ns) or {}).get("status") or {}
        events = cluster.kubectl(
            "get", "events", "-n", ns, "--field-selector", "involvedObject.name=pbx-0", "-o", "json"
        ).stdout
        return st.get("notInjectedPods") == 1 and "SidecarNotInjected" in events

    assert poll(reported, 60), cluster.get("midregistrar", name, ns)
    degraded = condition(cluster.get("midregistrar", name, ns), "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "SidecarNotInjected"
    # The operator restores its own CA: a new pod is injected again.
    assert poll(lambda: webhook_entry(cluster, name, ns)["clientConfig"]["caBundle"] != stranger, 30)  # type: ignore[index]
    pod["metadata"]["name"] = "pbx-1"
    assert cluster.create(pod).returncode == 0
    again = cluster.get("pod", "pbx-1", ns)
    assert again and [c["name"] for c in again["spec"]["containers"]] == ["pbx", "midregistrar"]


def test_admission_does_not_wait_behind_reconciles(cluster: Cluster, operator: Any, ns: str) -> None:
    """The API server gives the webhook 10 s; reconciles have no deadline. 24 MidRegistrars name etcd endpoints
    that accept connections and never answer: each reconcile waits 3 s on each of three, every 2 s (the
    resync here), which keeps all eight workers busy with more queued. A PBX pod is still injected at once
    (before, its admission queued behind them and the pod was refused)."""
    silent = [socket.create_server(("127.0.0.1", 0), backlog=1024) for _ in range(3)]  # never accepted
    busy = [f"busy-{i}" for i in range(24)]
    try:
        endpoints = [f"127.0.0.1:{s.getsockname()[1]}" for s in silent]
        for name in busy:
            obj = midregistrar(name, ns, etcd={"endpoints": endpoints})
            obj["metadata"]["annotations"] = {"sip.midregistrar.io/skip-etcd-cleanup": "true"}
            cluster.apply(obj)
        cluster.apply(sidecar_midregistrar("edge", ns))
        assert poll(lambda: webhook_entry(cluster, "edge", ns), 60)

        def unreachable() -> int:
            objs = [cluster.get("midregistrar", name, ns) or {} for name in busy]
            return sum("etcd unreachable" in json.dumps(o.get("status") or {}) for o in objs)

        assert poll(lambda: unreachable() == len(busy), 120), unreachable()  # every worker has waited on one
        pod = pbx_pod("pbx-0", ns, "edge")
        start = time.monotonic()
        proc = cluster.create(pod)
        took = time.monotonic() - start
        assert proc.returncode == 0, f"{proc.stderr} (after {took:.1f} s)"
        stored = cluster.get("pod", "pbx-0", ns)
        assert stored and [c["name"] for c in stored["spec"]["containers"]] == ["pbx", "midregistrar"]
        assert took < 5, took
    finally:
        for s in silent:
            s.close()  # etcd calls now fail at once: the workers drain for the tests that follow
        cluster.kubectl("delete", "midregistrar", "-n", ns, *busy, "--wait=false", check=False)
        poll(lambda: not any(cluster.get("midregistrar", name, ns) for name in busy), 60)
