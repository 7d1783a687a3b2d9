"""Pure functions: a MidRegistrar spec in, Kubernetes objects (plain dicts) out.

Nothing here talks to the API server; the kopf handlers apply what these return.
"""

from __future__ import annotations

import hashlib
from typing import Any

from registrar.config import Settings, build_settings

from .spec import API_VERSION, KIND, MidRegistrarSpec, Ref, Transport, etcd_prefix

FIELD_MANAGER = "midreg-operator"
MANAGED_BY = "midreg-operator"
CONFIG_HASH_ANNOTATION = "sip.midregistrar.io/config-hash"
CONFIG_DIR = "/etc/midregistrar"
CONFIG_FILE = "config.yaml"
ETCD_SECRET_DIR = "/etc/midregistrar/etcd"
TLS_SECRET_DIR = "/etc/midregistrar/tls"  # spec.tls.secretName: tls.crt, tls.key, ca.crt
MAIN_CA_DIR = "/etc/midregistrar/main-ca"  # spec.tls.mainCASecretName: ca.crt
HANDOFF_DIR = "/etc/midregistrar/handoff"  # the operator's <name>-handoff Secret: keys (with etcd)
PRESTOP_SLEEP_SECONDS = 5
# Drain on SIGTERM (registrar/app.py): keep serving `drain_grace` s with short expires, then up to
# `drain_timeout` s for open transactions. Both come out of spec.terminationGracePeriodSeconds, less a
# margin for closing sockets, so the kubelet never kills a draining registrar (see drain_budget()).
DRAIN_TIMEOUT_SECONDS = 10
DRAIN_MARGIN_SECONDS = 5
# The HPA's per-pod REGISTER rate: prometheus-adapter's rate() of the registrars' counter
# midregistrar_register_requests_total (chart value prometheusAdapter.rules), served as a Pods metric.
REGISTER_RATE_METRIC = "midregistrar_register_requests_per_second"
REGISTER_COUNTER = "midregistrar_register_requests_total"

Obj = dict[str, Any]


def selector_labels(ref: Ref) -> dict[str, str]:
    return {"app.kubernetes.io/name": "midregistrar", "app.kubernetes.io/instance": ref.name}


def labels(ref: Ref) -> dict[str, str]:
    return {
        **selector_labels(ref),
        "app.kubernetes.io/component": "registrar",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/part-of": "kube-midregistrar",
    }


def selector_string(ref: Ref) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(ref).items()))


def owner_reference(ref: Ref) -> Obj:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": ref.name,
        "uid": ref.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owned_by(obj: Obj, ref: Ref) -> bool:
    """Whether ``obj`` is one this MidRegistrar controls (never delete a user's namesake)."""
    return any(
        o.get("controller") and o.get("kind") == KIND and o.get("uid") == ref.uid
        for o in (obj.get("metadata") or {}).get("ownerReferences") or []
    )


