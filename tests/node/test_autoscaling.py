"""Autoscaling on real metrics, on the real node: the registrar pods' own counter scraped by Prometheus (the
chart's scrape configuration), turned into the per-pod custom metric by prometheus-adapter (the rule the chart
renders), read by the real HPA controller through the aggregated API; CPU from metrics-server reading the real
kubelet. Then every panel of the chart's Grafana dashboard is run against that Prometheus.

The tests of this module run in order on one MidRegistrar (its own namespace), Kamailio as the main registrar:

1. 300 phones refreshing every 5 s (60 REGISTER/s) against a target of 25 per pod: the HPA scales the
   MidRegistrar 1 → 3 through its scale subresource, the operator carries it to the Deployment; the reaction
   time from the load's start to the third pod Ready is printed.
2. New phones (other addresses) land on the new pods: the per-pod rate falls below the target.
3. The heavy phones stop: the HPA scales in only after the stabilization window, and the phones left, which
   the drained pods held, stay registered (0 failed REGISTERs).
4. The CPU target alone (metrics-server, the real kubelet's figures) scales it out again.
"""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.e2e import (
    ETCD_ENDPOINT,
    RELEASE,
    SELECTOR,
    SYSTEM_NS,
    Addr,
    Kube,
    call_every_device,
    example,
    outcomes,
    pod_ready,
    start_kamailio,
    wait_midreg_ready,
)
from tests.support.helm import CHART
from tests.support.kamailio import KamailioMain
from tests.support.monitoring import Pipeline
from tests.support.node import HOST_IP, LINK_PREFIX, PHONE_IPS, Node
from tests.support.phones import Fleet
from tests.support.wait import WaitTimeout, poll, wait_for

pytestmark = pytest.mark.node

NS = "voip-scale"
NAME = "scale"
TARGET = 25  # REGISTER/s per pod
WINDOW = 45  # scaleDownStabilizationSeconds
EVERY_MS = 5000
EXPIRES = 60
HEAVY_USERS = 150  # per fleet, two fleets: 60 REGISTER/s
LIGHT_USERS = 10  # per fleet, six fleets on addresses of their own: 12 REGISTER/s
LIGHT_IPS = tuple(f"{LINK_PREFIX}.{i}" for i in range(21, 27))
DASHBOARD = CHART / "files" / "grafana" / "midregistrar.json"
RATE_METRIC_PATH = (
    f"/apis/custom.metrics.k8s.io/v1beta2/namespaces/{NS}/pods/*/midregistrar_register_requests_per_second"
)


@dataclass
class Scale:
    """The MidRegistrar under test and what the tests measured on it, in order."""

    kube: Kube
    pipeline: Pipeline
    heavy: list[Fleet] = field(default_factory=list)
    light: list[Fleet] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)

    @property
    def selector(self) -> str:
        return SELECTOR.format(NAME)

    def replicas(self, kind: str) -> int:
        obj = self.kube.json("get", kind, "-n", NS, NAME)
        return int(obj["spec"].get("replicas", -1))

    def hpa(self) -> dict[str, Any]:
        return self.kube.json("get", "hpa", "-n", NS, NAME)

    def pod_rates(self) -> dict[str, float]:
        """The per-pod REGISTER rate as the HPA reads it: custom.metrics.k8s.io, served by prometheus-adapter."""
        data = json.loads(self.kube("get", "--raw", RATE_METRIC_PATH))
        return {i["describedObject"]["name"]: _quantity(i["value"]) for i in data["items"]}

    def diag(self) -> str:
        hpa = self.hpa()
        events = self.kube("get", "events", "-n", NS, "--sort-by=.lastTimestamp", check=False)[-3000:]
        return (
            f"hpa status: {json.dumps(hpa.get('status'), indent=1)}\nevents:\n{events}\n"
            f"{self.pipeline.logs(10)}"
        )


_SUFFIX = {"n": 1e-9, "u": 1e-6, "m": 1e-3}


def _quantity(q: str) -> float:
    """A Kubernetes quantity as the metrics APIs write it ("8094168n", "1500m", "12")."""
    return float(q[:-1]) * _SUFFIX[q[-1]] if q[-1] in _SUFFIX else float(q)


