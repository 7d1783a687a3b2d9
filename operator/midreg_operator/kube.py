"""A small, typed layer over the kubernetes client's transport: server-side apply, get, delete, patch.

The generated API classes would need one method per kind; the operator only needs four verbs on a handful
of kinds, so it speaks the REST paths directly (auth, TLS and kubeconfig handling stay the client's).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import kubernetes

from .render import FIELD_MANAGER

# apiVersion/kind -> plural (every kind the operator touches)
PLURALS: dict[tuple[str, str], str] = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("v1", "Secret"): "secrets",
    ("v1", "Pod"): "pods",
    ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration"): "mutatingwebhookconfigurations",
    ("apps/v1", "Deployment"): "deployments",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscalers",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("sip.midregistrar.io/v1alpha1", "MidRegistrar"): "midregistrars",
}


class KubeError(Exception):
    def __init__(self, status: int, reason: str, body: dict[str, Any] | None = None) -> None:
        self.status = status
        self.reason = reason
        self.body = body or {}
        super().__init__(f"{status} {reason}: {self.body.get('message', '')}".strip())

    @property
    def not_found(self) -> bool:
        return self.status == 404


def object_path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    """The REST path of a kind's collection or one object; ``namespace`` None for a cluster-scoped kind."""
    plural = PLURALS[(api_version, kind)]
    root = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = f"{root}/namespaces/{namespace}/{plural}" if namespace is not None else f"{root}/{plural}"
    return f"{path}/{name}" if name else path


@dataclass
class Kube:
    api: Any  # kubernetes.client.ApiClient

    @classmethod
    def from_environment(cls) -> Kube:
        """In-cluster credentials when running in a pod, else the kubeconfig ($KUBECONFIG or ~/.kube)."""
        try:
            kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
        except kubernetes.config.ConfigException:
            # Read $KUBECONFIG now: the client library captures it once, when it is first imported.
            kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))  # type: ignore[no-untyped-call]
        return cls(kubernetes.client.ApiClient())

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        serialized = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = self.api.call_api(*serialized, _request_timeout=timeout)
        raw = resp.read()
        data: dict[str, Any] = {}
        if raw:
            try:
                data = json.loads(raw)
            except ValueError:
                data = {"message": raw[:200].decode(errors="replace")}
        if resp.status >= 400:
            raise KubeError(resp.status, str(resp.reason), data)
        return data

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply with the operator's field manager (forcing: the operator owns these fields)."""
        meta = obj["metadata"]
        path = object_path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        return self.request(
            "PATCH",
            path,
            body=obj,
            query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
            content_type="application/apply-patch+yaml",
        )

    def list(
        self, api_version: str, kind: str, namespace: str | None, label_selector: str = ""
    ) -> list[dict[str, Any]]:
        query = [("labelSelector", label_selector)] if label_selector else []
        data = self.request("GET", object_path(api_version, kind, namespace), query=query)
        return list(data.get("items") or [])

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        return self.request(
            "POST", object_path(obj["apiVersion"], obj["kind"], meta.get("namespace")), body=obj
        )

    def replace(self, obj: dict[str, Any]) -> dict[str, Any]:
        """PUT: a 409 when ``metadata.resourceVersion`` is not the stored one (another writer won)."""
        meta = obj["metadata"]
        path = object_path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        return self.request("PUT", path, body=obj)

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", object_path(api_version, kind, namespace, name))
        except KubeError as exc:
            if exc.not_found:
                return None
            raise

    def delete(self, api_version: str, kind: str, namespace: str, name: str, uid: str | None = None) -> bool:
        """Delete one object; with ``uid``, only that very object (a precondition: not a namesake)."""
        body = {"preconditions": {"uid": uid}} if uid else None
        try:
            self.request("DELETE", object_path(api_version, kind, namespace, name), body=body)
        except KubeError as exc:
            if exc.not_found:
                return False
            raise
        return True

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        path = object_path("sip.midregistrar.io/v1alpha1", "MidRegistrar", namespace, name) + "/status"
        return self.request(
            "PATCH", path, body={"status": status}, content_type="application/merge-patch+json"
        )
