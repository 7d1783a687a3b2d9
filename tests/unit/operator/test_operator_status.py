"""Status computation from the owned Deployment and etcd counts (pure)."""

from __future__ import annotations

from typing import Any

from midreg_operator.etcd import Counts
from midreg_operator.spec import Ref, parse_spec
from midreg_operator.status import Observed, Problem, compute_status, status_differs

REF = Ref(name="edge", namespace="voip", uid="u", generation=4)
SPEC = parse_spec({"mainRegistrar": "sip:pbx.example.com", "replicas": 2})


def deployment(ready: int, updated: int = 2, replicas: int = 2, observed: int = 1) -> dict[str, Any]:
    return {
        "metadata": {"generation": 1},
        "spec": {"replicas": 2},
        "status": {
            "observedGeneration": observed,
            "replicas": replicas,
            "readyReplicas": ready,
            "updatedReplicas": updated,
            "availableReplicas": ready,
        },
    }


def conds(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def test_ready_when_rollout_complete_with_counts() -> None:
    st = compute_status(
        SPEC, REF, Observed(deployment(2), Counts(aors=3, contacts=5), "etcd"), "a=b", None, "T0", "h"
    )
    c = conds(st)
    assert c["Ready"]["status"] == "True" and c["Ready"]["reason"] == "RegistrarsReady"
    assert c["Progressing"]["status"] == "False"
    assert c["Degraded"]["status"] == "False"
    assert (st["replicas"], st["readyReplicas"], st["readyText"]) == (2, 2, "2/2")
    assert (st["aors"], st["contacts"], st["countsSource"]) == (3, 5, "etcd")
    assert st["observedGeneration"] == 4 and st["selector"] == "a=b"


def test_progressing_while_pods_not_ready_and_counts_unknown() -> None:
    st = compute_status(SPEC, REF, Observed(deployment(1), None, "unknown: x"), "s", None, "T0", "h")
    c = conds(st)
    assert c["Ready"]["status"] == "False" and c["Ready"]["reason"] == "RollingOut"
    assert c["Progressing"]["status"] == "True"
    assert st["contacts"] is None and st["aors"] is None


def test_unobserved_generation_is_progressing() -> None:
    dep = deployment(2, observed=0)
    assert conds(compute_status(SPEC, REF, Observed(dep, None, ""), "s", None, "T", "h"))["Ready"][
        "status"
    ] == ("False")


def test_missing_deployment_and_problem_degrades() -> None:
    problem = Problem("SecretNotFound", "etcd Secret voip/creds (spec.etcd.secretName) does not exist")
    st = compute_status(SPEC, REF, Observed(None, None, "", (problem,)), "s", None, "T", "h")
    c = conds(st)
    assert c["Degraded"]["status"] == "True" and c["Degraded"]["reason"] == "SecretNotFound"
    assert "does not exist" in c["Degraded"]["message"]
    assert c["Ready"]["status"] == "False"


def test_transition_time_kept_while_status_unchanged() -> None:
    first = compute_status(SPEC, REF, Observed(deployment(2), None, ""), "s", None, "T0", "h")
    again = compute_status(SPEC, REF, Observed(deployment(2), None, ""), "s", first, "T1", "h")
    assert conds(again)["Ready"]["lastTransitionTime"] == "T0"
    assert not status_differs(first, again)
    flipped = compute_status(SPEC, REF, Observed(deployment(1), None, ""), "s", first, "T2", "h")
    assert conds(flipped)["Ready"]["lastTransitionTime"] == "T2"
    assert status_differs(first, flipped)


def test_scaled_to_zero_is_ready() -> None:
    spec0 = parse_spec({"mainRegistrar": "sip:pbx.example.com", "replicas": 0})
    dep = deployment(0, updated=0, replicas=0)
    dep["spec"]["replicas"] = 0
    assert conds(compute_status(spec0, REF, Observed(dep, None, ""), "s", None, "T", "h"))["Ready"][
        "reason"
    ] == ("ScaledToZero")