def _midregistrar(kamailio: KamailioMain) -> dict[str, Any]:
    (mr,) = [d for d in example("contact-loadbalancer.yaml") if d["kind"] == "MidRegistrar"]
    mr = copy.deepcopy(mr)
    mr["metadata"] = {"name": NAME, "namespace": NS}
    spec = mr["spec"]
    spec["mainRegistrar"] = f"sip:{HOST_IP}:{kamailio.port}"
    spec["network"] = {"mode": "service", "serviceType": "NodePort"}
    spec["etcd"]["endpoints"] = [ETCD_ENDPOINT]
    spec["replicas"] = 1
    spec["terminationGracePeriodSeconds"] = 30
    spec["resources"] = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
    spec["autoscaling"] = {
        "enabled": True,
        "minReplicas": 1,
        "maxReplicas": 3,
        "targetRegistersPerSecond": TARGET,
        "targetCPUUtilizationPercentage": 90,
        "scaleDownStabilizationSeconds": WINDOW,
    }
    return mr


@pytest.fixture(scope="module")
def kamailio(tmp_path_factory: pytest.TempPathFactory, node: Node) -> Iterator[KamailioMain]:
    """A main registrar of this module's own: the session's Kamailio counts the other tests' phones only."""
    kam = start_kamailio(tmp_path_factory.mktemp("kamailio-scale"))
    yield kam
    kam.stop()


@pytest.fixture(scope="module")
def pipeline(
    tmp_path_factory: pytest.TempPathFactory, node: Node, kube: Kube, platform: dict[str, float]
) -> Iterator[Pipeline]:
    rules = kube.json("get", "configmap", "-n", SYSTEM_NS, f"{RELEASE}-adapter-rules")["data"]["config.yaml"]
    p = Pipeline(node, rules, tmp_path_factory.mktemp("metrics")).start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def scale(
    tmp_path_factory: pytest.TempPathFactory,
    node: Node,
    kube: Kube,
    pipeline: Pipeline,
    kamailio: KamailioMain,
) -> Iterator[Scale]:
    assert node.state is not None
    for ip in LIGHT_IPS:
        subprocess.run(["ip", "addr", "add", f"{ip}/24", "dev", node.state.host_if], check=True)
    kube("create", "namespace", NS, check=False)
    kube.apply(_midregistrar(kamailio))
    wait_midreg_ready(kube, NS, NAME, 1)
    tmp = tmp_path_factory.mktemp("scale-phones")
    s = Scale(kube, pipeline)
    s.heavy = [
        Fleet(tmp, f"h{i}", [f"h{i}u{j:03d}" for j in range(HEAVY_USERS)], expires=EXPIRES, every_ms=EVERY_MS,
              local_ip=PHONE_IPS[i])
        for i in range(2)
    ]  # fmt: skip
    s.light = [
        Fleet(tmp, f"l{i}", [f"l{i}u{j:03d}" for j in range(LIGHT_USERS)], expires=EXPIRES, every_ms=EVERY_MS,
              local_ip=ip)
        for i, ip in enumerate(LIGHT_IPS)
    ]  # fmt: skip
    yield s
    for f in s.heavy + s.light:
        f.stop()
    print("autoscaling figures: " + json.dumps({k: round(v, 1) for k, v in s.figures.items()}))
    kube("delete", "namespace", NS, "--wait=false", check=False)
    for ip in LIGHT_IPS:
        subprocess.run(["ip", "addr", "del", f"{ip}/24", "dev", node.state.host_if], check=False)


def _service(kube: Kube) -> Addr:
    svc = kube.json("get", "service", "-n", NS, NAME)
    udp = next(p for p in svc["spec"]["ports"] if p["protocol"] == "UDP")
    return Addr("clusterip", svc["spec"]["clusterIP"], udp["port"])


# ------------------------------------------------------------------------------------------------ tests


def test_the_pipeline_serves_both_metrics_apis_and_loads_the_chart_rules(pipeline: Pipeline) -> None:
    conds = pipeline.api_service_conditions()
    assert all(c.get("Available") == "True" for c in conds.values()), conds
    groups = {g["name"]: g for g in pipeline.rules()}
    alerts = [r["name"] for g in groups.values() for r in g["rules"] if r["type"] == "alerting"]
    assert len(alerts) >= 7 and all(a.startswith("MidRegistrar") for a in alerts), alerts
    assert all(g["rules"] and all(r["health"] != "err" for r in g["rules"]) for g in groups.values()), groups
    print(f"metrics pipeline: {json.dumps(pipeline.timings)}")


