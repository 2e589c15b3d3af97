"""The Grafana dashboard and Prometheus alert rules in deploy/ match what busway exports.

Both are loaded as a user's Grafana and Prometheus would (JSON, YAML); every query may name
only metric series and labels the collector really produces, so a renamed metric fails here
instead of on an operator's empty panel or silent alert.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from busway._observe.metrics import ComponentStats, MetricsCollector, new_registry
from tests.support import REPO

DASHBOARD = REPO / "deploy" / "grafana" / "busway-dashboard.json"
ALERTS = REPO / "deploy" / "prometheus" / "busway-alerts.yml"

# PromQL words that are not series names: functions, aggregations, keywords.
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHERS = re.compile(r"\{([^}]*)\}")
_LABEL_IN_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")


def exported() -> tuple[set[str], set[str]]:
    """(series names, label names) of a scrape with a source, a route and a sink populated."""
    collector = MetricsCollector()
    for name, kind in (("in", "source"), ("route", "route"), ("out", "sink")):
        stats = collector.add(ComponentStats(name, kind))
        stats.received, stats.published, stats.in_flight, stats.ready = 3, 2, 1, True
        stats.count_error("publish")
        stats.latency.observe(0.01)
    text = generate_latest(new_registry(collector)).decode()
    names: set[str] = set()
    labels: set[str] = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.add(sample.name)
            labels.update(sample.labels)
    return names, labels


def series_and_labels(expr: str) -> tuple[set[str], set[str]]:
    """The busway_* series an expression reads and the label names it groups or matches on."""
    labels: set[str] = set()
    for group in _GROUPING.findall(expr):
        labels.update(label.strip() for label in group.split(",") if label.strip())
    for matchers in _MATCHERS.findall(expr):
        labels.update(_LABEL_IN_MATCHER.findall(matchers))
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    series = {word for word in _IDENTIFIER.findall(without_strings) if word.startswith("busway_")}
    return series, labels


def balanced(expr: str) -> bool:
    depth = {"(": 0, "{": 0, "[": 0}
    closing = {")": "(", "}": "{", "]": "["}
    for char in re.sub(r'"[^"]*"', '""', expr):
        if char in depth:
            depth[char] += 1
        elif char in closing:
            depth[closing[char]] -= 1
            if depth[closing[char]] < 0:
                return False
    return not any(depth.values())


def check_expr(expr: str, where: str) -> set[str]:
    """Assert `expr` reads only exported series and labels; returns the series it reads."""
    names, labels = exported()
    series, used_labels = series_and_labels(expr)
    assert series, f"{where}: no busway metric in {expr!r}"
    assert series <= names, f"{where}: not exported: {sorted(series - names)} in {expr!r}"
    assert used_labels <= labels, f"{where}: unknown labels {sorted(used_labels - labels)}"
    assert balanced(expr), f"{where}: unbalanced brackets in {expr!r}"
    return series


def test_the_collector_exports_the_documented_families() -> None:
    names, labels = exported()
    for counter in ("received", "published", "filtered", "dead_lettered", "retried"):
        assert f"busway_messages_{counter}_total" in names
    assert {
        "busway_errors_total",
        "busway_in_flight",
        "busway_component_ready",
        "busway_circuit_state",
        "busway_hop_latency_seconds_bucket",
        "busway_hop_latency_seconds_sum",
        "busway_hop_latency_seconds_count",
    } <= names
    assert labels == {"component", "kind", "reason", "le"}


# -- Grafana ---------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that shows data (rows are containers), nested ones included."""
    for panel in board["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables replaced by values Prometheus would see."""
    return expr.replace("$__rate_interval", "5m").replace("$__range", "6h").replace("$__all", ".*")


def test_dashboard_has_a_prometheus_datasource_variable_and_a_current_schema() -> None:
    board = dashboard()
    assert board["uid"] == "busway-overview"
    assert board["schemaVersion"] >= 39
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("component", "kind"):
        assert variables[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        check_expr(variables[name]["query"]["query"], f"variable {name}")


def test_every_dashboard_panel_queries_exported_metrics_through_the_variable() -> None:
    board = dashboard()
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    read: set[str] = set()
    shown = list(panels(board))
    assert len(shown) >= 12
    for panel in shown:
        title = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        assert panel["targets"], f"panel {title!r} has no targets"
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), title
        assert panel.get("description"), f"panel {title!r} should say what it shows"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), title
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], title
            read |= check_expr(grafana_to_promql(target["expr"]), f"panel {title!r}")
    names, _ = exported()
    # Every exported family is on the dashboard somewhere.
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in names}
    shown_families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in read}
    assert families <= shown_families, sorted(families - shown_families)


# -- Prometheus ------------------------------------------------------------------------------


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    [group] = document["groups"]
    assert group["name"] == "busway"
    found: list[dict[str, Any]] = group["rules"]
    return found


def test_alert_rules_are_complete_and_query_exported_metrics() -> None:
    names = []
    for rule in rules():
        name = rule["alert"]
        names.append(name)
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
        assert re.fullmatch(r"\d+[smh]", str(rule["for"])), name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"], name
        assert rule["annotations"]["description"], name
        check_expr(rule["expr"], f"alert {name}")
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    ("alert", "expr", "duration"),
    [
        (
            "BuswayDeadLettersGrowing",
            "increase(busway_messages_dead_lettered_total[10m])) > 0",
            None,
        ),
        ("BuswayCircuitOpen", "busway_circuit_state == 1", "5m"),
        ("BuswayComponentNotReady", "busway_component_ready == 0", "5m"),
        ("BuswayInFlightSaturated", "busway_in_flight", None),
        ("BuswayConsumerStalled", "busway_in_flight", None),
        ("BuswayErrorRateHigh", "busway_errors_total", None),
    ],
)
def test_the_issue_s_alerts_are_there(alert: str, expr: str, duration: str | None) -> None:
    by_name = {rule["alert"]: rule for rule in rules()}
    assert expr in by_name[alert]["expr"]
    if duration is not None:
        assert by_name[alert]["for"] == duration


def test_an_unknown_metric_in_an_expression_is_caught() -> None:
    with pytest.raises(AssertionError, match="not exported"):
        check_expr("rate(busway_messages_lost_total[5m])", "example")
    with pytest.raises(AssertionError, match="unknown labels"):
        check_expr('busway_in_flight{route="x"}', "example")
