"""The operator's command line and its RBAC file (static checks; the cluster tests prove them live)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from midreg_operator.__main__ import parse_args

RBAC = Path(__file__).resolve().parents[3] / "operator" / "deploy" / "rbac.yaml"


def test_defaults_cluster_scope_json_logs_and_liveness(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MIDREG_OPERATOR_NAMESPACES", "MIDREG_OPERATOR_LIVENESS", "MIDREG_OPERATOR_LOG_FORMAT"):
        monkeypatch.delenv(var, raising=False)
    args = parse_args([])
    assert args.namespace == []
    assert args.log_format == "json"
    assert args.liveness == "http://0.0.0.0:8080/healthz"


def test_namespaces_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIDREG_OPERATOR_NAMESPACES", "voip,edge")
    assert parse_args([]).namespace == ["voip", "edge"]
    monkeypatch.delenv("MIDREG_OPERATOR_NAMESPACES")
    assert parse_args(["--namespace", "a", "--namespace", "b", "--liveness", ""]).namespace == ["a", "b"]


def _rules() -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(RBAC.read_text()) if d]
    (role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    rules: list[dict[str, Any]] = role["rules"]
    return rules


def test_rbac_has_no_wildcards_and_deletes_only_what_a_spec_turns_off() -> None:
    """Owned objects go with their MidRegistrar by garbage collection; the operator deletes only the two a
    spec can turn off: the HPA (autoscaling.enabled) and the NetworkPolicy (networkPolicy.enabled)."""
    deletable = []
    for rule in _rules():
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        if "delete" in rule["verbs"]:
            deletable += rule["resources"]
        if "secrets" in rule["resources"]:
            assert rule["verbs"] == ["get", "create", "update"]  # never list or watch: read one by name
    assert sorted(deletable) == ["horizontalpodautoscalers", "networkpolicies"]
