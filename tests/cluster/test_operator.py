"""The MidRegistrar CRD and the operator against a real kube-apiserver, controller-manager, scheduler and
kwok (tests/cluster/conftest.py). The operator runs as its ServiceAccount with only operator/deploy/rbac.yaml.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kopf.testing import KopfRunner

from midreg_operator.etcd import EtcdGateway
from midreg_operator.render import CONFIG_HASH_ANNOTATION
from tests.cluster.cluster_helpers import Cluster, condition, midregistrar
from tests.support.controlplane import ControlPlane
from tests.support.etcd import EtcdServer
from tests.support.ports import free_port
from tests.support.process import Proc
from tests.support.wait import WaitTimeout, wait_for

pytestmark = pytest.mark.cluster

GROUP_RES = "midregistrars.sip.midregistrar.io"


def test_crd_is_established_with_short_name(cluster: Cluster) -> None:
    crd = cluster.get("crd", GROUP_RES)
    assert crd is not None
    conds = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conds["Established"] == "True" and conds["NamesAccepted"] == "True"
    out = cluster.kubectl("api-resources", "--api-group=sip.midregistrar.io", "--no-headers").stdout
    assert "midreg" in out and "MidRegistrar" in out


INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("expires-order", {"expires": {"min": 600, "default": 60, "max": 3600}}, "min <= default <= max"),
    ("outgoing-below-max", {"outgoingExpires": 1800}, "outgoingExpires must be above expires.max"),
    ("not-sip-uri", {"mainRegistrar": "http://pbx.example.com"}, "mainRegistrar must be a SIP URI"),
    (
        "port-range",
        {"transports": [{"protocol": "udp", "port": 70000}]},
        "transport port must be within 1-65535",
    ),
    ("http-port", {"httpPort": 0}, "httpPort must be within 1-65535"),
    (
        "autoscaling-order",
        {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}},
        "autoscaling.minReplicas must not exceed autoscaling.maxReplicas",
    ),
    ("mode-enum", {"mode": "proxy"}, 'Unsupported value: "proxy"'),
    (
        "etcd-prefix",
        {"etcd": {"endpoints": ["e:2379"], "prefix": "noslash"}},
        "etcd prefix must start and end",
    ),
    (
        "tls-without-secret",
        {"transports": [{"protocol": "udp", "port": 5060}, {"protocol": "tls", "port": 5061}]},
        "a tls or wss transport needs spec.tls.secretName",
    ),
    (
        "trusted-source",
        {"limits": {"trustedSources": ["192.0.2.0/24", "sbc.example.com"]}},
        "limits.trustedSources entries must be IP addresses or CIDRs",
    ),
    ("negative-rate", {"limits": {"sourceRateLimit": -1}}, "should be greater than or equal to 0"),
    (
        "etcd-tls-only",
        {
            "transports": [{"protocol": "tls", "port": 5061}],
            "tls": {"secretName": "sip-cert"},
            "etcd": {"endpoints": ["e:2379"]},
        },
        "keep one udp or tcp transport",
    ),
]


@pytest.mark.parametrize(("case", "spec", "message"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_midregistrar_is_rejected_by_the_api_server(
    cluster: Cluster, ns: str, case: str, spec: dict[str, Any], message: str
) -> None:
    proc = cluster.create(midregistrar(f"bad-{case}", ns, **spec))
    assert proc.returncode != 0, f"{case} was accepted"
    assert message in proc.stderr, proc.stderr


def test_a_tls_transport_with_its_secret_is_accepted(cluster: Cluster, ns: str) -> None:
    mr = midregistrar(
        "tls",
        ns,
        transports=[{"protocol": "tcp", "port": 5060}, {"protocol": "tls", "port": 5061}],
        tls={"secretName": "sip-cert"},
        etcd={"endpoints": ["e:2379"]},
    )
    out = cluster.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(mr)).stdout
    assert json.loads(out)["spec"]["tls"] == {"secretName": "sip-cert", "verifyClients": False}


def test_defaults_are_applied_by_the_api_server(cluster: Cluster, ns: str) -> None:
    out = cluster.kubectl(
        "create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(midregistrar("d", ns))
    ).stdout
    spec = json.loads(out)["spec"]
    assert spec["mode"] == "mirror" and spec["replicas"] == 2
    assert spec["expires"] == {"min": 60, "default": 3600, "max": 3600}
    assert spec["transports"] == [{"protocol": "udp", "port": 5060}, {"protocol": "tcp", "port": 5060}]


# --- one MidRegistrar through its life (tests below run in file order and share it) -------------------


@pytest.fixture(scope="module")
def life_ns(cluster: Cluster) -> Iterator[str]:
    name = f"life-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def alpha(cluster: Cluster, operator: KopfRunner, registrar_etcd: EtcdServer, life_ns: str) -> dict[str, Any]:
    gw = EtcdGateway([registrar_etcd.endpoint])
    prefix = f"/midregistrar/{life_ns}/alpha/"
    for key in [  # the registrar's own layout (registrar/store/etcd_layout.py): contact ids are numbers
        "aor/sip:alice@example.com",
        "aor/sip:alice@example.com/ct/101",
        "aor/sip:alice@example.com/ct/102",
        "aor/sip:bob@example.com",
        "aor/sip:bob@example.com/ct/201",
        "ctid/101",
    ]:
        gw.put(prefix + key, "{}")
    gw.put(f"/midregistrar/{life_ns}/other/aor/sip:carol@example.com", "{}")
    cluster.apply(midregistrar("alpha", life_ns, mode="aor", etcd={"endpoints": [registrar_etcd.endpoint]}))

    def ready() -> dict[str, Any] | None:
        obj = cluster.get("midreg", "alpha", life_ns)
        return obj if condition(obj, "Ready").get("status") == "True" else None

    return wait_for(ready, 90, "MidRegistrar alpha Ready")


def test_valid_midregistrar_yields_owned_objects(
    cluster: Cluster, alpha: dict[str, Any], life_ns: str
) -> None:
    uid = alpha["metadata"]["uid"]
    for kind, name in [
        ("configmap", "alpha-config"),
        ("deployment", "alpha"),
        ("service", "alpha"),
        ("service", "alpha-peers"),
        ("pdb", "alpha"),
        ("serviceaccount", "alpha-registrar"),
    ]:
        obj = cluster.get(kind, name, life_ns)
        assert obj is not None, f"{kind}/{name} missing"
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner["uid"] == uid and owner["controller"] is True
    cm = cluster.get("configmap", "alpha-config", life_ns)
    assert cm is not None
    config = yaml.safe_load(cm["data"]["config.yaml"])
    assert config["mode"] == "aor" and config["store"] == "etcd"
    assert config["etcd_prefix"] == f"/midregistrar/{life_ns}/alpha/"
    dep = cluster.get("deployment", "alpha", life_ns)
    assert dep is not None
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert CONFIG_HASH_ANNOTATION in dep["spec"]["template"]["metadata"]["annotations"]
    svc = cluster.get("service", "alpha", life_ns)
    assert svc is not None and svc["spec"]["type"] == "NodePort"
    assert svc["spec"]["externalTrafficPolicy"] == "Local"
    peers = cluster.get("service", "alpha-peers", life_ns)
    assert peers is not None and peers["spec"]["clusterIP"] == "None"
    pods = json.loads(
        cluster.kubectl(
            "get", "pods", "-n", life_ns, "-l", "app.kubernetes.io/instance=alpha", "-o", "json"
        ).stdout
    )["items"]
    assert len(pods) == 2
    assert all(p["status"]["phase"] == "Running" for p in pods)
    assert all(p["spec"]["nodeName"] == "kwok-node-0" for p in pods)


def test_status_tells_the_truth(cluster: Cluster, alpha: dict[str, Any], life_ns: str) -> None:
    st = alpha["status"]
    assert st["replicas"] == 2 and st["readyReplicas"] == 2 and st["readyText"] == "2/2"
    assert st["observedGeneration"] == alpha["metadata"]["generation"]
    assert st["selector"] == "app.kubernetes.io/instance=alpha,app.kubernetes.io/name=midregistrar"
    assert (st["aors"], st["contacts"], st["countsSource"]) == (2, 3, "etcd")
    assert condition(alpha, "Degraded")["status"] == "False"
    assert condition(alpha, "Progressing")["status"] == "False"
    table = cluster.kubectl("get", "midreg", "-n", life_ns).stdout.splitlines()
    assert table[0].split() == ["NAME", "MODE", "MAIN-REGISTRAR", "READY", "REPLICAS", "CONTACTS", "AGE"]
    assert table[1].split()[:6] == ["alpha", "aor", "sip:pbx.example.com:5060", "True", "2/2", "3"]


def test_spec_change_rolls_the_deployment(cluster: Cluster, alpha: dict[str, Any], life_ns: str) -> None:
    dep = cluster.get("deployment", "alpha", life_ns)
    assert dep is not None
    old_hash = dep["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
    cluster.kubectl(
        "patch",
        "midreg",
        "alpha",
        "-n",
        life_ns,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"expires": {"min": 30, "default": 1800, "max": 3600}}}),
    )

    def rolled() -> dict[str, Any] | None:
        d = cluster.get("deployment", "alpha", life_ns)
        ann = (d or {}).get("spec", {}).get("template", {}).get("metadata", {}).get("annotations", {})
        return d if ann.get(CONFIG_HASH_ANNOTATION, old_hash) != old_hash else None

    wait_for(rolled, 30, "config hash change on the pod template")
    cm = cluster.get("configmap", "alpha-config", life_ns)
    assert cm is not None and yaml.safe_load(cm["data"]["config.yaml"])["default_expires"] == 1800

    def ready_again() -> dict[str, Any] | None:
        obj = cluster.get("midreg", "alpha", life_ns)
        st = (obj or {}).get("status", {})
        fresh = st.get("observedGeneration") == (obj or {}).get("metadata", {}).get("generation")
        return obj if fresh and condition(obj, "Ready").get("status") == "True" else None

    wait_for(ready_again, 60, "Ready again after the rollout")
    pods = json.loads(
        cluster.kubectl(
            "get", "pods", "-n", life_ns, "-l", "app.kubernetes.io/instance=alpha", "-o", "json"
        ).stdout
    )["items"]
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    assert {p["metadata"]["annotations"][CONFIG_HASH_ANNOTATION] for p in live} != {old_hash}


def test_deleted_service_comes_back(cluster: Cluster, alpha: dict[str, Any], life_ns: str) -> None:
    before = cluster.get("service", "alpha", life_ns)
    assert before is not None
    cluster.kubectl("delete", "service", "alpha", "-n", life_ns)

    def back() -> dict[str, Any] | None:
        svc = cluster.get("service", "alpha", life_ns)
        return svc if svc and svc["metadata"]["uid"] != before["metadata"]["uid"] else None

    svc = wait_for(back, 30, "the SIP Service recreated")
    assert svc["spec"]["type"] == "NodePort"


def test_edited_deployment_is_repaired(cluster: Cluster, alpha: dict[str, Any], life_ns: str) -> None:
    cluster.kubectl(
        "patch",
        "deployment",
        "alpha",
        "-n",
        life_ns,
        "--type=json",
        "-p",
        json.dumps([{"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "evil:1"}]),
    )

    def repaired() -> bool:
        d = cluster.get("deployment", "alpha", life_ns)
        return bool(d) and d["spec"]["template"]["spec"]["containers"][0]["image"] != "evil:1"  # type: ignore[index]

    wait_for(repaired, 30, "the Deployment's image repaired")


def test_kubectl_scale_reaches_the_deployment(cluster: Cluster, alpha: dict[str, Any], life_ns: str) -> None:
    cluster.kubectl("scale", "midreg/alpha", "-n", life_ns, "--replicas=5")

    def scaled() -> bool:
        d = cluster.get("deployment", "alpha", life_ns)
        return bool(d) and d["spec"]["replicas"] == 5  # type: ignore[index]

    wait_for(scaled, 30, "Deployment replicas 5")

    def ready5() -> dict[str, Any] | None:
        obj = cluster.get("midreg", "alpha", life_ns)
        st = (obj or {}).get("status", {})
        return (
            obj if st.get("readyReplicas") == 5 and condition(obj, "Ready").get("status") == "True" else None
        )

    wait_for(ready5, 60, "5 ready registrar pods in status")
    scale = json.loads(
        cluster.kubectl("get", "midreg", "alpha", "-n", life_ns, "--subresource=scale", "-o", "json").stdout
    )
    assert scale["spec"]["replicas"] == 5 and scale["status"]["replicas"] == 5
    assert scale["status"]["selector"].startswith("app.kubernetes.io/instance=alpha")


def test_delete_collects_owned_objects_and_cleans_etcd(
    cluster: Cluster, alpha: dict[str, Any], life_ns: str, registrar_etcd: EtcdServer
) -> None:
    gw = EtcdGateway([registrar_etcd.endpoint])
    assert gw.counts(f"/midregistrar/{life_ns}/alpha/") is not None
    cluster.kubectl("delete", "midreg", "alpha", "-n", life_ns, "--timeout=60s")
    wait_for(lambda: cluster.get("midreg", "alpha", life_ns) is None, 30, "MidRegistrar gone")
    for kind, name in [
        ("deployment", "alpha"),
        ("service", "alpha"),
        ("service", "alpha-peers"),
        ("configmap", "alpha-config"),
        ("pdb", "alpha"),
        ("serviceaccount", "alpha-registrar"),
    ]:
        wait_for(lambda k=kind, n=name: cluster.get(k, n, life_ns) is None, 60, f"{kind}/{name} collected")
    left = gw.call(
        "/v3/kv/range", {"key": _b64(f"/midregistrar/{life_ns}/alpha/"), "range_end": _b64_end(life_ns)}
    )
    assert int(left.get("count", 0)) == 0
    other = gw.counts(f"/midregistrar/{life_ns}/other/")
    assert other is not None and other.aors == 1, "another MidRegistrar's prefix must survive"


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


def _b64_end(ns: str) -> str:
    import base64

    from midreg_operator.etcd import prefix_range_end

    return base64.b64encode(prefix_range_end(f"/midregistrar/{ns}/alpha/".encode())).decode()


# --- independent behaviours ----------------------------------------------------------------------------


def test_missing_secret_degrades_then_recovers(cluster: Cluster, operator: KopfRunner, ns: str) -> None:
    cluster.apply(midregistrar("creds", ns, replicas=1, etcd={"secretName": "etcd-creds"}))

    def degraded() -> dict[str, Any] | None:
        c = condition(cluster.get("midreg", "creds", ns), "Degraded")
        return c if c.get("status") == "True" else None

    c = wait_for(degraded, 30, "Degraded condition")
    assert c["reason"] == "SecretNotFound"
    assert f"{ns}/etcd-creds" in c["message"]
    assert cluster.get("deployment", "creds", ns) is not None  # the rest is still applied
    cluster.kubectl("create", "secret", "generic", "etcd-creds", "-n", ns, "--from-literal=username=u")

    def healed() -> bool:
        obj = cluster.get("midreg", "creds", ns)
        return (
            condition(obj, "Degraded").get("status") == "False"
            and condition(obj, "Ready").get("status") == "True"
        )

    try:
        wait_for(healed, 30, "Degraded cleared and Ready once the Secret exists")
    except WaitTimeout as exc:
        pods = cluster.kubectl("get", "pods,events", "-n", ns, "-o", "wide").stdout
        raise AssertionError(f"{exc}\n{pods}\n{cluster.get('midreg', 'creds', ns)}") from None


def test_hpa_drives_replicas_through_the_scale_subresource(
    cluster: Cluster, operator: KopfRunner, ns: str
) -> None:
    cluster.apply(
        midregistrar(
            "auto", ns, replicas=1, autoscaling={"enabled": True, "minReplicas": 3, "maxReplicas": 4}
        )
    )
    hpa = wait_for(lambda: cluster.get("hpa", "auto", ns), 30, "HPA created")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "sip.midregistrar.io/v1alpha1",
        "kind": "MidRegistrar",
        "name": "auto",
    }
    # The real HPA controller raises the MidRegistrar to minReplicas through /scale; the operator follows.
    wait_for(
        lambda: (cluster.get("deployment", "auto", ns) or {}).get("spec", {}).get("replicas") == 3,
        60,
        "HPA minReplicas carried to the Deployment",
    )
    cluster.kubectl(
        "patch",
        "midreg",
        "auto",
        "-n",
        ns,
        "--type=merge",
        "-p",
        '{"spec":{"autoscaling":{"enabled":false}}}',
    )
    wait_for(lambda: cluster.get("hpa", "auto", ns) is None, 30, "HPA removed when autoscaling is off")


def test_host_network_mode(cluster: Cluster, operator: KopfRunner, ns: str) -> None:
    cluster.apply(midregistrar("edge", ns, replicas=1, network={"mode": "hostNetwork"}))
    dep = wait_for(lambda: cluster.get("deployment", "edge", ns), 30, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    obj = wait_for(
        lambda: (
            (o := cluster.get("midreg", "edge", ns)) and condition(o, "Ready").get("status") == "True" and o
        ),
        60,
        "hostNetwork MidRegistrar Ready",
    )
    assert obj["status"].get("contacts") is None and obj["status"]["countsSource"].startswith("unknown")


def test_finalizer_retries_while_etcd_is_unreachable(
    cluster: Cluster, operator: KopfRunner, rig: ControlPlane, ns: str
) -> None:
    port = free_port()
    cluster.apply(midregistrar("lost", ns, replicas=1, etcd={"endpoints": [f"127.0.0.1:{port}"]}))
    wait_for(
        lambda: condition(cluster.get("midreg", "lost", ns), "Degraded").get("reason") == "EtcdUnreachable",
        30,
        "Degraded EtcdUnreachable while running",
    )
    cluster.kubectl("delete", "midreg", "lost", "-n", ns, "--wait=false")

    def pending() -> dict[str, Any] | None:
        obj = cluster.get("midreg", "lost", ns)
        c = condition(obj, "Degraded")
        return c if c.get("reason") == "EtcdCleanupPending" else None

    c = wait_for(pending, 30, "EtcdCleanupPending condition")
    assert "retrying" in c["message"] and f"127.0.0.1:{port}" in c["message"]
    obj = cluster.get("midreg", "lost", ns)
    assert obj is not None and obj["metadata"].get("deletionTimestamp")
    assert "sip.midregistrar.io/etcd-cleanup" in obj["metadata"]["finalizers"]
    etcd = EtcdServer(rig.workdir, f"late-etcd-{port}", client_port=port, compaction_retention="1h").start()
    try:
        wait_for(
            lambda: cluster.get("midreg", "lost", ns) is None, 30, "deletion completes once etcd is back"
        )
    finally:
        etcd.stop()


def test_operator_rbac_is_least_privilege(cluster: Cluster, operator_kubeconfig: Any) -> None:
    def can(*args: str) -> bool:
        proc = cluster.kubectl("auth", "can-i", *args, check=False, kubeconfig=operator_kubeconfig)
        return proc.stdout.strip() == "yes"

    allowed = [
        ("watch", "midregistrars.sip.midregistrar.io", "-A"),
        ("patch", "midregistrars.sip.midregistrar.io/status", "-n", "x"),
        ("patch", "deployments.apps", "-n", "x"),
        ("create", "services", "-n", "x"),
        ("delete", "horizontalpodautoscalers.autoscaling", "-n", "x"),
        ("delete", "networkpolicies.networking.k8s.io", "-n", "x"),
        ("get", "secrets", "-n", "x"),
        ("create", "events", "-n", "x"),
    ]
    denied = [
        ("delete", "deployments.apps", "-n", "x"),
        ("delete", "services", "-n", "x"),
        ("list", "secrets", "-n", "x"),
        ("create", "pods", "-n", "x"),
        ("delete", "midregistrars.sip.midregistrar.io", "-n", "x"),
        ("create", "customresourcedefinitions.apiextensions.k8s.io"),
        ("create", "clusterroles.rbac.authorization.k8s.io"),
        ("delete", "nodes"),
        ("impersonate", "serviceaccounts", "-n", "x"),
        ("create", "pods/exec", "-n", "x"),
    ]
    for args in allowed:
        assert can(*args), f"operator should be allowed: {args}"
    for args in denied:
        assert not can(*args), f"operator must not be allowed: {args}"


def test_operator_process_serves_liveness_and_logs_json(
    cluster: Cluster, rig: ControlPlane, operator_kubeconfig: Any, ns: str
) -> None:
    """The shipped entry point (`midregistrar-operator`), namespace-scoped, as the Deployment would run it."""
    import sys
    import urllib.request
    from pathlib import Path

    port = free_port()
    exe = Path(sys.executable).parent / "midregistrar-operator"
    argv = [
        str(exe),
        "--namespace",
        ns,
        "--liveness",
        f"http://127.0.0.1:{port}/healthz",
        "--log-format",
        "json",
    ]
    proc = Proc(argv, rig.workdir, f"operator-{ns}", env={"KUBECONFIG": str(operator_kubeconfig)})
    try:

        def live() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False

        wait_for(live, 30, "operator liveness endpoint")
        cluster.apply(midregistrar("scoped", ns, replicas=1))
        wait_for(
            lambda: cluster.get("deployment", "scoped", ns), 30, "Deployment from the namespaced operator"
        )
    finally:
        proc.stop()
    lines = [line for line in proc.output().splitlines() if line.strip()]
    assert lines
    for line in lines:
        assert isinstance(json.loads(line), dict), line
