"""The chart's monitoring objects (templates/monitoring.yaml) against the real API server.

The PodMonitor and the PrometheusRule are custom resources of the Prometheus Operator: `helm template` renders
them whatever they contain, and only an API server that has the Prometheus Operator's CRDs can say whether
their fields fit the schemas. The CRDs come from scripts/metrics-rig.sh (the Prometheus Operator module of a
pinned version); the objects go through `kubectl apply --dry-run=server --validate=strict`, which also refuses
fields the schemas do not know (without it they would be pruned silently).
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from midreg_operator.render import render_deployment
from midreg_operator.spec import Ref, parse_spec
from tests.cluster.cluster_helpers import Cluster
from tests.support.controlplane import ControlPlane
from tests.support.helm import CHART, Helm
from tests.support.metricsrig import operator_crds
from tests.support.wait import wait_for

pytestmark = pytest.mark.cluster

ALERTS = CHART / "files" / "prometheus" / "alerts.yaml"
DASHBOARD = CHART / "files" / "grafana" / "midregistrar.json"
MONITORING_ON = (
    "--set",
    "monitoring.podMonitor.enabled=true",
    "--set",
    "monitoring.podMonitor.additionalLabels.release=kps",
    "--set",
    "monitoring.prometheusRule.enabled=true",
    "--set",
    "monitoring.prometheusRule.additionalLabels.release=kps",
    "--set",
    "monitoring.dashboard.enabled=true",
    "--set",
    "monitoring.dashboard.annotations.grafana_folder=VoIP",
)


@pytest.fixture(scope="module")
def helm(rig: ControlPlane) -> Helm:
    return Helm(rig)


@pytest.fixture(scope="module")
def prometheus_operator_crds(cluster: Cluster) -> list[str]:
    """The PodMonitor, ServiceMonitor and PrometheusRule CRDs, applied and Established."""
    files: list[Path] = operator_crds()
    names = [yaml.safe_load(f.read_text())["metadata"]["name"] for f in files]
    assert {"podmonitors.monitoring.coreos.com", "prometheusrules.monitoring.coreos.com"} <= set(names)
    for f in files:
        # Server-side: the CRDs are too large for the last-applied annotation of a client-side apply.
        cluster.kubectl("apply", "--server-side", "-f", str(f))
    cluster.kubectl("wait", "--for=condition=Established", *(f"crd/{n}" for n in names), "--timeout=60s")
    return names


def _monitoring(helm: Helm, namespace: str, *values: str) -> dict[str, dict[str, Any]]:
    """The chart's monitoring objects by kind."""
    docs = helm.template("-n", namespace, "--show-only", "templates/monitoring.yaml", *values)
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), [d["kind"] for d in docs]
    return by_kind


