"""Helpers shared by the cluster tests: kubectl reads and writes as cluster admin, MidRegistrar objects and
their conditions."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.support.controlplane import ControlPlane


class Cluster:
    """Test-side helpers over the control plane (as cluster admin unless a kubeconfig is given)."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, kubeconfig: Path | None = None
    ):  # type: ignore[no-untyped-def]
        return self.cp.kubectl(*args, input=input, check=check, kubeconfig=kubeconfig)

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        args = ["get", kind, name, "-o", "json"]
        if namespace:
            args += ["-n", namespace]
        proc = self.kubectl(*args, check=False)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr or "not found" in proc.stderr:
                return None
            raise AssertionError(proc.stderr)
        data: dict[str, Any] = json.loads(proc.stdout)
        return data

    def apply(self, manifest: dict[str, Any] | str) -> None:
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        self.kubectl("apply", "-f", "-", input=text)

    def create(self, manifest: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        return self.kubectl("create", "-f", "-", input=json.dumps(manifest), check=False)


def midregistrar(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "mainRegistrar": "sip:pbx.example.com:5060",
        "network": {"serviceType": "NodePort"},
    }
    body.update(spec)
    return {
        "apiVersion": "sip.midregistrar.io/v1alpha1",
        "kind": "MidRegistrar",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return {}
