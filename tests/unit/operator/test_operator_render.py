"""Pure renderers: a MidRegistrar spec in, Kubernetes objects out (no cluster)."""

from __future__ import annotations

import pytest
import yaml

from midreg_operator import render
from midreg_operator.spec import Ref, parse_spec
from registrar.config import build_settings

REF = Ref(name="edge", namespace="voip", uid="uid-1", generation=3)
BASE = {"mainRegistrar": "sip:pbx.example.com:5060"}


def spec(**extra: object) -> object:
    return parse_spec({**BASE, **extra})


def by_kind(objs: list[dict[str, object]]) -> dict[str, list[dict[str, object]]]:
    out: dict[str, list[dict[str, object]]] = {}
    for o in objs:
        out.setdefault(str(o["kind"]), []).append(o)
    return out


def test_render_all_owned_objects_with_owner_reference() -> None:
    objs = render.render_all(parse_spec(BASE), REF)
    kinds = by_kind(objs)
    assert sorted(kinds) == [
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    ]
    assert len(kinds["Service"]) == 2
    for o in objs:
        meta = o["metadata"]
        assert isinstance(meta, dict)
        assert meta["namespace"] == "voip"
        (owner,) = meta["ownerReferences"]
        assert owner == {
            "apiVersion": "sip.midregistrar.io/v1alpha1",
            "kind": "MidRegistrar",
            "name": "edge",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
        assert meta["labels"]["app.kubernetes.io/instance"] == "edge"


def test_configmap_goes_through_the_shared_config_model(tmp_path: object) -> None:
    s = parse_spec(
        {
            **BASE,
            "mode": "contact",
            "insertion": "path",
            "outgoingExpires": 7200,
            "expires": {"min": 30, "default": 600, "max": 1800},
            "maxContacts": 5,
            "refreshTemplates": 400000,
            "transports": [{"protocol": "udp", "port": 5070}],
            "etcd": {"endpoints": ["10.1.1.1:2379", "10.1.1.2:2379"]},
        }
    )
    cm = render.render_configmap(s, REF)
    text = cm["data"]["config.yaml"]
    data = yaml.safe_load(text)
    assert data["mode"] == "contact"
    assert data["insertion"] == "path"
    assert data["listen"] == ["udp:0.0.0.0:5070"]
    assert (data["min_expires"], data["default_expires"], data["max_expires"]) == (30, 600, 1800)
    assert data["outgoing_expires"] == 7200
    assert data["max_contacts"] == 5
    assert data["refresh_templates"] == 400000
    assert data["store"] == "etcd"
    assert data["etcd_endpoints"] == ["10.1.1.1:2379", "10.1.1.2:2379"]
    assert data["etcd_prefix"] == "/midregistrar/voip/edge/"
    assert data["http"] == "0.0.0.0:9090"
    # What the pod reads back validates through the same model.
    path = __import__("pathlib").Path(str(tmp_path)) / "config.yaml"
    path.write_text(text)
    assert build_settings(environ={}, config_file=path).mode == "contact"


def test_per_source_limits_reach_the_registrar_an_sbc_trusted() -> None:
    """An SBC sends all its phones from one address: the MidRegistrar trusts it, or gives each source more
    room; untouched, the registrar's own defaults hold (500/s, 10-s block, loopback trusted)."""
    data = yaml.safe_load(render.render_config_yaml(spec(), REF))
    assert (data["source_rate_limit"], data["source_block_seconds"]) == (500, 10.0)
    assert data["max_connections_per_source"] == 1000
    assert data["trusted_sources"] == ["127.0.0.0/8", "::1/128"]
    limits = {
        "sourceRateLimit": 5000,
        "sourceBlockSeconds": 0,
        "trustedSources": ["198.51.100.7", "203.0.113.0/24"],
        "maxConnectionsPerSource": 0,
    }
    settings = render.render_settings(spec(limits=limits), REF)
    assert (settings.source_rate_limit, settings.source_block_seconds) == (5000, 0.0)
    assert settings.max_connections_per_source == 0
    assert settings.trusted_sources == ["198.51.100.7", "203.0.113.0/24"]
    none = render.render_settings(spec(limits={"trustedSources": []}), REF)
    assert none.trusted_sources == []  # trust no address, not even loopback


def test_memory_store_without_etcd_and_custom_prefix() -> None:
    assert yaml.safe_load(render.render_config_yaml(spec(), REF))["store"] == "memory"
    s = spec(etcd={"endpoints": ["e:2379"], "prefix": "/custom/"})
    assert yaml.safe_load(render.render_config_yaml(s, REF))["etcd_prefix"] == "/custom/"


def test_operator_environment_never_leaks_into_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIDREG_MODE", "aor")
    assert yaml.safe_load(render.render_config_yaml(spec(), REF))["mode"] == "mirror"


def test_deployment_probes_hash_drain_and_security() -> None:
    d = render.render_deployment(spec(replicas=3, terminationGracePeriodSeconds=90), REF)
    assert d["spec"]["replicas"] == 3
    tpl = d["spec"]["template"]
    # The drain budget (from terminationGracePeriodSeconds) is part of the configuration, so of the hash.
    s = spec(replicas=3, terminationGracePeriodSeconds=90)
    assert tpl["metadata"]["annotations"] == {
        render.CONFIG_HASH_ANNOTATION: render.config_hash(s, REF),
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(s.http_port),
        "prometheus.io/path": "/metrics",
    }
    pod = tpl["spec"]
    (c,) = pod["containers"]
    assert c["args"] == ["run", "--config", "/etc/midregistrar/config.yaml"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["lifecycle"]["preStop"]["sleep"]["seconds"] == render.PRESTOP_SLEEP_SECONDS
    assert pod["terminationGracePeriodSeconds"] == 90 + render.PRESTOP_SLEEP_SECONDS
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == "edge-registrar"
    assert {p["name"] for p in c["ports"]} == {"sip-udp-5060", "sip-tcp-5060", "http"}
    assert "hostNetwork" not in pod
    assert d["spec"]["selector"]["matchLabels"] == render.selector_labels(REF)


def test_config_change_changes_hash_and_replica_change_does_not() -> None:
    h = render.config_hash(spec(), REF)
    assert render.config_hash(spec(expires={"min": 60, "default": 1800, "max": 3600}), REF) != h
    assert render.config_hash(spec(etcd={"secretName": "creds"}), REF) != h
    assert render.config_hash(spec(replicas=7), REF) == h


def test_host_network_mode_one_pod_per_node() -> None:
    d = render.render_deployment(spec(network={"mode": "hostNetwork"}), REF)
    pod = d["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    term = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert d["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    (c,) = pod["containers"]
    assert all(p["hostPort"] == p["containerPort"] for p in c["ports"])
    assert {"name": "MIDREG_ADVERTISE", "value": "$(NODE_IP)"} in c["env"]
    svc = render.render_sip_service(spec(network={"mode": "hostNetwork"}), REF)
    assert svc["spec"]["type"] == "ClusterIP"
    assert "externalTrafficPolicy" not in svc["spec"]


def test_service_mode_keeps_source_address() -> None:
    s = spec(network={"mode": "service", "serviceType": "LoadBalancer", "annotations": {"lb": "x"}})
    svc = render.render_sip_service(s, REF)
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["externalTrafficPolicy"] == "Local"
    assert svc["metadata"]["annotations"] == {"lb": "x"}
    assert [(p["protocol"], p["port"]) for p in svc["spec"]["ports"]] == [("UDP", 5060), ("TCP", 5060)]


def test_headless_peers_service() -> None:
    svc = render.render_peers_service(spec(), REF)
    assert svc["metadata"]["name"] == "edge-peers"
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert "http" in {p["name"] for p in svc["spec"]["ports"]}


def test_hpa_targets_the_midregistrar_scale_subresource() -> None:
    assert render.render_hpa(spec(), REF) is None
    assert render.absent_objects(spec(), REF) == [("autoscaling/v2", "HorizontalPodAutoscaler", "edge")]
    s = spec(
        autoscaling={"enabled": True, "minReplicas": 2, "maxReplicas": 6, "targetRegistersPerSecond": 400}
    )
    hpa = render.render_hpa(s, REF)
    assert hpa is not None
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "sip.midregistrar.io/v1alpha1",
        "kind": "MidRegistrar",
        "name": "edge",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 600
    types = [m["type"] for m in hpa["spec"]["metrics"]]
    assert types == ["Resource", "Pods"]
    assert render.absent_objects(s, REF) == []
    assert "HorizontalPodAutoscaler" in by_kind(render.render_all(s, REF))


def test_pdb_and_secret_volume() -> None:
    assert render.render_pdb(spec(), REF)["spec"]["maxUnavailable"] == 1
    d = render.render_deployment(spec(etcd={"endpoints": ["e:2379"], "secretName": "etcd-creds"}), REF)
    vols = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
    assert vols["etcd-credentials"]["secret"]["secretName"] == "etcd-creds"


def test_rendering_is_deterministic() -> None:
    assert render.render_all(spec(), REF) == render.render_all(spec(), REF)


def test_etcd_pods_tell_peers_their_own_address() -> None:
    d = render.render_deployment(spec(etcd={"endpoints": ["e:2379"]}), REF)
    (c,) = d["spec"]["template"]["spec"]["containers"]
    internal = [e["value"] for e in c["env"] if e["name"] == "MIDREG_INTERNAL_ADDRESS"]
    assert len(internal) == 1 and "$(POD_IP)" in internal[0], "the hand-off goes to the pod, not the Service"
    (c,) = render.render_deployment(spec(), REF)["spec"]["template"]["spec"]["containers"]
    assert not [e for e in c["env"] if e["name"] == "MIDREG_INTERNAL_ADDRESS"], "no peers without etcd"


def test_service_mode_pods_advertise_their_own_address_unless_one_is_given() -> None:
    """Listening on 0.0.0.0, a registrar would write 127.0.0.1 into what it sends the main registrar."""
    pod = render.render_deployment(spec(network={"mode": "service"}), REF)["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert {"name": "MIDREG_ADVERTISE", "value": "$(POD_IP)"} in c["env"]
    # POD_IP is defined before it is used ($(VAR) expands only earlier variables).
    names = [e["name"] for e in c["env"]]
    assert names.index("POD_IP") < names.index("MIDREG_ADVERTISE")
    given = spec(network={"mode": "service", "advertise": "sip.example.com"})
    (c,) = render.render_deployment(given, REF)["spec"]["template"]["spec"]["containers"]
    assert not [e for e in c["env"] if e["name"] == "MIDREG_ADVERTISE"]
    assert "advertise: sip.example.com" in render.render_config_yaml(given, REF)


def test_tls_transport_mounts_the_secret_and_configures_the_registrar() -> None:
    s = parse_spec(
        {
            **BASE,
            "mainRegistrar": "sips:pbx.example.com",
            "transports": [
                {"protocol": "udp", "port": 5060},
                {"protocol": "tls", "port": 5061},
                {"protocol": "wss", "port": 8443},
            ],
            "tls": {"secretName": "sip-cert", "verifyClients": True, "mainCASecretName": "pbx-ca"},
            "etcd": {"endpoints": ["10.1.1.1:2379"]},
        }
    )
    settings = yaml.safe_load(render.render_config_yaml(s, REF))
    assert settings["listen"] == ["udp:0.0.0.0:5060", "tls:0.0.0.0:5061", "wss:0.0.0.0:8443"]
    assert settings["tls_cert"] == "/etc/midregistrar/tls/tls.crt"
    assert settings["tls_key"] == "/etc/midregistrar/tls/tls.key"
    assert settings["tls_client_ca"] == "/etc/midregistrar/tls/ca.crt"
    assert settings["tls_ca"] == "/etc/midregistrar/main-ca/ca.crt"
    dep = render.render_deployment(s, REF)
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert {"name": "sip-tls-5061", "containerPort": 5061, "protocol": "TCP"} in container["ports"]
    assert {"name": "sip-wss-8443", "containerPort": 8443, "protocol": "TCP"} in container["ports"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["tls"] == {"name": "tls", "mountPath": "/etc/midregistrar/tls", "readOnly": True}
    assert "subPath" not in mounts["tls"]  # a renewed Secret reaches the pod only through a whole mount
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tls"]["secret"] == {"secretName": "sip-cert"}
    assert volumes["main-ca"]["secret"] == {"secretName": "pbx-ca"}
    # Pods hand each other requests over UDP or TCP, never on the TLS port.
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MIDREG_INTERNAL_ADDRESS"] == "udp:$(POD_IP):5060"
    svc = render.render_sip_service(s, REF)
    assert {"name": "sip-tls-5061", "port": 5061, "targetPort": 5061, "protocol": "TCP"} in svc["spec"][
        "ports"
    ]
    # Another Secret rolls the pods; the same one renewed does not (the registrar reloads it).
    other = parse_spec({**s.model_dump(by_alias=True), "tls": {"secretName": "other-cert"}})
    assert render.config_hash(other, REF) != render.config_hash(s, REF)