def _dry_run(cluster: Cluster, *objects: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """Server-side dry-run apply with strict field validation. Right after a CRD is Established, kubectl's
    discovery may not know its kind yet: that one error is waited out, every other answer returned."""
    text = "\n---\n".join(json.dumps(o) for o in objects)

    def attempt() -> subprocess.CompletedProcess[str] | None:
        proc: subprocess.CompletedProcess[str] = cluster.kubectl(
            "apply",
            "--server-side",
            "--dry-run=server",
            "--validate=strict",
            "-f",
            "-",
            input=text,
            check=False,
        )
        return None if "no matches for kind" in proc.stderr else proc

    result = wait_for(attempt, 30, "the monitoring kinds in discovery")
    assert result is not None  # wait_for returns a truthy value or raises
    return result


def test_monitoring_is_off_by_default(helm: Helm) -> None:
    kinds = {d["kind"] for d in helm.template()}
    assert not kinds & {"PodMonitor", "PrometheusRule"}
    proc = helm("template", "r", str(CHART), "--show-only", "templates/monitoring.yaml", check=False)
    assert proc.returncode != 0 and "could not find template" in proc.stderr, proc.stdout


def test_lint_is_clean_with_monitoring_on(helm: Helm) -> None:
    proc = helm("lint", "--strict", str(CHART), *MONITORING_ON)
    assert "0 chart(s) failed" in proc.stdout, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


def test_monitoring_objects_are_accepted_by_the_api_server(
    helm: Helm, cluster: Cluster, prometheus_operator_crds: list[str], ns: str
) -> None:
    objs = _monitoring(helm, ns, *MONITORING_ON)
    assert set(objs) == {"PodMonitor", "PrometheusRule", "ConfigMap"}
    proc = _dry_run(cluster, *objs.values())
    assert proc.returncode == 0, proc.stderr
    for obj in objs.values():
        assert f"/{obj['metadata']['name']} serverside-applied (server dry run)" in proc.stdout, proc.stdout
    # The namespaces variant renders a different namespaceSelector.
    scoped = _monitoring(
        helm,
        ns,
        "--set",
        "monitoring.podMonitor.enabled=true",
        "--set",
        "monitoring.podMonitor.namespaces={voip,edge}",
    )
    assert scoped["PodMonitor"]["spec"]["namespaceSelector"] == {"matchNames": ["voip", "edge"]}
    proc = _dry_run(cluster, scoped["PodMonitor"])
    assert proc.returncode == 0, proc.stderr


def _bad_interval(o: dict[str, Any]) -> None:
    o["spec"]["podMetricsEndpoints"][0]["interval"] = "every minute"


def _unknown_field(o: dict[str, Any]) -> None:
    o["spec"]["podMetricsEndpoints"][0]["portname"] = "http"


def _bad_for(o: dict[str, Any]) -> None:
    o["spec"]["groups"][0]["rules"][0]["for"] = "five minutes"


BROKEN = [
    ("PodMonitor", _bad_interval, "spec.podMetricsEndpoints[0].interval"),
    ("PodMonitor", _unknown_field, "spec.podMetricsEndpoints[0].portname"),
    ("PrometheusRule", _bad_for, "spec.groups[0].rules[0].for"),
]


@pytest.mark.parametrize(("kind", "breaks", "field"), BROKEN, ids=[b[1].__name__.strip("_") for b in BROKEN])
def test_api_server_refuses_a_broken_object(
    helm: Helm,
    cluster: Cluster,
    prometheus_operator_crds: list[str],
    ns: str,
    kind: str,
    breaks: Any,
    field: str,
) -> None:
    """The acceptance above means something only if the same check refuses what the CRD schema forbids."""
    obj = copy.deepcopy(_monitoring(helm, ns, *MONITORING_ON)[kind])
    breaks(obj)
    proc = _dry_run(cluster, obj)
    assert proc.returncode != 0, f"{kind} accepted:\n{proc.stdout}"
    assert field in proc.stderr, proc.stderr


def test_rendered_objects_carry_the_charts_files(helm: Helm) -> None:
    objs = _monitoring(helm, "mon", *MONITORING_ON)
    rule = objs["PrometheusRule"]
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
    assert rule["metadata"]["labels"]["release"] == "kps"
    dash = objs["ConfigMap"]
    assert json.loads(dash["data"]["midregistrar.json"]) == json.loads(DASHBOARD.read_text())
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dash["metadata"]["annotations"] == {"grafana_folder": "VoIP"}
    relabeled = _monitoring(
        helm,
        "mon",
        "--set",
        "monitoring.dashboard.enabled=true",
        "--set",
        "monitoring.dashboard.labelKey=example.com/dashboard",
        "--set",
        "monitoring.dashboard.labelValue=voip",
    )["ConfigMap"]
    assert relabeled["metadata"]["labels"]["example.com/dashboard"] == "voip"
    assert "grafana_dashboard" not in relabeled["metadata"]["labels"]


def test_podmonitor_scrapes_the_pods_the_operator_renders(helm: Helm) -> None:
    """The PodMonitor's selector and port against the operator's own Deployment of a MidRegistrar, and the
    relabelings that give the series the labels the alerts and the dashboard group by."""
    pm = _monitoring(helm, "mon", *MONITORING_ON)["PodMonitor"]
    assert pm["metadata"]["labels"]["release"] == "kps"
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    deployment = render_deployment(
        parse_spec({"mainRegistrar": "sip:pbx.example.com:5060"}),
        Ref(name="edge", namespace="voip", uid="uid-1", generation=1),
    )
    pod = deployment["spec"]["template"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    targets = {r["targetLabel"]: r for r in endpoint["relabelings"]}
    assert targets["job"]["replacement"] == "midregistrar"
    assert targets["midregistrar"]["sourceLabels"] == [
        "__meta_kubernetes_pod_label_app_kubernetes_io_instance"
    ]
    assert pod["metadata"]["labels"]["app.kubernetes.io/instance"] == "edge"


BAD_VALUES: list[tuple[str, str, str]] = [
    ("monitoring.podMonitor.interval=often", "/monitoring/podMonitor/interval", "does not match pattern"),
    ("monitoring.podMonitor.namespaces={Not_A_Namespace}", "/monitoring/podMonitor/namespaces/0", "pattern"),
    (
        "monitoring.prometheusRule.additionalLabels.release=a b",
        "/monitoring/prometheusRule/additionalLabels",
        "pattern",
    ),
    ("monitoring.dashboard.labelKey=not a key", "/monitoring/dashboard/labelKey", "does not match pattern"),
    (
        "monitoring.serviceMonitor.enabled=true",
        "/monitoring",
        "additional properties 'serviceMonitor' not allowed",
    ),
]


@pytest.mark.parametrize(("setting", "where", "message"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_monitoring_values_are_rejected_by_the_schema(
    helm: Helm, setting: str, where: str, message: str
) -> None:
    proc = helm("template", "r", str(CHART), "--set", setting, check=False)
    assert proc.returncode != 0, f"{setting} was accepted"
    assert f"at '{where}" in proc.stderr and message in proc.stderr, proc.stderr
