"""The MidRegistrar spec as a typed model, with the same defaults as the CRD schema.

The API server applies the CRD's defaults and validation before the operator sees an object; the model
repeats the defaults so renderers can be unit-tested on partial specs and stay total.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

GROUP = "sip.midregistrar.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "MidRegistrar"
PLURAL = "midregistrars"


class _Model(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)


class Expires(_Model):
    min: int = 60
    default: int = 3600
    max: int = 3600


class Transport(_Model):
    protocol: Literal["udp", "tcp", "tls", "ws", "wss"]
    port: int = Field(ge=1, le=65535)

    @property
    def kube_protocol(self) -> str:
        """The protocol a container port or Service port says: TLS and WebSocket run over TCP."""
        return "UDP" if self.protocol == "udp" else "TCP"


class Tls(_Model):
    secret_name: str | None = Field(None, alias="secretName")
    verify_clients: bool = Field(False, alias="verifyClients")
    main_ca_secret_name: str | None = Field(None, alias="mainCASecretName")


class Network(_Model):
    mode: Literal["hostNetwork", "service"] = "service"
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(
        "LoadBalancer", alias="serviceType"
    )
    annotations: dict[str, str] = Field(default_factory=dict)
    advertise: str | None = None


class Etcd(_Model):
    endpoints: list[str] = Field(default_factory=list)
    secret_name: str | None = Field(None, alias="secretName")
    prefix: str | None = None


class Autoscaling(_Model):
    enabled: bool = False
    min_replicas: int = Field(2, alias="minReplicas")
    max_replicas: int = Field(10, alias="maxReplicas")
    target_registers_per_second: int | None = Field(None, alias="targetRegistersPerSecond")
    target_cpu_utilization_percentage: int | None = Field(70, alias="targetCPUUtilizationPercentage")
    scale_down_stabilization_seconds: int = Field(600, alias="scaleDownStabilizationSeconds")


class Sidecar(_Model):
    """deployment sidecar: where the PBX listens behind the injected registrar, and what the API server does
    when the injection webhook cannot be reached."""

    pbx_port: int = Field(alias="pbxPort", ge=1, le=65535)
    failure_policy: Literal["Fail", "Ignore"] = Field("Fail", alias="failurePolicy")


class NetworkPolicy(_Model):
    """The NetworkPolicy rendered for a tier of registrar pods (docs/operator.md "Network policy"). The peers
    are NetworkPolicyPeer objects, passed through as given (the CRD validates their shape)."""

    enabled: bool = True
    # Who may reach the HTTP port (/metrics, /healthz, /readyz, /v1/aors): nobody but the node by default.
    metrics_from: list[dict[str, Any]] = Field(default_factory=list, alias="metricsFrom")
    # Who may reach the SIP ports: anyone by default (phones come from anywhere).
    sip_from: list[dict[str, Any]] = Field(default_factory=list, alias="sipFrom")


class Limits(_Model):
    """Per-source guards of each pod (docs/operations.md "Floods"): an SBC or a carrier-grade NAT sends many
    phones from one address and must be trusted or given room. ``trusted_sources`` None keeps the
    registrar's default (loopback)."""

    source_rate_limit: int = Field(500, alias="sourceRateLimit", ge=0)
    source_block_seconds: int = Field(10, alias="sourceBlockSeconds", ge=0)
    trusted_sources: list[str] | None = Field(None, alias="trustedSources")
    max_connections_per_source: int = Field(1000, alias="maxConnectionsPerSource", ge=0)


def _default_transports() -> list[Transport]:
    return [Transport(protocol="udp", port=5060), Transport(protocol="tcp", port=5060)]


class MidRegistrarSpec(_Model):
    deployment: Literal["pods", "sidecar"] = "pods"
    sidecar: Sidecar | None = None
    main_registrar_uri: str | None = Field(None, alias="mainRegistrar")
    mode: Literal["mirror", "contact", "aor"] = "mirror"
    insertion: Literal["contact", "path"] = "contact"
    outgoing_expires: int = Field(7200, alias="outgoingExpires")
    expires: Expires = Field(default_factory=lambda: Expires())
    max_contacts: int = Field(0, alias="maxContacts")
    refresh_templates: int = Field(100_000, alias="refreshTemplates", ge=0)
    limits: Limits = Field(default_factory=lambda: Limits.model_validate({}))
    transports: list[Transport] = Field(default_factory=_default_transports, min_length=1)
    tls: Tls = Field(default_factory=lambda: Tls.model_validate({}))
    http_port: int = Field(9090, alias="httpPort")
    network: Network = Field(default_factory=lambda: Network.model_validate({}))
    etcd: Etcd = Field(default_factory=lambda: Etcd.model_validate({}))
    replicas: int = 2
    autoscaling: Autoscaling = Field(default_factory=lambda: Autoscaling.model_validate({}))
    network_policy: NetworkPolicy = Field(
        default_factory=lambda: NetworkPolicy.model_validate({}), alias="networkPolicy"
    )
    image: str = "ghcr.io/kube-midregistrar/registrar:0.1.0"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", alias="imagePullPolicy"
    )
    log_format: Literal["text", "json"] = Field("json", alias="logFormat")
    termination_grace_period_seconds: int = Field(60, alias="terminationGracePeriodSeconds")
    resources: dict[str, Any] = Field(
        default_factory=lambda: {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"memory": "512Mi"},
        }
    )
    node_selector: dict[str, str] = Field(default_factory=dict, alias="nodeSelector")
    tolerations: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def main_registrar(self) -> str:
        """The main registrar's URI: as given, else (a sidecar) the PBX on the pod's loopback."""
        if self.main_registrar_uri:
            return self.main_registrar_uri
        if self.sidecar is not None:
            return f"sip:127.0.0.1:{self.sidecar.pbx_port}"
        raise ValueError("spec.mainRegistrar is required")


class Ref(_Model):
    """Who a rendering is for: the MidRegistrar's identity (owner reference and names)."""

    name: str
    namespace: str
    uid: str = ""
    generation: int = 0


def parse_spec(spec: Any) -> MidRegistrarSpec:
    return MidRegistrarSpec.model_validate(dict(spec or {}))


def etcd_prefix(spec: MidRegistrarSpec, ref: Ref) -> str:
    """The registrar's etcd key prefix: `/midregistrar/<namespace>/<name>/` unless set (architecture "Shared
    state in etcd")."""
    return spec.etcd.prefix or f"/midregistrar/{ref.namespace}/{ref.name}/"
