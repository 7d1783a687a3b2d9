"""The NetworkPolicy per MidRegistrar on a real API server (issue 15): the CRD refuses bad peers, the
operator (with only operator/deploy/rbac.yaml, which the chart's RBAC equals) creates the policy, the API
server's own NetworkPolicy validation accepts it, a spec change reaches it, turning it off deletes it, and a
policy the API server refuses stops the rollout with a Degraded ApplyFailed condition.

Enforcement is not tested here: this control plane's pods run on kwok (no network), and the node tier's
bridge CNI does not enforce NetworkPolicies (docs/operator.md "Network policy")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kopf.testing import KopfRunner

from tests.cluster.cluster_helpers import Cluster, condition, midregistrar
from tests.support.etcd import EtcdServer
from tests.support.wait import wait_for

pytestmark = pytest.mark.cluster

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

OWN = {"app.kubernetes.io/instance": "np", "app.kubernetes.io/name": "midregistrar"}
MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}

INVALID: list[tuple[str, dict[str, Any], str]] = [
    (
        "ipblock-and-selector",
        {"networkPolicy": {"metricsFrom": [{"ipBlock": {"cidr": "10.0.0.0/8"}, **MONITORING}]}},
        "a peer is a namespaceSelector and/or a podSelector, or an ipBlock alone",
    ),
    ("empty-peer", {"networkPolicy": {"sipFrom": [{}]}}, "a peer is a namespaceSelector"),
    (
        "bad-cidr",
        {"networkPolicy": {"sipFrom": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}},
        "ipBlock.cidr must be an IPv4 or IPv6 CIDR",
    ),
    (
        "bad-except",
        {"networkPolicy": {"sipFrom": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.2.3"]}}]}},
        "ipBlock.except entries must be CIDRs",
    ),
    (
        "host-bits",  # the API server's NetworkPolicy validation refuses it: caught before, not as ApplyFailed
        {"networkPolicy": {"sipFrom": [{"ipBlock": {"cidr": "10.254.71.1/24"}}]}},
        "ipBlock.cidr must not have bits set beyond its prefix length",
    ),
    (
        "host-bits-except",
        {"networkPolicy": {"sipFrom": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.2.3/16"]}}]}},
        "ipBlock.except entries must not have bits set beyond their prefix length",
    ),
    (
        "bad-label-value",
        {"networkPolicy": {"metricsFrom": [{"namespaceSelector": {"matchLabels": {"team": "-ops"}}}]}},
        "matchLabels must hold label keys",
    ),
    (
        "in-without-values",
        {
            "networkPolicy": {
                "metricsFrom": [{"podSelector": {"matchExpressions": [{"key": "app", "operator": "In"}]}}]
            }
        },
        "In and NotIn need values",
    ),
    (
        "bad-operator",
        {
            "networkPolicy": {
                "metricsFrom": [
                    {
                        "podSelector": {
                            "matchExpressions": [{"key": "app", "operator": "Like", "values": ["x"]}]
                        }
                    }
                ]
            }
        },
        'Unsupported value: "Like"',
    ),
    (
        "sidecar-with-policy",
        {
            "deployment": "sidecar",
            "sidecar": {"pbxPort": 5070},
            "networkPolicy": {"metricsFrom": [MONITORING]},
        },
        "a sidecar has no NetworkPolicy of its own",
    ),
]


@pytest.mark.parametrize(("case", "spec", "message"), INVALID, ids=[c[0] for c in INVALID])
def test_bad_network_policy_specs_are_refused_by_the_api_server(
    cluster: Cluster, ns: str, case: str, spec: dict[str, Any], message: str
) -> None:
    proc = cluster.create(midregistrar(f"bad-{case}", ns, **spec))
    assert proc.returncode != 0, f"{case} was accepted"
    assert message in proc.stderr, proc.stderr


def test_good_peers_and_defaults_are_accepted(cluster: Cluster, ns: str) -> None:
    peers = [
        MONITORING,
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}},
        {"podSelector": {"matchExpressions": [{"key": "role", "operator": "Exists"}]}},
        {"ipBlock": {"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"]}},
        {"ipBlock": {"cidr": "2001:db8::/32"}},
    ]
    for name, spec in [
        ("peers", {"networkPolicy": {"metricsFrom": peers, "sipFrom": peers[3:]}}),
        ("empty", {"networkPolicy": {}}),
        (
            "sidecar-off",
            {"deployment": "sidecar", "sidecar": {"pbxPort": 5070}, "networkPolicy": {"enabled": False}},
        ),
    ]:
        mr = midregistrar(name, ns, **spec)
        out = cluster.kubectl(
            "create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(mr)
        ).stdout
        got = json.loads(out)["spec"]["networkPolicy"]
        assert got["enabled"] is (name != "sidecar-off"), got
        if name == "peers":
            assert got["metricsFrom"] == peers and got["sipFrom"] == peers[3:]


def _policy(cluster: Cluster, ns: str) -> dict[str, Any] | None:
    return cluster.get("networkpolicy", "np", ns)


def _patch(cluster: Cluster, ns: str, spec: dict[str, Any]) -> None:
    cluster.kubectl("patch", "midreg", "np", "-n", ns, "--type=merge", "-p", json.dumps({"spec": spec}))


def test_policy_is_created_updated_and_removed_by_the_operator(
    cluster: Cluster, operator: KopfRunner, registrar_etcd: EtcdServer, ns: str
) -> None:
    cluster.apply(
        midregistrar(
            "np",
            ns,
            transports=[{"protocol": "udp", "port": 5060}, {"protocol": "tcp", "port": 5060}],
            httpPort=9100,
            etcd={"endpoints": [registrar_etcd.endpoint]},
            networkPolicy={"metricsFrom": [MONITORING]},
        )
    )
    policy = wait_for(lambda: _policy(cluster, ns), 30, "NetworkPolicy np created")
    mr = cluster.get("midreg", "np", ns)
    assert mr is not None
    (owner,) = policy["metadata"]["ownerReferences"]
    assert owner["uid"] == mr["metadata"]["uid"] and owner["controller"] is True
    assert policy["spec"]["podSelector"] == {"matchLabels": OWN}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    sip, http = policy["spec"]["ingress"]
    assert sip == {"ports": [{"protocol": "UDP", "port": 5060}, {"protocol": "TCP", "port": 5060}]}
    assert http == {"from": [MONITORING], "ports": [{"protocol": "TCP", "port": 9100}]}
    # The policy selects the pods the Deployment makes (kwok runs them).
    pods = json.loads(
        cluster.kubectl("get", "pods", "-n", ns, "-l", "app.kubernetes.io/instance=np", "-o", "json").stdout
    )["items"]
    assert pods and all(OWN.items() <= p["metadata"]["labels"].items() for p in pods)

    # A spec change reaches the policy: other monitoring peers, SIP restricted to sources, hand-off kept.
    sources = [{"ipBlock": {"cidr": "203.0.113.0/24"}}]
    prometheus = {
        "namespaceSelector": {"matchLabels": {"team": "obs"}},
        "podSelector": {"matchLabels": {"app": "prom"}},
    }
    _patch(cluster, ns, {"networkPolicy": {"metricsFrom": [prometheus], "sipFrom": sources}})

    def updated() -> dict[str, Any] | None:
        p = _policy(cluster, ns)
        return p if p and len(p["spec"]["ingress"]) == 3 else None

    policy = wait_for(updated, 30, "NetworkPolicy np updated")
    sip, handoff, http = policy["spec"]["ingress"]
    assert sip["from"] == sources
    assert handoff == {
        "from": [{"podSelector": {"matchLabels": OWN}}],
        "ports": [{"protocol": "UDP", "port": 5060}],
    }
    assert http["from"] == [prometheus]

    # Deleted by hand: the operator puts it back.
    uid = policy["metadata"]["uid"]
    cluster.kubectl("delete", "networkpolicy", "np", "-n", ns)
    wait_for(
        lambda: (_policy(cluster, ns) or {}).get("metadata", {}).get("uid") not in (None, uid),
        30,
        "recreated",
    )

    # Turned off: the operator deletes it, and the MidRegistrar stays Ready.
    _patch(cluster, ns, {"networkPolicy": {"enabled": False}})
    wait_for(lambda: _policy(cluster, ns) is None, 30, "NetworkPolicy np deleted")

    def ready() -> dict[str, Any] | None:
        obj = cluster.get("midreg", "np", ns) or {}
        fresh = obj.get("status", {}).get("observedGeneration") == obj.get("metadata", {}).get("generation")
        return obj if fresh and condition(obj, "Ready").get("status") == "True" else None

    wait_for(ready, 60, "Ready with the policy turned off")
    assert _policy(cluster, ns) is None

    # Turned on again: back.
    _patch(cluster, ns, {"networkPolicy": {"enabled": True}})
    wait_for(lambda: _policy(cluster, ns), 30, "NetworkPolicy np re-created")


def test_a_user_policy_of_the_same_name_is_never_deleted(
    cluster: Cluster, operator: KopfRunner, ns: str
) -> None:
    """Turning the policy off deletes only the operator's own (owner reference and uid precondition)."""
    theirs = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "np", "namespace": ns},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    }
    cluster.apply(theirs)
    cluster.apply(midregistrar("np", ns, networkPolicy={"enabled": False}))

    def ready() -> dict[str, Any] | None:
        obj = cluster.get("midreg", "np", ns) or {}
        return obj if condition(obj, "Ready").get("status") == "True" else None

    wait_for(ready, 60, "MidRegistrar np Ready")
    kept = _policy(cluster, ns)
    assert kept is not None and not kept["metadata"].get("ownerReferences")