def _meta(ref: Ref, name: str, annotations: dict[str, str] | None = None) -> Obj:
    meta: Obj = {
        "name": name,
        "namespace": ref.namespace,
        "labels": labels(ref),
        "ownerReferences": [owner_reference(ref)],
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def names(ref: Ref) -> dict[str, str]:
    base = ref.name
    return {
        "configmap": f"{base}-config",
        "deployment": base,
        "service": base,
        "peers": f"{base}-peers",
        "hpa": base,
        "pdb": base,
        "serviceaccount": f"{base}-registrar",
        "handoff": f"{base}-handoff",
        "networkpolicy": base,
    }


def drain_budget(spec: MidRegistrarSpec) -> tuple[float, float]:
    """(drain_grace, drain_timeout) fitting in spec.terminationGracePeriodSeconds with a margin.

    The pod's grace period is that value plus the preStop sleep, so
    preStop + drain_grace + drain_timeout + margin <= the pod's terminationGracePeriodSeconds.
    """
    usable = max(0, spec.termination_grace_period_seconds - DRAIN_MARGIN_SECONDS)
    timeout = min(DRAIN_TIMEOUT_SECONDS, usable)
    return float(usable - timeout), float(timeout)


def render_settings(spec: MidRegistrarSpec, ref: Ref) -> Settings:
    """The registrar's configuration, built and validated through the shared model (registrar.config)."""
    options: dict[str, Any] = {
        "listen": [f"{t.protocol}:0.0.0.0:{t.port}" for t in spec.transports],
        "main_registrar": spec.main_registrar,
        "mode": spec.mode,
        "insertion": spec.insertion,
        "outgoing_expires": spec.outgoing_expires,
        "min_expires": spec.expires.min,
        "default_expires": spec.expires.default,
        "max_expires": spec.expires.max,
        "max_contacts": spec.max_contacts,
        "refresh_templates": spec.refresh_templates,
        "source_rate_limit": spec.limits.source_rate_limit,
        "source_block_seconds": float(spec.limits.source_block_seconds),
        "max_connections_per_source": spec.limits.max_connections_per_source,
        "http": f"0.0.0.0:{spec.http_port}",
        "log_format": spec.log_format,
        "store": "etcd" if spec.etcd.endpoints else "memory",
        "etcd_prefix": etcd_prefix(spec, ref),
    }
    options["drain_grace"], options["drain_timeout"] = drain_budget(spec)
    if spec.etcd.endpoints:
        options["etcd_endpoints"] = list(spec.etcd.endpoints)
    if spec.limits.trusted_sources is not None:
        options["trusted_sources"] = list(spec.limits.trusted_sources)
    if spec.network.mode == "service" and spec.network.advertise:
        options["advertise"] = spec.network.advertise
    tls = spec.tls
    if tls.secret_name:
        options["tls_cert"] = f"{TLS_SECRET_DIR}/tls.crt"
        options["tls_key"] = f"{TLS_SECRET_DIR}/tls.key"
        if tls.verify_clients:
            options["tls_client_ca"] = f"{TLS_SECRET_DIR}/ca.crt"
    if tls.main_ca_secret_name:
        options["tls_ca"] = f"{MAIN_CA_DIR}/ca.crt"
    if spec.etcd.endpoints:
        # The pods hand each other requests: authenticated with the keys the operator keeps (.handoff_keys).
        options["handoff_key_file"] = f"{HANDOFF_DIR}/keys"
    # environ={} : the operator's own environment must never leak into a rendered configuration.
    return build_settings(options, environ={})


def render_config_yaml(spec: MidRegistrarSpec, ref: Ref) -> str:
    return render_settings(spec, ref).to_yaml()


def config_hash(spec: MidRegistrarSpec, ref: Ref) -> str:
    """Changes whenever what the pods read changes (config file or etcd Secret name): rolls the pods."""
    h = hashlib.sha256(render_config_yaml(spec, ref).encode())
    h.update(b"\0secret=" + (spec.etcd.secret_name or "").encode())
    # A renewed certificate in the same Secret is reloaded by the pods; another Secret rolls them.
    h.update(b"\0tls=" + (spec.tls.secret_name or "").encode())
    h.update(b"\0main-ca=" + (spec.tls.main_ca_secret_name or "").encode())
    return h.hexdigest()[:16]


def render_configmap(spec: MidRegistrarSpec, ref: Ref) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(ref, names(ref)["configmap"]),
        "data": {CONFIG_FILE: render_config_yaml(spec, ref)},
    }


def render_service_account(spec: MidRegistrarSpec, ref: Ref) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(ref, names(ref)["serviceaccount"]),
        "automountServiceAccountToken": False,
    }


def _port_name(protocol: str, port: int) -> str:
    return f"sip-{protocol}-{port}"[:15]


def _container_ports(spec: MidRegistrarSpec) -> list[Obj]:
    host = spec.network.mode == "hostNetwork" and spec.deployment == "pods"  # a sidecar's pod is the PBX's
    ports: list[Obj] = []
    for t in spec.transports:
        p: Obj = {
            "name": _port_name(t.protocol, t.port),
            "containerPort": t.port,
            "protocol": t.kube_protocol,
        }
        if host:
            p["hostPort"] = t.port
        ports.append(p)
    http: Obj = {"name": "http", "containerPort": spec.http_port, "protocol": "TCP"}
    if host:
        http["hostPort"] = spec.http_port
    ports.append(http)
    return ports


