"""The chart's alert rules and dashboard through promtool (built from the Prometheus module the first time,
scripts/metrics-rig.sh): the rules load, their tests pass (every alert fires on the series it should and stays
quiet on the others, tests/monitoring/alerts_test.yaml), and every dashboard query parses as PromQL."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.metricsrig import promtool
from tests.unit.test_monitoring_files import (
    ALERT_NAMES,
    ALERT_TESTS,
    ALERTS,
    dashboard,
    panels,
    variable_selector,
    variables,
)

pytestmark = pytest.mark.integration


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, check=False)


def dashboard_rules(board: dict[str, Any]) -> dict[str, Any]:
    """The dashboard's queries as recording rules, with the variables filled in, so that promtool parses them
    as PromQL."""
    fill = {"$namespace": "voip", "$midregistrar": ".*", "$__rate_interval": "2m"}

    def filled(expr: str) -> str:
        for var, value in fill.items():
            expr = expr.replace(var, value)
        return expr

    rules = [
        {"record": f"dashboard:panel_{p['id']}_{t['refId']}", "expr": filled(t["expr"])}
        for p in panels(board)
        for t in p.get("targets", [])
    ]
    rules += [
        {"record": f"dashboard:variable_{v['name']}", "expr": filled(variable_selector(v))}
        for v in variables(board).values()
        if v["type"] == "query"
    ]
    return {"groups": [{"name": "dashboard", "rules": rules}]}


@pytest.mark.timeout(3600)
def test_promtool_checks_the_rules_runs_their_tests_and_parses_the_dashboard(tmp_path: Path) -> None:
    tool = promtool()
    check = _run(tool, "check", "rules", ALERTS)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(ALERT_NAMES)} rules found" in check.stdout, check.stdout
    tests = _run(tool, "test", "rules", ALERT_TESTS)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    rules = tmp_path / "dashboard.rules.yaml"
    rules.write_text(yaml.safe_dump(dashboard_rules(dashboard())))
    parsed = _run(tool, "check", "rules", rules)
    assert parsed.returncode == 0, parsed.stdout + parsed.stderr
