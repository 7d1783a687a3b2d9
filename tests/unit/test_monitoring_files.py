"""The chart's monitoring files: the alerts (files/prometheus/alerts.yaml), their promtool tests
(tests/monitoring/alerts_test.yaml) and the Grafana dashboard (files/grafana/midregistrar.json).

A misspelt metric or label is the classic monitoring bug: PromQL accepts it, the query returns nothing and the
alert never fires. promtool only checks syntax, so the fast checks here compare every metric and label name the
alerts and the dashboard use with what the registrar and kube-state-metrics export, and require each alert to
have a promtool case that fires it and one that keeps it quiet. tests/integration/test_alert_rules.py runs
promtool itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from registrar.http.app import EngineCollector, StoreStats
from registrar.net.limits import Admission, SourceLimit
from registrar.net.tls import TlsStats
from tests.unit.corekit import Core

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kube-midregistrar"
ALERTS = CHART / "files" / "prometheus" / "alerts.yaml"
ALERT_TESTS = REPO / "tests" / "monitoring" / "alerts_test.yaml"
DASHBOARD = CHART / "files" / "grafana" / "midregistrar.json"


def _exported_metrics() -> frozenset[str]:
    """Every series name the registrar's collector exports, read from the collector itself (with the etcd
    store's families and the readiness gauge), so a metric renamed in the registrar fails these checks."""
    m = Core(mode="contact")
    collector = EngineCollector(
        m.rig.stack.stats,
        m.core.stats,
        lambda: 0,
        m.store.counts,
        store_stats=lambda: StoreStats(calls=0, available=True, leases=0, members=1),
        ready=lambda: True,
        tls_stats=TlsStats(),
        connections=lambda: ({}, Admission(0, 0)),
        sources=lambda: SourceLimit(500),
        templates=lambda: 0,
    )
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    return frozenset(f"{fam.name}{suffix}" for fam in collector.collect() for suffix in suffixes[fam.type])


REGISTRAR_METRICS = _exported_metrics()
KUBE_STATE_METRICS = frozenset(
    {
        "kube_horizontalpodautoscaler_status_current_replicas",
        "kube_horizontalpodautoscaler_spec_max_replicas",
        "kube_pod_status_ready",
        "kube_deployment_status_replicas_available",
        "kube_deployment_spec_replicas",
    }
)
KNOWN_METRICS = REGISTRAR_METRICS | KUBE_STATE_METRICS | {"up"}
# Target labels of the chart's PodMonitor, the registrar's own labels, and kube-state-metrics' labels.
KNOWN_LABELS = frozenset(
    {"job", "namespace", "pod", "midregistrar", "instance"}
    | {"method", "code", "outcome", "result", "le", "side", "transport", "reason", "phase"}
    | {"horizontalpodautoscaler", "condition", "deployment"}
)
# The only dashboard variables the panels may use (they are substituted when the queries are executed).
DASHBOARD_VARIABLES = frozenset({"$namespace", "$midregistrar", "$__rate_interval"})

