"""Sidecar mode, pure parts: the injection patch, the webhook configuration, the status counts, and the
webhook's certificates (no cluster)."""

from __future__ import annotations

import copy
import datetime
from typing import Any

import yaml

from midreg_operator import render, sidecar, webhook
from midreg_operator.spec import Ref, parse_spec
from midreg_operator.status import Observed, compute_status

REF = Ref(name="pbx-edge", namespace="voip", uid="uid-7", generation=2)
SIDECAR = parse_spec(
    {
        "deployment": "sidecar",
        "sidecar": {"pbxPort": 5070},
        "mode": "contact",
        "transports": [{"protocol": "udp", "port": 5060}, {"protocol": "tcp", "port": 5060}],
    }
)


def pbx_pod() -> dict[str, Any]:
    """A PBX pod as its Deployment makes it: SIP on 5060 (UDP and TCP), an HTTP API on 8080, a volume."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "pbx-",
            "namespace": "voip",
            "labels": {sidecar.SIDECAR_LABEL: "pbx-edge"},
        },
        "spec": {
            "containers": [
                {
                    "name": "kamailio",
                    "image": "pbx:1",
                    "ports": [
                        {"name": "sip-udp", "containerPort": 5060, "protocol": "UDP"},
                        {"name": "sip-tcp", "containerPort": 5060, "protocol": "TCP"},
                        {"name": "api", "containerPort": 8080},
                    ],
                    "env": [{"name": "A", "value": "1"}],
                }
            ],
            "volumes": [{"name": "config", "configMap": {"name": "pbx-config"}}],
        },
    }


def apply_merge(pod: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(pod)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = apply_merge(out[key], value)
        else:
            out[key] = value
    return out


def test_injection_adds_the_registrar_and_moves_the_pbx_behind_it() -> None:
    pod = pbx_pod()
    patch = sidecar.injection(SIDECAR, REF, pod)
    assert patch is not None
    after = apply_merge(pod, patch)
    pbx, mid = after["spec"]["containers"]
    assert mid["name"] == "midregistrar" and mid["image"] == SIDECAR.image
    assert {(p["containerPort"], p["protocol"]) for p in mid["ports"]} == {
        (5060, "UDP"),
        (5060, "TCP"),
        (9090, "TCP"),
    }
    assert "hostPort" not in str(mid["ports"])
    # the PBX keeps its other ports and learns where to listen
    assert [p["name"] for p in pbx["ports"]] == ["api"]
    assert {"name": "MIDREGISTRAR_PBX_PORT", "value": "5070"} in pbx["env"] and {
        "name": "A",
        "value": "1",
    } in pbx["env"]
    # the sidecar's volumes are its own, beside the PBX's
    names = [v["name"] for v in after["spec"]["volumes"]]
    assert names == ["config", "midreg-config"]
    assert after["spec"]["volumes"][1]["configMap"]["name"] == "pbx-edge-config"
    assert {m["name"] for m in mid["volumeMounts"]} == {"midreg-config"}
    assert after["metadata"]["annotations"][sidecar.INJECTED_ANNOTATION] == render.config_hash(SIDECAR, REF)
    assert mid["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert mid["securityContext"]["runAsNonRoot"] is True
    # its configuration relays to the PBX on the pod's loopback
    config = yaml.safe_load(render.render_config_yaml(SIDECAR, REF))
    assert config["main_registrar"] == "sip:127.0.0.1:5070"


def test_a_second_admission_adds_nothing() -> None:
    pod = pbx_pod()
    patch = sidecar.injection(SIDECAR, REF, pod)
    assert patch is not None
    assert sidecar.injection(SIDECAR, REF, apply_merge(pod, patch)) is None


def test_a_sidecar_owns_only_its_configmap() -> None:
    assert [o["kind"] for o in render.render_all(SIDECAR, REF)] == ["ConfigMap"]
    assert render.absent_objects(SIDECAR, REF) == []
    mine = {"metadata": {"ownerReferences": [render.owner_reference(REF)]}}
    theirs = {"metadata": {"ownerReferences": [{**render.owner_reference(REF), "uid": "other"}]}}
    assert render.owned_by(mine, REF) and not render.owned_by(theirs, REF) and not render.owned_by({}, REF)


def test_the_webhook_configuration_has_one_entry_per_sidecar_with_its_policy() -> None:
    ignore = parse_spec({"deployment": "sidecar", "sidecar": {"pbxPort": 5080, "failurePolicy": "Ignore"}})
    other = Ref(name="b", namespace="ops", uid="u2")
    client = {"service": {"namespace": "midreg-system", "name": "webhook", "port": 9443}, "caBundle": "Q0E="}
    conf = sidecar.webhook_configuration([(other, ignore), (REF, SIDECAR)], client)
    assert (
        conf["kind"] == "MutatingWebhookConfiguration" and conf["metadata"]["name"] == "midregistrar-sidecar"
    )
    first, second = conf["webhooks"]
    assert first["name"] == "b.ops.sidecar.sip.midregistrar.io" and first["failurePolicy"] == "Ignore"
    assert second["failurePolicy"] == "Fail"
    assert second["objectSelector"] == {"matchLabels": {sidecar.SIDECAR_LABEL: "pbx-edge"}}
    assert second["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "voip"}}
    assert (
        second["clientConfig"]["service"]["path"] == "/sidecar"
        and second["clientConfig"]["caBundle"] == "Q0E="
    )
    assert second["rules"][0]["operations"] == ["CREATE"] and second["rules"][0]["resources"] == ["pods"]
    by_url = sidecar.webhook_configuration(
        [(REF, SIDECAR)], {"url": "https://127.0.0.1:9443", "caBundle": "x"}
    )
    assert by_url["webhooks"][0]["clientConfig"]["url"] == "https://127.0.0.1:9443/sidecar"
    assert sidecar.webhook_configuration([], client)["webhooks"] == []


def _pod(name: str, injected: bool, ready: bool = False, **meta: Any) -> dict[str, Any]:
    containers = [{"name": "pbx"}] + ([{"name": "midregistrar"}] if injected else [])
    statuses = [{"name": "midregistrar", "ready": ready}] if injected else []
    return {
        "metadata": {"name": name, **meta},
        "spec": {"containers": containers},
        "status": {"phase": "Running", "containerStatuses": statuses},
    }


def test_status_counts_the_pbx_pods_that_carry_the_sidecar() -> None:
    pods = [
        _pod("a", True, True),
        _pod("b", True, False),
        _pod("c", False),
        _pod("d", True, True, deletionTimestamp="2026-12-05T10:00:00Z"),
    ]
    counts = sidecar.count_pods(pods)
    assert counts == sidecar.SidecarCounts(injected=2, ready=1, not_injected=1)
    status = compute_status(
        SIDECAR, REF, Observed(None, None, "unknown", sidecars=counts), "sel", {}, "now", "h"
    )
    assert (status["injectedPods"], status["readyInjectedPods"], status["notInjectedPods"]) == (2, 1, 1)
    assert status["readyText"] == "1/2 injected"
    ready = {c["type"]: c for c in status["conditions"]}["Ready"]
    assert ready["status"] == "False" and "1/2 injected sidecars ready" in ready["message"]
    all_ready = sidecar.count_pods([_pod("a", True, True)])
    status = compute_status(
        SIDECAR, REF, Observed(None, None, "unknown", sidecars=all_ready), "s", {}, "now", "h"
    )
    ready = {c["type"]: c for c in status["conditions"]}["Ready"]
    assert ready["status"] == "True" and ready["reason"] == "SidecarsReady"


HOSTS = [
    "webhook",
    "webhook.midreg-system",
    "webhook.midreg-system.svc",
    "webhook.midreg-system.svc.cluster.local",
]


def test_webhook_certificates_are_renewed_when_they_must_be() -> None:
    certs = webhook.issue(HOSTS)
    assert webhook.renewal_reason(certs, HOSTS) is None
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=300)
    assert webhook.renewal_reason(certs, HOSTS, now=later) == "less than a third of its lifetime left"
    assert webhook.renewal_reason(certs, [*HOSTS, "other.example"]) is not None
    crt, key = webhook.new_serving(certs.ca_crt, certs.ca_key, HOSTS, days=-1)
    expired = webhook.Certificates(certs.ca_crt, certs.ca_key, crt, key)
    assert webhook.renewal_reason(expired, HOSTS) == "expired"
    stranger = webhook.issue(HOSTS)
    mixed = webhook.Certificates(certs.ca_crt, certs.ca_key, stranger.tls_crt, stranger.tls_key)
    assert webhook.renewal_reason(mixed, HOSTS) == "not signed by the CA"
    renewed = webhook.issue(HOSTS, ca=(certs.ca_crt, certs.ca_key))
    assert renewed.ca_crt == certs.ca_crt and renewed.tls_crt != certs.tls_crt
    assert webhook.Certificates.from_secret_data(renewed.to_secret_data()) == renewed
    serving = webhook.ServingContext(certs)
    serving.load(renewed)
    assert serving.serving == renewed.tls_crt


def test_webhook_settings_name_the_service_or_the_url() -> None:
    in_cluster = webhook.WebhookSettings(port=9443, namespace="midreg-system", service="webhook", secret="s")
    assert in_cluster.hosts == HOSTS
    assert in_cluster.client_config(b"CA")["service"] == {
        "namespace": "midreg-system",
        "name": "webhook",
        "port": 9443,
    }
    outside = webhook.WebhookSettings(
        port=9443, namespace="x", service=None, secret="s", url="https://127.0.0.1:9443"
    )
    assert outside.hosts == ["127.0.0.1"] and outside.client_config(b"CA")["url"] == "https://127.0.0.1:9443"
