"""The NetworkPolicy of a tier of registrar pods (issue 15): pure renderer, no cluster."""

from __future__ import annotations

from typing import Any

from midreg_operator import render
from midreg_operator.spec import MidRegistrarSpec, Ref, parse_spec

REF = Ref(name="edge", namespace="voip", uid="uid-1", generation=1)
OWN = {"app.kubernetes.io/name": "midregistrar", "app.kubernetes.io/instance": "edge"}
MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
ETCD = {"endpoints": ["etcd:2379"]}


def spec(**extra: Any) -> MidRegistrarSpec:
    return parse_spec({"mainRegistrar": "sip:pbx.example.com:5060", **extra})


def policy(**extra: Any) -> dict[str, Any]:
    obj = render.render_network_policy(spec(**extra), REF)
    assert obj is not None
    return obj


def rules_for(obj: dict[str, Any], protocol: str, port: int) -> list[dict[str, Any]]:
    return [r for r in obj["spec"]["ingress"] if {"protocol": protocol, "port": port} in r["ports"]]


def test_on_by_default_selecting_the_registrar_pods_ingress_only() -> None:
    obj = policy()
    assert obj["apiVersion"] == "networking.k8s.io/v1" and obj["kind"] == "NetworkPolicy"
    assert obj["metadata"]["name"] == "edge" and obj["metadata"]["namespace"] == "voip"
    (owner,) = obj["metadata"]["ownerReferences"]
    assert owner["uid"] == "uid-1" and owner["controller"] is True
    assert obj["spec"]["podSelector"] == {"matchLabels": OWN}
    # The Deployment's pods carry exactly the labels the policy selects.
    pod_labels = render.render_deployment(spec(), REF)["spec"]["template"]["metadata"]["labels"]
    assert OWN.items() <= pod_labels.items()
    # Egress is not restricted: phones anywhere, the main registrar, etcd, DNS.
    assert obj["spec"]["policyTypes"] == ["Ingress"]
    assert "egress" not in obj["spec"]


def test_every_sip_port_is_open_to_everyone_by_default() -> None:
    obj = policy(
        transports=[
            {"protocol": "udp", "port": 5060},
            {"protocol": "tcp", "port": 5060},
            {"protocol": "tls", "port": 5061},
            {"protocol": "ws", "port": 8080},
            {"protocol": "wss", "port": 8443},
        ],
        tls={"secretName": "sip-cert"},
    )
    (sip, *others) = obj["spec"]["ingress"]
    assert sip == {
        "ports": [
            {"protocol": "UDP", "port": 5060},
            {"protocol": "TCP", "port": 5060},
            {"protocol": "TCP", "port": 5061},
            {"protocol": "TCP", "port": 8080},
            {"protocol": "TCP", "port": 8443},
        ]
    }  # no "from": any source
    assert others == []  # metricsFrom empty: no rule for the HTTP port at all


def test_one_tcp_port_carrying_two_transports_is_listed_once() -> None:
    obj = policy(transports=[{"protocol": "tcp", "port": 5060}, {"protocol": "ws", "port": 5060}])
    assert obj["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 5060}]


def test_http_port_only_from_the_monitoring_peers() -> None:
    peers = [MONITORING, {"ipBlock": {"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"]}}]
    obj = policy(httpPort=9100, networkPolicy={"metricsFrom": peers})
    (http,) = rules_for(obj, "TCP", 9100)
    assert http["from"] == peers
    assert http["ports"] == [{"protocol": "TCP", "port": 9100}]
    assert rules_for(obj, "TCP", 9090) == []


def test_no_monitoring_peers_means_no_http_rule_never_an_open_one() -> None:
    """A rule with no ``from`` admits every source: an empty metricsFrom must leave the port out instead."""
    for extra in ({}, {"networkPolicy": {"metricsFrom": []}}):
        obj = policy(**extra)
        assert rules_for(obj, "TCP", 9090) == []
        assert all("from" not in r for r in obj["spec"]["ingress"])  # only the SIP rule, open to all


def test_sip_sources_restrict_the_sip_ports_and_keep_the_hand_off_port_for_own_pods() -> None:
    sources = [{"ipBlock": {"cidr": "203.0.113.0/24"}}, {"ipBlock": {"cidr": "198.51.100.7/32"}}]
    tier = {
        "transports": [{"protocol": "tls", "port": 5061}, {"protocol": "udp", "port": 5070}],
        "tls": {"secretName": "sip-cert"},
        "etcd": ETCD,
    }
    obj = policy(**tier, networkPolicy={"sipFrom": sources, "metricsFrom": [MONITORING]})
    sip, handoff, http = obj["spec"]["ingress"]
    assert sip["from"] == sources
    assert sip["ports"] == [{"protocol": "TCP", "port": 5061}, {"protocol": "UDP", "port": 5070}]
    # The hand-off goes to the first udp/tcp transport (MIDREG_INTERNAL_ADDRESS), from this MidRegistrar's
    # pods only: no other MidRegistrar's pods, nothing else in the namespace.
    assert handoff == {
        "from": [{"podSelector": {"matchLabels": OWN}}],
        "ports": [{"protocol": "UDP", "port": 5070}],
    }
    env = render.registrar_env(spec(**tier))
    assert {"name": "MIDREG_INTERNAL_ADDRESS", "value": "udp:$(POD_IP):5070"} in env
    assert http["from"] == [MONITORING]


def test_without_etcd_there_is_no_hand_off_rule() -> None:
    sources = [{"ipBlock": {"cidr": "203.0.113.0/24"}}]
    obj = policy(networkPolicy={"sipFrom": sources})
    assert [r["from"] for r in obj["spec"]["ingress"]] == [sources]


def test_disabled_renders_nothing_and_asks_for_removal() -> None:
    s = spec(networkPolicy={"enabled": False})
    assert render.render_network_policy(s, REF) is None
    assert "NetworkPolicy" not in {o["kind"] for o in render.render_all(s, REF)}
    assert ("networking.k8s.io/v1", "NetworkPolicy", "edge") in render.absent_objects(s, REF)
    assert ("networking.k8s.io/v1", "NetworkPolicy", "edge") not in render.absent_objects(spec(), REF)


def test_applied_before_the_pods() -> None:
    kinds = [o["kind"] for o in render.render_all(spec(), REF)]
    assert kinds.index("NetworkPolicy") < kinds.index("Deployment")


def test_a_sidecar_gets_none_the_pods_are_the_pbxs() -> None:
    s = parse_spec({"deployment": "sidecar", "sidecar": {"pbxPort": 5070}})
    assert s.network_policy.enabled  # the model's default; the CRD forbids turning it on for a sidecar
    assert render.render_network_policy(s, REF) is None
    assert render.absent_objects(s, REF) == []
    assert "NetworkPolicy" not in {o["kind"] for o in render.render_all(s, REF)}


def test_host_network_pods_get_the_same_policy() -> None:
    """Rendered as in service mode; most network plugins do not apply it to host-network pods (docs)."""
    assert policy(network={"mode": "hostNetwork"})["spec"] == policy()["spec"]