def test_a_policy_the_api_server_refuses_stops_the_rollout_with_a_clear_condition(
    cluster: Cluster, operator: KopfRunner, ns: str
) -> None:
    """An `except` outside its `cidr` passes the CRD's checks but not the API server's NetworkPolicy
    validation: the MidRegistrar is Degraded (ApplyFailed, with the API server's message), and no pod starts
    without its policy."""
    bad = [{"ipBlock": {"cidr": "192.0.2.0/24", "except": ["198.51.100.0/25"]}}]
    cluster.apply(midregistrar("np", ns, networkPolicy={"metricsFrom": bad}))

    def degraded() -> dict[str, Any] | None:
        c = condition(cluster.get("midreg", "np", ns), "Degraded")
        return c if c.get("reason") == "ApplyFailed" else None

    c = wait_for(degraded, 30, "Degraded ApplyFailed")
    assert "NetworkPolicy" in c["message"] and "except" in c["message"], c["message"]
    assert cluster.get("deployment", "np", ns) is None
    # Fixed: the policy, then the pods.
    _patch(cluster, ns, {"networkPolicy": {"metricsFrom": [{"ipBlock": {"cidr": "192.0.2.0/24"}}]}})
    wait_for(lambda: _policy(cluster, ns), 30, "NetworkPolicy np created")
    wait_for(lambda: cluster.get("deployment", "np", ns), 30, "Deployment np created")


@pytest.mark.parametrize("example", ["contact-loadbalancer.yaml", "aor-hostnetwork.yaml", "sidecar/pbx.yaml"])
def test_example_midregistrars_pass_the_api_servers_validation(
    cluster: Cluster, ns: str, example: str
) -> None:
    """The examples (with their networkPolicy) are valid resources: a server-side dry run in a test namespace."""
    docs = [d for d in yaml.safe_load_all((EXAMPLES / example).read_text()) if d]
    (mr,) = [d for d in docs if d["kind"] == "MidRegistrar"]
    mr["metadata"]["namespace"] = ns
    out = cluster.kubectl("create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(mr)).stdout
    got = json.loads(out)["spec"]
    if got.get("deployment") != "sidecar":
        assert got["networkPolicy"]["enabled"] is True
        assert got["networkPolicy"]["metricsFrom"] == mr["spec"]["networkPolicy"]["metricsFrom"]
