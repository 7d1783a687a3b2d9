"""Sidecar mode: pure functions for the registrar container injected into a PBX's own pods.

A PBX pod opts in with the label ``sip.midregistrar.io/sidecar=<MidRegistrar name>``; the operator's mutating
webhook adds the registrar container (the same container as in the pods tier, from
:func:`render.registrar_container`), its volumes, and moves the PBX off the SIP ports the sidecar takes: the
PBX listens on ``spec.sidecar.pbxPort`` on the pod's loopback and the sidecar relays to it there. The
webhook configuration has one entry per sidecar MidRegistrar, so each says its own failure policy.
Nothing here talks to the API server.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from . import render
from .spec import MidRegistrarSpec, Ref

SIDECAR_LABEL = "sip.midregistrar.io/sidecar"  # on a PBX pod (template): the MidRegistrar to inject
INJECTED_ANNOTATION = "sip.midregistrar.io/injected"  # on an injected pod: the configuration hash it got
CONTAINER = "midregistrar"
VOLUME_PREFIX = "midreg-"  # the sidecar's volumes, kept apart from the PBX's own
PBX_PORT_ENV = "MIDREGISTRAR_PBX_PORT"  # told to the PBX container: where to listen behind the sidecar
WEBHOOK_PATH = "sidecar"  # the kopf admission handler's id, which is its URL path
WEBHOOK_CONFIGURATION = "midregistrar-sidecar"

Obj = dict[str, Any]


def injected(pod: Obj) -> bool:
    return any(c.get("name") == CONTAINER for c in (pod.get("spec") or {}).get("containers") or [])


def injection(spec: MidRegistrarSpec, ref: Ref, pod: Obj) -> Obj | None:
    """The merge patch that injects the sidecar into ``pod`` (as the API server is about to create it), or
    None when the pod already has it (a re-admission adds nothing).

    The PBX container(s) lose the container ports the sidecar's transports take (one pod network: only one
    container can bind a port) and learn the port to listen on behind it (:data:`PBX_PORT_ENV`)."""
    if injected(pod):
        return None
    assert spec.sidecar is not None, "injection is for deployment sidecar"
    pod_spec = pod.get("spec") or {}
    taken = {(t.port, t.kube_protocol) for t in spec.transports} | {(spec.http_port, "TCP")}
    containers: list[Obj] = []
    for original in pod_spec.get("containers") or []:
        c = copy.deepcopy(original)
        ports = c.get("ports") or []
        kept = [p for p in ports if (p.get("containerPort"), p.get("protocol", "TCP")) not in taken]
        if len(kept) != len(ports) or len(pod_spec.get("containers") or []) == 1:
            c["ports"] = kept
            env = [e for e in c.get("env") or [] if e.get("name") != PBX_PORT_ENV]
            c["env"] = [*env, {"name": PBX_PORT_ENV, "value": str(spec.sidecar.pbx_port)}]
        if not c.get("ports"):
            c.pop("ports", None)
        containers.append(c)
    containers.append(render.registrar_container(spec, ref, name=CONTAINER, prefix=VOLUME_PREFIX))
    _, volumes = render.registrar_volumes(spec, ref, prefix=VOLUME_PREFIX)
    return {
        "metadata": {"annotations": {INJECTED_ANNOTATION: render.config_hash(spec, ref)}},
        "spec": {"containers": containers, "volumes": [*(pod_spec.get("volumes") or []), *volumes]},
    }


@dataclass(frozen=True)
class SidecarCounts:
    """What a sidecar MidRegistrar's status says about the PBX pods that opted in."""

    injected: int = 0
    ready: int = 0
    not_injected: int = 0


def count_pods(pods: Iterable[Obj]) -> SidecarCounts:
    """Live pods only (not terminating, not finished): those carrying the sidecar, those whose sidecar is
    ready, and those created without it (the webhook was unreachable and the policy said Ignore)."""
    injected_n = ready = missing = 0
    for pod in pods:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        if meta.get("deletionTimestamp") or status.get("phase") in ("Succeeded", "Failed"):
            continue
        if not injected(pod):
            missing += 1
            continue
        injected_n += 1
        states = {s.get("name"): s for s in status.get("containerStatuses") or []}
        if (states.get(CONTAINER) or {}).get("ready"):
            ready += 1
    return SidecarCounts(injected_n, ready, missing)


def webhook_name(ref: Ref) -> str:
    return f"{ref.name}.{ref.namespace}.sidecar.sip.midregistrar.io"


def webhook_configuration(entries: Sequence[tuple[Ref, MidRegistrarSpec]], client_config: Obj) -> Obj:
    """The MutatingWebhookConfiguration: one webhook per sidecar MidRegistrar, matching only the pods of its
    namespace that carry its label, with its own failure policy. ``client_config`` is where the operator's
    webhook is served (a Service, or a URL for an operator outside the cluster) and the CA that signed it."""
    webhooks = []
    for ref, spec in sorted(entries, key=lambda e: (e[0].namespace, e[0].name)):
        assert spec.sidecar is not None
        config = copy.deepcopy(client_config)
        if "service" in config:
            config["service"]["path"] = f"/{WEBHOOK_PATH}"
        else:
            config["url"] = f"{config['url'].rstrip('/')}/{WEBHOOK_PATH}"
        webhooks.append(
            {
                "name": webhook_name(ref),
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": spec.sidecar.failure_policy,
                "matchPolicy": "Equivalent",
                "reinvocationPolicy": "IfNeeded",
                "timeoutSeconds": 10,
                "clientConfig": config,
                "rules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "resources": ["pods"],
                        "operations": ["CREATE"],
                        "scope": "Namespaced",
                    }
                ],
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ref.namespace}},
                "objectSelector": {"matchLabels": {SIDECAR_LABEL: ref.name}},
            }
        )
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {
            "name": WEBHOOK_CONFIGURATION,
            "labels": {"app.kubernetes.io/managed-by": render.MANAGED_BY},
        },
        "webhooks": webhooks,
    }