def test_register_rate_scales_out_through_prometheus_adapter(scale: Scale) -> None:
    kube = scale.kube
    target = _service(kube)
    t0 = time.monotonic()
    for f in scale.heavy:
        f.start(target)
    try:
        wait_for(lambda: scale.replicas("midreg") == 3, 180, "the HPA scales the MidRegistrar to 3")
        scale.figures["load_to_decision_s"] = time.monotonic() - t0
        wait_for(lambda: scale.replicas("deployment") == 3, 30, "the operator carries 3 to the Deployment")
        wait_midreg_ready(kube, NS, NAME, 3, timeout=120)
    except WaitTimeout as exc:
        raise AssertionError(f"{exc}\n{scale.diag()}") from None
    scale.figures["load_to_3_ready_s"] = time.monotonic() - t0
    status = scale.hpa()["status"]
    pods_metric = [m for m in status.get("currentMetrics") or [] if m["type"] == "Pods"]
    assert (
        pods_metric
        and pods_metric[0]["pods"]["metric"]["name"] == "midregistrar_register_requests_per_second"
    )
    # What the HPA acted on came from the registrars' counter: Prometheus has it for the first pod.
    rate = scale.pipeline.value(
        f'sum(rate(midregistrar_register_requests_total{{namespace="{NS}",midregistrar="{NAME}"}}[30s]))'
    )
    assert rate is not None and rate > TARGET, rate
    scale.figures["rate_before_per_s"] = rate


def test_new_phones_land_on_the_new_pods_and_the_per_pod_rate_falls(scale: Scale) -> None:
    kube = scale.kube
    target = _service(kube)
    for f in scale.light:
        f.start(target)
    for f in scale.light:
        assert f.wait_ok(1, 60), f.describe()

    def spread() -> dict[str, float] | None:
        rates = scale.pod_rates()
        ready = {p["metadata"]["name"] for p in kube.ready_pods(NS, scale.selector)}
        carrying = [p for p, r in rates.items() if p in ready and r > 0.5]
        average = sum(rates.values()) / max(1, len(rates))
        return rates if len(carrying) >= 2 and average < TARGET else None

    try:
        rates = wait_for(
            spread, 120, "two or more pods carrying REGISTERs and the average below the target", interval=3
        )
    except WaitTimeout as exc:
        raise AssertionError(f"{exc}\n{scale.pod_rates()}\n{scale.diag()}") from None
    scale.figures["per_pod_rate_after"] = sum(rates.values()) / len(rates)
    print(f"per-pod REGISTER rate after scale-out: {rates}")


def test_scale_in_waits_for_the_window_and_drained_phones_stay_registered(scale: Scale) -> None:
    kube = scale.kube
    since = {f.name: int((time.time() - f.cseq_base) * 1000) for f in scale.light}
    for f in scale.heavy:
        f.stop()
    low_since = time.monotonic()
    before = {p["metadata"]["name"] for p in kube.ready_pods(NS, scale.selector)}
    try:
        wait_for(lambda: scale.replicas("midreg") == 1, WINDOW + 150, "scale-in to 1", interval=2)
    except WaitTimeout as exc:
        raise AssertionError(f"{exc}\n{scale.diag()}") from None
    elapsed = time.monotonic() - low_since
    scale.figures["load_drop_to_scale_in_s"] = elapsed
    assert elapsed >= WINDOW - 6, f"scaled in after {elapsed:.1f} s, before the {WINDOW} s window"
    wait_midreg_ready(kube, NS, NAME, 1, timeout=120)
    after = {p["metadata"]["name"] for p in kube.ready_pods(NS, scale.selector)}
    drained = before - after
    assert len(drained) == 2, (before, after)
    # Two more refresh rounds after the last pod went: every light phone answered, none failed.
    counts = [f.ok_counts() for f in scale.light]
    for f, c in zip(scale.light, counts, strict=True):
        assert f.wait_ok(c, 60), f.describe()
        assert f.wait_ok(f.ok_counts(), 60), f.describe()
    failed = [
        f"{f.name} {o.user} cseq={o.sent} {o.code}"
        for f in scale.light
        for o in outcomes(f)
        if o.sent >= since[f.name] and o.code != "ok"
    ]
    assert not failed, failed[:20]