def registrar_env(spec: MidRegistrarSpec) -> list[Obj]:
    """The registrar container's environment: its pod's identity and addresses (the config file has the
    rest)."""
    host = spec.network.mode == "hostNetwork" and spec.deployment == "pods"
    env: list[Obj] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
    ]
    if host:
        # Each hostNetwork pod advertises its own node's address (env wins over the config file).
        env.append({"name": "MIDREG_ADVERTISE", "value": "$(NODE_IP)"})
    elif not spec.network.advertise:
        # Listening on 0.0.0.0, a pod would write 127.0.0.1 into the Via, Contact and Path it sends the main
        # registrar. With no public address given it advertises its own: the main registrar then reaches
        # the pod directly, on the same address and port the pod relays from. (The Service's cluster IP would
        # make that path asymmetric: main -> Service -> pod is DNATed, pod -> main is not, and the kernel
        # drops main's requests whose NATed reply tuple collides with the pod's own flow to main.) A pod
        # that is gone is replaced at main when its phones refresh through another pod: their flow changed,
        # so that refresh is relayed with the new pod's address.
        env.append({"name": "MIDREG_ADVERTISE", "value": "$(POD_IP)"})
    first = handoff_transport(spec)
    if first is not None:
        env.append({"name": "MIDREG_INTERNAL_ADDRESS", "value": f"{first.protocol}:$(POD_IP):{first.port}"})
    return env


def handoff_transport(spec: MidRegistrarSpec) -> Transport | None:
    """The transport peers hand this pod requests on (with etcd): its own address, never the Service, over the
    first UDP or TCP transport (a certificate names the Service, not each pod's address; the CRD requires
    one). It is a SIP port: phones reach the same socket."""
    if not spec.etcd.endpoints:
        return None
    return next((t for t in spec.transports if t.protocol in ("udp", "tcp")), None)


def registrar_volumes(spec: MidRegistrarSpec, ref: Ref, prefix: str = "") -> tuple[list[Obj], list[Obj]]:
    """(volume mounts, volumes) of the registrar container: its ConfigMap and the Secrets the spec names.
    ``prefix`` keeps the volume names apart from a PBX's own in an injected pod."""
    n = names(ref)
    volume_mounts: list[Obj] = [{"name": f"{prefix}config", "mountPath": CONFIG_DIR, "readOnly": True}]
    volumes: list[Obj] = [{"name": f"{prefix}config", "configMap": {"name": n["configmap"]}}]
    secrets = [
        ("etcd-credentials", ETCD_SECRET_DIR, spec.etcd.secret_name),
        # Mounted whole (no subPath): the kubelet then swaps in a renewed Secret, which the registrar reloads.
        ("tls", TLS_SECRET_DIR, spec.tls.secret_name),
        ("main-ca", MAIN_CA_DIR, spec.tls.main_ca_secret_name),
        ("handoff", HANDOFF_DIR, n["handoff"] if spec.etcd.endpoints else None),
    ]
    for name, path, secret in secrets:
        if secret:
            volume_mounts.append({"name": f"{prefix}{name}", "mountPath": path, "readOnly": True})
            volumes.append({"name": f"{prefix}{name}", "secret": {"secretName": secret}})
    return volume_mounts, volumes


def registrar_container(spec: MidRegistrarSpec, ref: Ref, name: str = "registrar", prefix: str = "") -> Obj:
    """The registrar container, the same in a registrar pod and injected beside a PBX (its volumes come from
    :func:`registrar_volumes` with the same ``prefix``)."""
    volume_mounts, _ = registrar_volumes(spec, ref, prefix)
    low_port = any(t.port < 1024 for t in spec.transports) or spec.http_port < 1024
    return {
        "name": name,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["midregistrar"],
        "args": ["run", "--config", f"{CONFIG_DIR}/{CONFIG_FILE}"],
        "ports": _container_ports(spec),
        "env": registrar_env(spec),
        "resources": dict(spec.resources),
        "volumeMounts": volume_mounts,
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "http"},
            "periodSeconds": 5,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "startupProbe": {
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": 2,
            "failureThreshold": 30,
        },
        # Let endpoints drop the pod before SIGTERM starts the registrar's own drain.
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_SECONDS}}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"], **({"add": ["NET_BIND_SERVICE"]} if low_port else {})},
        },
    }


