"""Autoscaling on REGISTER rate with the real HPA controller (kube-controller-manager, 5 s sync).

The test serves the metrics APIs itself: an HTTPS server on loopback, registered as the APIServices
v1beta2.custom.metrics.k8s.io (the per-pod Pods metric midregistrar_register_requests_per_second, what
prometheus-adapter derives from midregistrar_register_requests_total) and v1beta1.metrics.k8s.io (pod
CPU). The API server's aggregator reaches it through an ExternalName Service. High load scales the
MidRegistrar up through its scale subresource, the operator carries that to the Deployment, and low load
scales it down only after the stabilization window (a spec value: short here, 600 s by default).
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from kopf.testing import KopfRunner

from midreg_operator.render import REGISTER_RATE_METRIC
from tests.cluster.cluster_helpers import Cluster, midregistrar
from tests.support.controlplane import ControlPlane
from tests.support.wait import WaitTimeout, wait_for

pytestmark = pytest.mark.cluster

CUSTOM = ("custom.metrics.k8s.io", "v1beta2")
RESOURCE = ("metrics.k8s.io", "v1beta1")


class MetricsAPI:
    """Per-namespace REGISTER rate per pod (settable by the test) and a constant low CPU usage."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.rate: dict[str, float] = {}
        self.cpu_millis = 10  # of 100m requested: 10 %, far below the 70 % target
        self.requests: list[str] = []

    def pods(self, ns: str, selector: str) -> list[str]:
        args = ["get", "pods", "-n", ns, "-o", "json"]
        if selector:
            args += ["-l", selector]
        items = json.loads(self.cluster.kubectl(*args).stdout)["items"]
        return [p["metadata"]["name"] for p in items if p["status"].get("phase") == "Running"]

    def handle(self, path: str, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        parts = [p for p in path.split("/") if p]
        selector = (query.get("labelSelector") or [""])[0]
        if parts == ["apis", *CUSTOM]:
            return 200, _resource_list("/".join(CUSTOM), [f"pods/{REGISTER_RATE_METRIC}"])
        if parts == ["apis", *RESOURCE]:
            return 200, _resource_list("/".join(RESOURCE), ["pods", "nodes"])
        # /apis/custom.metrics.k8s.io/v1beta2/namespaces/NS/pods/*/METRIC
        if len(parts) == 8 and parts[:3] == ["apis", *CUSTOM] and parts[5] == "pods":
            ns, metric = parts[4], parts[7]
            if metric != REGISTER_RATE_METRIC:
                return 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404}
            value = f"{int(self.rate.get(ns, 0.0) * 1000)}m"
            items = [
                {
                    "describedObject": {"kind": "Pod", "namespace": ns, "name": pod, "apiVersion": "/v1"},
                    "metric": {"name": metric},
                    "timestamp": now,
                    "windowSeconds": 60,
                    "value": value,
                }
                for pod in self.pods(ns, selector)
            ]
            return 200, {
                "kind": "MetricValueList",
                "apiVersion": "/".join(CUSTOM),
                "metadata": {},
                "items": items,
            }
        # /apis/metrics.k8s.io/v1beta1/namespaces/NS/pods
        if len(parts) == 6 and parts[:3] == ["apis", *RESOURCE] and parts[5] == "pods":
            ns = parts[4]
            items = [
                {
                    "metadata": {"name": pod, "namespace": ns},
                    "timestamp": now,
                    "window": "30s",
                    "containers": [
                        {"name": "registrar", "usage": {"cpu": f"{self.cpu_millis}m", "memory": "64Mi"}}
                    ],
                }
                for pod in self.pods(ns, selector)
            ]
            return 200, {
                "kind": "PodMetricsList",
                "apiVersion": "/".join(RESOURCE),
                "metadata": {},
                "items": items,
            }
        if parts in (["healthz"], ["readyz"], ["livez"]):
            return 200, {}
        return 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404}


def _resource_list(group_version: str, names: list[str]) -> dict[str, Any]:
    kind = "MetricValueList" if "custom" in group_version else "PodMetrics"
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": [
            {
                "name": n,
                "singularName": "",
                "namespaced": n != "nodes",
                "kind": kind,
                "verbs": ["get", "list"],
            }
            for n in names
        ],
    }


