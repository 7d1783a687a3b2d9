"""The metrics pipeline users run, on the node's control plane: Prometheus scraping the registrar pods through
Kubernetes service discovery with the chart's scrape configuration and loading the chart's alert rules,
prometheus-adapter serving the chart's rule as ``custom.metrics.k8s.io``, metrics-server reading the real
kubelet for ``metrics.k8s.io``, and kube-state-metrics for the HPA and pod series. All four are built from Go
modules (scripts/metrics-rig.sh) and run as processes on the host, like the control plane: the API server's
aggregator reaches the two extension API servers through ExternalName Services naming ``localhost`` and
verifies them with the cluster CA, and they trust it back through its front-proxy certificate."""

from __future__ import annotations

import base64
import json
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.support.controlplane import ControlPlane
from tests.support.helm import CHART
from tests.support.metricsrig import metrics_bindir
from tests.support.node import Node
from tests.support.pki import Pki
from tests.support.ports import free_port
from tests.support.process import Proc
from tests.support.wait import WaitTimeout, wait_for

SCRAPE_CONFIG = CHART / "files" / "prometheus" / "scrape-config.yaml"
ALERT_RULES = CHART / "files" / "prometheus" / "alerts.yaml"
NAMESPACE = "midreg-monitoring"
# The APIServices and the ExternalName Service each points at.
API_SERVICES = {
    "v1beta2.custom.metrics.k8s.io": ("custom.metrics.k8s.io", "v1beta2", "prometheus-adapter"),
    "v1beta1.metrics.k8s.io": ("metrics.k8s.io", "v1beta1", "metrics-server"),
}
SCRAPE_SECONDS = 5


class PrometheusError(RuntimeError):
    pass