# --- PromQL name extraction -----------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENTIFIER = re.compile(r"(?<![\w.:$])[A-Za-z_:][\w:]*")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "inf", "nan"}
    | {"by", "without", "on", "ignoring", "group_left", "group_right"}
)
_LABEL_VALUES = re.compile(r"^label_values\(\s*(?:(?P<selector>[^,]+?)\s*,\s*)?(?P<label>\w+)\s*\)$")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: what is left once strings, label matchers, label lists,
    ranges, keywords and function calls are taken out."""
    text = _STRING.sub('""', expr)
    text = _LABEL_LIST.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    names = set()
    for m in _IDENTIFIER.finditer(text):
        if m.group() in _KEYWORDS or text[m.end() :].lstrip().startswith("("):
            continue
        names.add(m.group())
    return names


def label_names(expr: str) -> set[str]:
    """The label names a PromQL expression matches on or groups by."""
    text = _STRING.sub('""', expr)
    labels = {name for block in _MATCHERS.findall(text) for name in _MATCHER_LABEL.findall(block)}
    for group in _LABEL_LIST.findall(text):
        labels |= {name.strip() for name in group.split(",") if name.strip()}
    return labels


def test_name_extraction_sees_a_misspelt_metric_and_label() -> None:
    """The checks below are only as good as the extraction: a typo must come out as a name of its own."""
    expr = (
        'sum by (pod, outcom) (rate(midregistar_registers_total{namespace="$namespace", code=~"5.."}'
        '[$__rate_interval])) / on (pod) group_left max(up{job="midregistrar"}) > 0.5 and bool 1e3'
    )
    assert metric_names(expr) == {"midregistar_registers_total", "up"}
    assert label_names(expr) == {"pod", "outcom", "namespace", "code", "job"}


# --- the alerts ----------------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def duration_seconds(text: str) -> float:
    """A Prometheus duration ("1h30m") in seconds."""
    parts = _DURATION.findall(text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(int(n) * _UNIT_SECONDS[u] for n, u in parts)


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def alert_cases() -> dict[str, list[tuple[float, bool]]]:
    """Per alert name, the promtool cases as (eval time in seconds, whether an alert is expected)."""
    cases: dict[str, list[tuple[float, bool]]] = {}
    for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            fires = bool(case.get("exp_alerts"))
            cases.setdefault(case["alertname"], []).append((duration_seconds(case["eval_time"]), fires))
    return cases


ALERT_NAMES = [rule["alert"] for rule in alert_rules()]


def test_alerts_file_is_a_plain_rules_file_with_the_expected_alerts() -> None:
    doc = yaml.safe_load(ALERTS.read_text())
    assert set(doc) == {"groups"}, "usable as-is in rule_files and as a PrometheusRule's spec"
    assert sorted(ALERT_NAMES) == sorted(
        f"MidRegistrar{name}"
        for name in (
            "EtcdUnreachable",
            "Register5xx",
            "MainRegistrarFailing",
            "DeRegistersFailing",
            "AbsorptionCollapsed",
            "PodsNotReady",
            "HPAAtMaximum",
            "TLSCertificateNotReloaded",
            "ClockSkew",
        )
    )


@pytest.mark.parametrize("name", ALERT_NAMES)
def test_alert_has_for_severity_and_annotations(name: str) -> None:
    (rule,) = [r for r in alert_rules() if r["alert"] == name]
    assert duration_seconds(rule["for"]) >= 60, "a single bad evaluation must not page anyone"
    assert rule["labels"]["severity"] in {"critical", "warning"}
    assert set(rule["annotations"]) == {"summary", "description"}
    assert "$labels." in rule["annotations"]["description"]


@pytest.mark.parametrize("name", ALERT_NAMES)
def test_alert_has_a_case_that_fires_and_one_that_stays_quiet(name: str) -> None:
    """A quiet case only proves something once the alert's `for:` has run out: before that, promtool sees no
    firing alert whatever the series say."""
    (rule,) = [r for r in alert_rules() if r["alert"] == name]
    cases = alert_cases().get(name, [])
    assert any(fires for _, fires in cases), f"no promtool case fires {name}"
    hold = duration_seconds(rule["for"])
    quiet = [t for t, fires in cases if not fires and t > hold]
    assert quiet, f"no promtool case keeps {name} quiet after its for: {rule['for']}"


def test_alert_tests_name_existing_alerts_and_load_the_charts_file() -> None:
    """promtool accepts a case for an alert that does not exist; it then passes whenever it expects nothing."""
    doc = yaml.safe_load(ALERT_TESTS.read_text())
    assert [(ALERT_TESTS.parent / f).resolve() for f in doc["rule_files"]] == [ALERTS.resolve()]
    assert set(alert_cases()) <= set(ALERT_NAMES)


@pytest.mark.parametrize("name", ALERT_NAMES)
def test_alert_uses_only_exported_metrics_and_labels(name: str) -> None:
    (rule,) = [r for r in alert_rules() if r["alert"] == name]
    assert metric_names(rule["expr"]), rule["expr"]
    assert metric_names(rule["expr"]) <= KNOWN_METRICS, metric_names(rule["expr"]) - KNOWN_METRICS
    assert label_names(rule["expr"]) <= KNOWN_LABELS, label_names(rule["expr"]) - KNOWN_LABELS


# --- the dashboard -------------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    out: list[dict[str, Any]] = []
    for panel in board["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def panel_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) of every panel target."""
    return [
        (f"panel {p['id']} {p.get('title')!r} target {t.get('refId')}", t.get("expr", ""))
        for p in panels(board)
        for t in p.get("targets", [])
    ]


def variables(board: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in board["templating"]["list"]}


def variable_selector(var: dict[str, Any]) -> str:
    """The series selector of a `label_values(selector, label)` query variable."""
    query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
    m = _LABEL_VALUES.match(query.strip())
    assert m and m.group("selector"), f"variable {var['name']}: not label_values(selector, label): {query!r}"
    return m.group("selector")


def test_dashboard_panels_have_unique_ids_and_queries() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    for panel in panels(board):
        if panel["type"] == "row":
            continue  # a row only groups panels
        exprs = [t.get("expr", "").strip() for t in panel.get("targets", [])]
        assert any(exprs), f"panel {panel['id']} {panel.get('title')!r} has no query"
        assert all(exprs), f"panel {panel['id']} has a target without a query"


def test_dashboard_queries_the_datasource_variable_and_filters_by_namespace_and_midregistrar() -> None:
    board = dashboard()
    vs = variables(board)
    assert vs["datasource"]["type"] == "datasource" and vs["datasource"]["query"] == "prometheus"
    for name in ("namespace", "midregistrar"):
        assert vs[name]["type"] == "query"
        assert metric_names(variable_selector(vs[name])) == {"midregistrar_register_requests_total"}
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        sources = [panel["datasource"], *(t["datasource"] for t in panel["targets"])]
        assert all(s == {"type": "prometheus", "uid": "${datasource}"} for s in sources), panel["id"]
    for where, expr in panel_queries(board):
        used = set(re.findall(r"\$\w+", expr))
        assert used <= DASHBOARD_VARIABLES, f"{where}: {used - DASHBOARD_VARIABLES}"
        # Every registrar series is scoped to the chosen namespace and MidRegistrar(s).
        assert 'namespace="$namespace"' in expr, where
        assert '=~"$midregistrar"' in expr, where


def test_dashboard_uses_only_exported_metrics_and_labels() -> None:
    board = dashboard()
    queries = panel_queries(board) + [
        (f"variable {v['name']}", variable_selector(v))
        for v in variables(board).values()
        if v["type"] == "query"
    ]
    used: set[str] = set()
    for where, expr in queries:
        assert metric_names(expr) <= KNOWN_METRICS, f"{where}: {metric_names(expr) - KNOWN_METRICS}"
        assert label_names(expr) <= KNOWN_LABELS, f"{where}: {label_names(expr) - KNOWN_LABELS}"
        used |= metric_names(expr)
    # The registrar's own series that the dashboard shows (the histogram through its buckets).
    shown = {m for m in REGISTRAR_METRICS if not m.endswith(("_sum", "_count"))}
    assert shown <= used, f"not on the dashboard: {sorted(shown - used)}"