def test_cpu_target_alone_scales_out_with_metrics_server(scale: Scale) -> None:
    kube = scale.kube
    # Real pod CPU from the kubelet, through metrics-server and the aggregated API.
    usage = json.loads(kube("get", "--raw", f"/apis/metrics.k8s.io/v1beta1/namespaces/{NS}/pods"))
    cpu = {i["metadata"]["name"]: _quantity(i["containers"][0]["usage"]["cpu"]) for i in usage["items"]}
    assert cpu and all(v > 0 for v in cpu.values()), usage
    status = scale.hpa()["status"]
    seen = [m["resource"]["current"] for m in status.get("currentMetrics") or [] if m["type"] == "Resource"]
    assert seen and seen[0].get("averageUtilization", 0) >= 1, status  # what the HPA read, in % of request
    utilization = int(seen[0]["averageUtilization"])
    # The REGISTER target out of reach, the CPU target under what the pod uses now: only CPU can ask for
    # more pods.
    kube(
        "patch", "midreg", "-n", NS, NAME, "--type=merge", "-p",
        json.dumps({"spec": {"autoscaling": {
            "targetRegistersPerSecond": 1000, "targetCPUUtilizationPercentage": max(1, utilization // 3),
        }}}),
    )  # fmt: skip
    t0 = time.monotonic()
    try:
        wait_for(lambda: scale.replicas("midreg") > 1, 120, "CPU above its target scales out", interval=1)
    except WaitTimeout as exc:
        raise AssertionError(f"{exc}\ncpu: {cpu}\n{scale.diag()}") from None
    scale.figures["cpu_target_to_decision_s"] = time.monotonic() - t0
    scale.figures["cpu_utilization_pct"] = utilization
    events = kube(
        "get", "events", "-n", NS, "--field-selector", "involvedObject.kind=HorizontalPodAutoscaler"
    )
    assert re.search(r"cpu resource utilization \(percentage of request\) above target", events), events


def test_every_dashboard_panel_returns_data(tmp_path: Path, scale: Scale, kamailio: KamailioMain) -> None:
    """After the load runs above and a few calls from the main registrar (the lookups panel), every query
    of every panel, variables filled in, returns series."""
    call_every_device(tmp_path, kamailio, scale.light, [f.users[0] for f in scale.light], "dashboard", rate=5)
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in _panels(dashboard["panels"]) if p.get("targets")]
    assert panels
    queries = [
        (
            str(panel.get("title")),
            t["expr"]
            .replace("$namespace", NS)
            .replace("$midregistrar", NAME)
            .replace("$__rate_interval", "1m")
            .replace("${namespace}", NS)
            .replace("${midregistrar}", NAME),
        )
        for panel in panels
        for t in panel["targets"]
    ]

    def empty() -> list[str]:
        return [f"{title}: {expr}" for title, expr in queries if not scale.pipeline.query(expr)]

    # A series born with the calls needs two scrapes before rate() has a value.
    poll(lambda: not empty(), 30, interval=2)
    left = empty()
    assert not left, "panels without data:\n" + "\n".join(left)
    print(f"dashboard: {len(panels)} panels, {len(queries)} queries, all with data")


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels") or [])


def test_register_latency_histogram_has_both_outcomes(scale: Scale) -> None:
    q = (
        "histogram_quantile(0.99, sum by (le, outcome) "
        f'(rate(midregistrar_register_duration_seconds_bucket{{namespace="{NS}"}}[2m])))'
    )
    result = {r["metric"]["outcome"]: float(r["value"][1]) for r in scale.pipeline.query(q)}
    assert {"absorbed", "relayed"} <= set(result), result
    assert all(not math.isnan(v) for k, v in result.items() if k in ("absorbed", "relayed")), result
    scale.figures.update({f"p99_{k}_ms": v * 1000 for k, v in result.items() if not math.isnan(v)})
    pods = scale.kube.pods(NS, scale.selector)
    assert all(pod_ready(p) for p in pods)