@dataclass
class Pipeline:
    """Start with :meth:`start`, stop with :meth:`stop` (by PID); query Prometheus with :meth:`query`."""

    node: Node
    adapter_rules: str  # prometheus-adapter's config.yaml, as the chart rendered it
    workdir: Path
    procs: list[Proc] = field(default_factory=list)
    prometheus_port: int = 0
    ports: dict[str, int] = field(default_factory=dict)  # extension API server → its port
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    def start(self) -> Pipeline:
        t0 = time.monotonic()
        bindir = metrics_bindir()
        self.timings["binaries_s"] = time.monotonic() - t0
        try:
            t1 = time.monotonic()
            ksm_port = self._kube_state_metrics(bindir)
            self._prometheus(bindir, ksm_port)
            self._extension(bindir, "prometheus-adapter", self._adapter_args())
            self._extension(bindir, "metrics-server", self._metrics_server_args())
            self._register_api_services()
            self.timings["available_s"] = time.monotonic() - t1
        except BaseException:
            self.stop()
            raise
        return self

    # -- processes

    def _start(self, name: str, argv: list[str]) -> Proc:
        proc = Proc(argv, self.workdir, name)
        self.procs.append(proc)
        self.node.adopt([proc])
        return proc

    @property
    def _cp(self) -> ControlPlane:
        assert self.node.cp is not None and self.node.cp.pki is not None
        return self.node.cp

    @property
    def _pki(self) -> Pki:
        assert self._cp.pki is not None
        return self._cp.pki

    def _kube_state_metrics(self, bindir: Path) -> int:
        port = free_port()
        proc = self._start(
            "kube-state-metrics",
            [
                str(bindir / "kube-state-metrics"),
                f"--kubeconfig={self._cp.kubeconfig}",
                "--host=127.0.0.1",
                f"--port={port}",
                "--telemetry-host=127.0.0.1",
                f"--telemetry-port={free_port()}",
                "--resources=pods,deployments,horizontalpodautoscalers",
            ],
        )
        wait_for(lambda: _http_ok(f"http://127.0.0.1:{port}/healthz"), 60, "kube-state-metrics", proc=proc)
        return port

    def _prometheus(self, bindir: Path, ksm_port: int) -> None:
        jobs = yaml.safe_load(SCRAPE_CONFIG.read_text())
        for job in jobs:
            job["scrape_interval"] = f"{SCRAPE_SECONDS}s"
            for sd in job.get("kubernetes_sd_configs", []):
                sd["kubeconfig_file"] = str(self._cp.kubeconfig)  # Prometheus runs off-cluster here
        jobs.append(
            {
                "job_name": "kube-state-metrics",
                "scrape_interval": f"{SCRAPE_SECONDS}s",
                "static_configs": [{"targets": [f"127.0.0.1:{ksm_port}"]}],
            }
        )
        config = {
            "global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "evaluation_interval": f"{SCRAPE_SECONDS}s"},
            "rule_files": [str(ALERT_RULES)],
            "scrape_configs": jobs,
        }
        path = self.workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.prometheus_port = free_port()
        proc = self._start(
            "prometheus",
            [
                str(bindir / "prometheus"),
                f"--config.file={path}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.prometheus_port}",
                "--storage.tsdb.retention.time=2h",
            ],
        )
        wait_for(lambda: _http_ok(f"{self.prometheus_url}/-/ready"), 60, "Prometheus ready", proc=proc)

    def _serving_cert(self, name: str) -> tuple[Path, Path]:
        svc = f"{name}.{NAMESPACE}.svc"
        return self._pki.sign(name, f"/CN={svc}", san=f"DNS:{svc},DNS:localhost,IP:127.0.0.1", server=True)

    def _adapter_args(self) -> list[str]:
        rules = self.workdir / "adapter-rules.yaml"
        rules.write_text(self.adapter_rules)
        return [
            f"--lister-kubeconfig={self._cp.kubeconfig}",
            f"--prometheus-url={self.prometheus_url}/",
            f"--config={rules}",
            "--metrics-relist-interval=10s",
        ]

    def _metrics_server_args(self) -> list[str]:
        pki = self._pki
        crt, key = pki.sign("metrics-server-kubelet-client", "/CN=metrics-server")
        return [
            f"--kubeconfig={self._cp.kubeconfig}",
            "--kubelet-use-node-status-port",
            f"--kubelet-client-certificate={crt}",
            f"--kubelet-client-key={key}",
            f"--kubelet-certificate-authority={pki.ca}",
            "--kubelet-preferred-address-types=InternalIP",
            "--metric-resolution=15s",
        ]

    def _extension(self, bindir: Path, name: str, args: list[str]) -> None:
        """An extension API server on loopback, authenticating and authorising through the API server."""
        crt, key = self._serving_cert(name)
        kc = str(self._cp.kubeconfig)
        port = free_port()
        self.ports[name] = port
        self._start(
            name,
            [
                str(bindir / name),
                f"--secure-port={port}",
                "--bind-address=127.0.0.1",
                f"--tls-cert-file={crt}",
                f"--tls-private-key-file={key}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                f"--cert-dir={self.workdir / (name + '-certs')}",
                *args,
            ],
        )

    def _register_api_services(self) -> None:
        kube = self._cp
        kube.kubectl("create", "namespace", NAMESPACE, check=False)
        ca_bundle = _b64(self._pki.ca.read_bytes())
        objs: list[dict[str, Any]] = []
        for name, (group, version, server) in API_SERVICES.items():
            port = self.ports[server]
            objs.append(
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": server, "namespace": NAMESPACE},
                    "spec": {"type": "ExternalName", "externalName": "localhost", "ports": [{"port": port}]},
                }
            )
            objs.append(
                {
                    "apiVersion": "apiregistration.k8s.io/v1",
                    "kind": "APIService",
                    "metadata": {"name": name},
                    "spec": {
                        "group": group,
                        "version": version,
                        "service": {"namespace": NAMESPACE, "name": server, "port": port},
                        "caBundle": ca_bundle,
                        "groupPriorityMinimum": 100,
                        "versionPriority": 100,
                    },
                }
            )
        kube.kubectl(
            "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objs})
        )

        def available() -> bool:
            for name in API_SERVICES:
                proc = kube.kubectl("get", "apiservice", name, "-o", "json", check=False)
                if proc.returncode != 0:
                    return False
                conds = {
                    c["type"]: c["status"] for c in json.loads(proc.stdout)["status"].get("conditions", [])
                }
                if conds.get("Available") != "True":
                    return False
            return True

        try:
            wait_for(
                available, 90, "APIServices custom.metrics.k8s.io and metrics.k8s.io Available", interval=1
            )
        except WaitTimeout as exc:
            detail = "\n".join(
                kube.kubectl("get", "apiservice", name, "-o", "yaml", check=False).stdout
                for name in API_SERVICES
            )
            raise AssertionError(f"{exc}\n{detail}\n{self.logs()}") from None

    def api_service_conditions(self) -> dict[str, dict[str, str]]:
        out = {}
        for name in API_SERVICES:
            obj = json.loads(self._cp.kubectl("get", "apiservice", name, "-o", "json").stdout)
            out[name] = {c["type"]: c["status"] for c in obj["status"].get("conditions", [])}
        return out

    # -- use

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query: the result vector (``[{"metric": {...}, "value": [t, "v"]}, ...]``)."""
        url = f"{self.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read())
        if body.get("status") != "success":
            raise PrometheusError(f"{expr}: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The single value of a query that returns one series (None: no data)."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def rules(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.prometheus_url}/api/v1/rules", timeout=10) as resp:
            groups: list[dict[str, Any]] = json.loads(resp.read())["data"]["groups"]
        return groups

    def targets(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.prometheus_url}/api/v1/targets", timeout=10) as resp:
            active: list[dict[str, Any]] = json.loads(resp.read())["data"]["activeTargets"]
        return active

    def logs(self, n: int = 20) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.tail(n)}" for p in self.procs)

    def stop(self) -> None:
        if self.node.cp is not None:
            for name in API_SERVICES:
                self.node.cp.kubectl("delete", "apiservice", name, "--ignore-not-found", check=False)
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