def serve(api: MetricsAPI, rig: ControlPlane) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlparse(self.path)
            api.requests.append(url.path)
            try:
                code, body = api.handle(url.path, parse_qs(url.query))
            except Exception as exc:  # a failing kubectl must not kill the server thread
                code, body = 500, {"kind": "Status", "apiVersion": "v1", "message": str(exc), "code": 500}
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    assert rig.pki is not None
    crt, key = rig.pki.sign("test-metrics-api", "/CN=test-metrics-api")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(crt), str(key))
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def metrics_api(cluster: Cluster, rig: ControlPlane) -> Iterator[MetricsAPI]:
    api = MetricsAPI(cluster)
    server = serve(api, rig)
    port = server.server_address[1]
    ns = "midreg-test-metrics"
    cluster.kubectl("create", "namespace", ns, check=False)
    # The aggregator resolves an ExternalName Service to its name: loopback, where the server listens.
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "test-metrics", "namespace": ns},
            "spec": {"type": "ExternalName", "externalName": "localhost", "ports": [{"port": port}]},
        }
    )
    names = []
    for group, version in (CUSTOM, RESOURCE):
        name = f"{version}.{group}"
        names.append(name)
        cluster.apply(
            {
                "apiVersion": "apiregistration.k8s.io/v1",
                "kind": "APIService",
                "metadata": {"name": name},
                "spec": {
                    "group": group,
                    "version": version,
                    "service": {"namespace": ns, "name": "test-metrics", "port": port},
                    "insecureSkipTLSVerify": True,
                    "groupPriorityMinimum": 100,
                    "versionPriority": 100,
                },
            }
        )

    def available() -> bool:
        for name in names:
            obj = cluster.get("apiservice", name) or {}
            conds = {c["type"]: c["status"] for c in obj.get("status", {}).get("conditions", [])}
            if conds.get("Available") != "True":
                return False
        return True

    try:
        wait_for(available, 60, "the test's metrics APIServices Available")
    except WaitTimeout as exc:
        raise AssertionError(
            f"{exc}\n{cluster.get('apiservice', names[0])}\nrequests: {api.requests[-10:]}"
        ) from None
    yield api
    for name in names:
        cluster.kubectl("delete", "apiservice", name, check=False)
    # Until discovery forgets them, the namespace controller stalls on the groups (slow namespace deletion
    # for the tests that follow).
    wait_for(
        lambda: "metrics.k8s.io" not in cluster.kubectl("api-versions").stdout, 30, "metrics groups gone"
    )
    server.shutdown()


def _replicas(cluster: Cluster, kind: str, name: str, ns: str) -> int | None:
    obj = cluster.get(kind, name, ns)
    return None if obj is None else int(obj["spec"].get("replicas", -1))


def test_register_rate_scales_up_then_down_after_the_window(
    cluster: Cluster, operator: KopfRunner, metrics_api: MetricsAPI
) -> None:
    ns = f"hpa-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    window = 15
    metrics_api.rate[ns] = 25.0  # per pod, target 10: one pod wants ceil(25 / 10) = 3
    cluster.apply(
        midregistrar(
            "load",
            ns,
            replicas=1,
            autoscaling={
                "enabled": True,
                "minReplicas": 1,
                "maxReplicas": 4,
                "targetRegistersPerSecond": 10,
                "scaleDownStabilizationSeconds": window,
            },
        )
    )
    hpa = wait_for(lambda: cluster.get("hpa", "load", ns), 30, "HPA rendered by the operator")
    assert {m["type"] for m in hpa["spec"]["metrics"]} == {"Resource", "Pods"}

    def diag() -> str:
        return json.dumps((cluster.get("hpa", "load", ns) or {}).get("status"), indent=1) + str(
            metrics_api.requests[-5:]
        )

    try:
        wait_for(
            lambda: _replicas(cluster, "midreg", "load", ns) == 3, 60, "HPA scales the MidRegistrar to 3"
        )
        wait_for(lambda: _replicas(cluster, "deployment", "load", ns) == 3, 30, "operator follows to 3")
    except WaitTimeout as exc:
        raise AssertionError(f"{exc}\n{diag()}") from None
    status = (cluster.get("hpa", "load", ns) or {})["status"]
    pods_metric = [m for m in status.get("currentMetrics") or [] if m["type"] == "Pods"]
    assert pods_metric and pods_metric[0]["pods"]["metric"]["name"] == REGISTER_RATE_METRIC

    metrics_api.rate[ns] = 1.0  # 3 pods at 1/s against 10/s: one pod is enough
    low_since = time.monotonic()
    try:
        wait_for(
            lambda: _replicas(cluster, "midreg", "load", ns) == 1, window + 45, "scale-down after the window"
        )
    except WaitTimeout as exc:
        raise AssertionError(f"{exc}\n{diag()}") from None
    elapsed = time.monotonic() - low_since
    # The last high recommendation may predate the drop by one sync (5 s): the window still holds.
    assert elapsed >= window - 6, f"scaled down after {elapsed:.1f}s, before the {window}s window"
    wait_for(lambda: _replicas(cluster, "deployment", "load", ns) == 1, 30, "operator follows to 1")
    cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
