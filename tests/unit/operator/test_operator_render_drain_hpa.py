"""Drain budget and autoscaling in the rendered objects (issue 6): pure renderers, no cluster."""

from __future__ import annotations

import pytest
import yaml

from midreg_operator import render
from midreg_operator.spec import MidRegistrarSpec, Ref, parse_spec

REF = Ref(name="edge", namespace="voip", uid="uid-1", generation=1)


def spec(**extra: object) -> MidRegistrarSpec:
    return parse_spec({"mainRegistrar": "sip:pbx.example.com:5060", **extra})


@pytest.mark.parametrize("grace", [1, 5, 10, 15, 60, 90, 3600])
def test_pod_grace_period_covers_the_registrars_drain(grace: int) -> None:
    s = spec(terminationGracePeriodSeconds=grace)
    config = yaml.safe_load(render.render_configmap(s, REF)["data"][render.CONFIG_FILE])
    pod = render.render_deployment(s, REF)["spec"]["template"]["spec"]
    drain_grace, drain_timeout = config["drain_grace"], config["drain_timeout"]
    assert drain_grace >= 0 and drain_timeout >= 0
    assert pod[
        "terminationGracePeriodSeconds"
    ] >= render.PRESTOP_SLEEP_SECONDS + drain_grace + drain_timeout + min(grace, render.DRAIN_MARGIN_SECONDS)


def test_default_drain_budget() -> None:
    s = spec()  # terminationGracePeriodSeconds 60
    config = yaml.safe_load(render.render_config_yaml(s, REF))
    assert (config["drain_grace"], config["drain_timeout"]) == (45, 10)
    # Phones told drain_expires (30 s) during a 45 s grace have all refreshed elsewhere before the end.
    assert config["drain_grace"] > config["drain_expires"]
    pod = render.render_deployment(s, REF)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 65


def test_drain_budget_change_rolls_the_pods() -> None:
    a = render.config_hash(spec(), REF)
    b = render.config_hash(spec(terminationGracePeriodSeconds=120), REF)
    assert a != b


def test_hpa_scales_on_cpu_and_register_rate_with_a_long_scale_down_window() -> None:
    s = spec(autoscaling={"enabled": True, "targetRegistersPerSecond": 50})
    hpa = render.render_hpa(s, REF)
    assert hpa is not None
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 600
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    pods = metrics["Pods"]["pods"]
    assert (
        pods["metric"]["name"] == render.REGISTER_RATE_METRIC == "midregistrar_register_requests_per_second"
    )
    assert pods["target"] == {"type": "AverageValue", "averageValue": "50"}
    assert render.REGISTER_COUNTER == "midregistrar_register_requests_total"


def test_hpa_window_is_a_spec_value() -> None:
    s = spec(autoscaling={"enabled": True, "scaleDownStabilizationSeconds": 15})
    hpa = render.render_hpa(s, REF)
    assert hpa is not None and hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 15