def render_deployment(spec: MidRegistrarSpec, ref: Ref) -> Obj:
    n = names(ref)
    host = spec.network.mode == "hostNetwork"
    _, volumes = registrar_volumes(spec, ref)
    container = registrar_container(spec, ref)
    pod_spec: Obj = {
        "serviceAccountName": n["serviceaccount"],
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": spec.termination_grace_period_seconds + PRESTOP_SLEEP_SECONDS,
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}, "runAsNonRoot": True},
        "containers": [container],
        "volumes": volumes,
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in spec.tolerations]
    if host:
        pod_spec["hostNetwork"] = True
        pod_spec["dnsPolicy"] = "ClusterFirstWithHostNet"
        pod_spec["affinity"] = {
            "podAntiAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "labelSelector": {"matchLabels": selector_labels(ref)},
                        "topologyKey": "kubernetes.io/hostname",
                    }
                ]
            }
        }
        # One pod per node: a surge pod could never be scheduled, so replace in place.
        strategy: Obj = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    else:
        strategy = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(ref, n["deployment"]),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector_labels(ref)},
            "strategy": strategy,
            "template": {
                "metadata": {
                    "labels": labels(ref),
                    "annotations": {
                        CONFIG_HASH_ANNOTATION: config_hash(spec, ref),
                        **scrape_annotations(spec),
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def scrape_annotations(spec: MidRegistrarSpec) -> dict[str, str]:
    """The ``prometheus.io/*`` pod annotations that the common "kubernetes-pods" scrape job of plain
    Prometheus follows; the chart's scrape configuration and PodMonitor select the pods by label instead."""
    return {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(spec.http_port),
        "prometheus.io/path": "/metrics",
    }


def _service_ports(spec: MidRegistrarSpec, with_http: bool) -> list[Obj]:
    ports: list[Obj] = [
        {
            "name": _port_name(t.protocol, t.port),
            "port": t.port,
            "targetPort": t.port,
            "protocol": t.kube_protocol,
        }
        for t in spec.transports
    ]
    if with_http:
        ports.append({"name": "http", "port": spec.http_port, "targetPort": "http", "protocol": "TCP"})
    return ports


def render_sip_service(spec: MidRegistrarSpec, ref: Ref) -> Obj:
    """The SIP entry point. In hostNetwork mode phones reach nodes directly; the Service is ClusterIP."""
    svc_type = spec.network.service_type if spec.network.mode == "service" else "ClusterIP"
    svc_spec: Obj = {
        "type": svc_type,
        "selector": selector_labels(ref),
        "ports": _service_ports(spec, with_http=False),
        # A phone's NAT flow must keep landing on the pod that owns it.
        "sessionAffinity": "ClientIP",
    }
    if svc_type != "ClusterIP":
        # Keep the phone's source address (never SNAT the SIP path).
        svc_spec["externalTrafficPolicy"] = "Local"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(ref, names(ref)["service"], spec.network.annotations),
        "spec": svc_spec,
    }


def render_peers_service(spec: MidRegistrarSpec, ref: Ref) -> Obj:
    """Headless Service: stable DNS for pod-to-pod hand-off of requests to a flow's owner pod."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(ref, names(ref)["peers"]),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector_labels(ref),
            "ports": _service_ports(spec, with_http=True),
        },
    }


def render_hpa(spec: MidRegistrarSpec, ref: Ref) -> Obj | None:
    a = spec.autoscaling
    if not a.enabled:
        return None
    metrics: list[Obj] = []
    if a.target_cpu_utilization_percentage:
        metrics.append(
            {
                "type": "Resource",
                "resource": {
                    "name": "cpu",
                    "target": {
                        "type": "Utilization",
                        "averageUtilization": a.target_cpu_utilization_percentage,
                    },
                },
            }
        )
    if a.target_registers_per_second:
        metrics.append(
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": REGISTER_RATE_METRIC},
                    "target": {"type": "AverageValue", "averageValue": str(a.target_registers_per_second)},
                },
            }
        )
    hpa: Obj = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(ref, names(ref)["hpa"]),
        "spec": {
            # Through the MidRegistrar's scale subresource: the operator carries replicas to the Deployment.
            "scaleTargetRef": {"apiVersion": API_VERSION, "kind": KIND, "name": ref.name},
            "minReplicas": a.min_replicas,
            "maxReplicas": a.max_replicas,
            "behavior": {
                "scaleDown": {"stabilizationWindowSeconds": a.scale_down_stabilization_seconds},
            },
        },
    }
    if metrics:
        hpa["spec"]["metrics"] = metrics
    return hpa


def render_pdb(spec: MidRegistrarSpec, ref: Ref) -> Obj:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(ref, names(ref)["pdb"]),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(ref)}},
    }


def _policy_port(protocol: str, port: int) -> Obj:
    return {"protocol": protocol, "port": port}


def render_network_policy(spec: MidRegistrarSpec, ref: Ref) -> Obj | None:
    """Ingress to the registrar pods (docs/operator.md "Network policy"): the SIP ports from anywhere (or from
    ``sipFrom``), the HTTP port only from ``metricsFrom`` (no rule at all when it is empty: a rule without
    ``from`` would admit everyone). With ``sipFrom``, the hand-off port stays open to the MidRegistrar's own
    pods. Egress is left alone (Ingress only): the pods reach phones anywhere, the main registrar, etcd and
    DNS. None for a sidecar (the pods are the PBX's) or when turned off."""
    np = spec.network_policy
    if spec.deployment == "sidecar" or not np.enabled:
        return None
    own = {"podSelector": {"matchLabels": selector_labels(ref)}}
    sip_ports: list[Obj] = []
    for t in spec.transports:
        port = _policy_port(t.kube_protocol, t.port)
        if port not in sip_ports:  # tcp, tls and ws on one port are one TCP port
            sip_ports.append(port)
    sip_rule: Obj = {"ports": sip_ports}
    if np.sip_from:
        sip_rule["from"] = [dict(peer) for peer in np.sip_from]
    ingress: list[Obj] = [sip_rule]
    handoff = handoff_transport(spec)
    if np.sip_from and handoff is not None:
        ingress.append({"from": [own], "ports": [_policy_port(handoff.kube_protocol, handoff.port)]})
    if np.metrics_from:
        ingress.append(
            {
                "from": [dict(peer) for peer in np.metrics_from],
                "ports": [_policy_port("TCP", spec.http_port)],
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(ref, names(ref)["networkpolicy"]),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(ref)},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }


def render_all(spec: MidRegistrarSpec, ref: Ref) -> list[Obj]:
    """Every owned object, in apply order (what the pods reference comes before the pods). A sidecar owns
    only its ConfigMap: its containers live in the PBX's pods (:mod:`.sidecar`)."""
    if spec.deployment == "sidecar":
        return [render_configmap(spec, ref)]
    objs = [
        render_service_account(spec, ref),
        render_configmap(spec, ref),
        render_peers_service(spec, ref),
        render_sip_service(spec, ref),
    ]
    policy = render_network_policy(spec, ref)
    if policy is not None:
        objs.append(policy)  # before the pods: they start behind it
    objs += [render_deployment(spec, ref), render_pdb(spec, ref)]
    hpa = render_hpa(spec, ref)
    if hpa is not None:
        objs.append(hpa)
    return objs


def absent_objects(spec: MidRegistrarSpec, ref: Ref) -> list[tuple[str, str, str]]:
    """(apiVersion, kind, name) of owned objects that this spec no longer wants (deleted if present)."""
    if spec.deployment == "sidecar":
        return []  # never had a tier: spec.deployment cannot change (CRD)
    absent: list[tuple[str, str, str]] = []
    if not spec.autoscaling.enabled:
        absent.append(("autoscaling/v2", "HorizontalPodAutoscaler", names(ref)["hpa"]))
    if not spec.network_policy.enabled:
        absent.append(("networking.k8s.io/v1", "NetworkPolicy", names(ref)["networkpolicy"]))
    return absent
