"""The Grafana dashboard is a valid dashboard model that works on any Prometheus data
source, shows what operators were promised, and every query in it, in the alerts and
in the autoscalers parses as PromQL."""

from __future__ import annotations

import itertools
import re

import pytest

from deploy.manifests import (
    ROOT,
    Obj,
    alert_queries,
    dashboard_queries,
    dashboards,
    of_kind,
    parse_promql,
    recorded_series,
    render,
    scaler_queries,
    selectors,
    walk_panels,
)

PANEL_TYPES = {"row", "timeseries", "stat", "state-timeline", "table", "bargauge", "gauge", "text"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
PROMISED = {
    "instances per second by stage": "instances/s per stage",
    "delivery latency p50 / p95 / p99 by destination and lane": "end-to-end latency",
    "consumer lag by group": "lag per stage",
    "dead letters by reason": "dead letters with reasons",
    "ingest failures by status": "ingest failures by status",
    "circuit breaker by destination": "circuit-breaker state",
    "compression ratio (original / canonical)": "transcode compression ratio",
    "hl7 ack outcomes by site": "HL7 ACK outcomes",
}
"""Panel title → what the deploy issue asked the overview to show."""


@pytest.fixture(params=sorted(dashboards()))
def dashboard(request: pytest.FixtureRequest) -> Obj:
    return dashboards()[request.param]


def _panels(dashboard: Obj) -> list[Obj]:
    return list(walk_panels(dashboard["panels"]))


def test_the_model_has_what_grafana_requires(dashboard: Obj) -> None:
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and len(dashboard["uid"]) <= 40
    assert dashboard["title"]
    assert isinstance(dashboard["panels"], list) and dashboard["panels"]
    assert isinstance(dashboard["templating"]["list"], list)
    assert "id" not in dashboard or dashboard["id"] is None, "an id ties it to one Grafana"


def test_panel_ids_are_unique_and_panels_fit_the_grid_without_overlapping(
    dashboard: Obj,
) -> None:
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert all(isinstance(i, int) for i in ids)
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        assert panel["type"] in PANEL_TYPES, panel["type"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_every_panel_queries_the_datasource_variable(dashboard: Obj) -> None:
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["name"] == "datasource" and variable["query"] == "prometheus"
    for panel in _panels(dashboard):
        if panel["type"] in ("row", "text"):
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
    for query_variable in (v for v in dashboard["templating"]["list"] if v["type"] == "query"):
        assert query_variable["datasource"] == DATASOURCE, query_variable["name"]


def test_every_variable_used_is_defined(dashboard: Obj) -> None:
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    builtin = {"__rate_interval", "__interval", "__range"}
    for where, expr in dashboard_queries(dashboard).items():
        used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expr)) - builtin
        assert used <= defined, f"{where} uses undefined {used - defined}"


def test_the_overview_shows_what_operators_were_promised() -> None:
    overview = dashboards()["radflow-overview.json"]
    titles = {p["title"].lower() for p in _panels(overview)}
    missing = {title: what for title, what in PROMISED.items() if title not in titles}
    assert not missing, f"panels missing: {missing}"


DESTINATION_ROW = {
    "deliveries and failures / s": "radflow_forwarder_delivered_total",
    "latency p50 / p95 / p99 and objective": "radflow_forwarder_slo_target_seconds",
    "backlog": "radflow_consumer_lag",
    "waiting since": "radflow_consumer_waiting_since_timestamp_seconds",
    "verification failures": "radflow_forwarder_verification_failures_total",
    "latency objective burn rate": "radflow:slo_burn_rate1h",
}
"""Panel of the per-destination row (after "$destination: ") → a series it must read."""


def test_the_overview_repeats_a_row_per_destination_with_what_issue_19_asked() -> None:
    overview = dashboards()["radflow-overview.json"]
    panels = overview["panels"]
    (row,) = [p for p in panels if p["type"] == "row" and p.get("repeat")]
    assert row["repeat"] == "destination"
    (variable,) = [v for v in overview["templating"]["list"] if v["name"] == "destination"]
    assert variable["multi"] or variable["includeAll"], "a row repeats over several values"
    # A repeated row takes the panels below it up to the next row (or its own panels
    # when collapsed).
    after = panels[panels.index(row) + 1 :]
    inside = row["panels"] or [p for p in itertools.takewhile(lambda p: p["type"] != "row", after)]
    titles = {p["title"].removeprefix("$destination: "): p for p in inside}
    assert set(titles) == set(DESTINATION_ROW)
    for title, series in DESTINATION_ROW.items():
        queries = [t["expr"] for t in titles[title]["targets"]]
        assert any(series in selectors(q) for q in queries), f"{title} does not read {series}"
        for query in queries:
            matched = [labels for labels in selectors(query).values()]
            assert all("destination" in labels or "group" in labels for labels in matched), (
                f"{title}: {query} is not limited to the row's destination"
            )


def test_every_query_parses_as_promql() -> None:
    objects = render("prod")
    queries = {
        **{
            f"dashboard {k}": v
            for d in dashboards().values()
            for k, v in dashboard_queries(d).items()
        },
        **{f"alert {k}": v for k, v in alert_queries(objects).items()},
        **{f"KEDA {k}": v for k, v in scaler_queries(objects).items()},
    }
    assert len(queries) > 40
    for where, expr in queries.items():
        try:
            parse_promql(expr)
        except ValueError as exc:
            pytest.fail(f"{where}: {exc}\n{expr}")


def test_every_alert_has_a_runbook_and_a_severity() -> None:
    for rule_set in of_kind(render("prod"), "PrometheusRule"):
        for group in rule_set["spec"]["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    continue
                name = rule["alert"]
                assert rule["labels"]["severity"] in {"info", "warning", "critical"}, name
                assert rule["annotations"]["summary"], name
                assert len(rule["annotations"]["runbook"].splitlines()) >= 2, name


def test_every_alert_has_a_runbook_in_operations_md_that_names_a_command() -> None:
    """The annotation is the short form; docs/operations.md has the whole runbook,
    one section per alert, saying which radflow command answers it."""
    operations = (ROOT / "docs" / "operations.md").read_text()
    sections = dict(re.findall(r"^### (Radflow\w+)\n(.*?)(?=^##)", operations, re.S | re.M))
    for name in _rules(render("prod")):
        if not name.startswith("Radflow"):
            continue
        assert name in sections, f"{name}: no runbook section in docs/operations.md"
        assert "*Check*" in sections[name] and "*Answer*" in sections[name], name
        assert re.search(r"`(radflow|python -m router|kubectl)", sections[name]), name


BURN_RATE = re.compile(r"^radflow:slo_burn_rate(\d+[mhd])$")
SRE_WORKBOOK = {
    "RadflowLatencySloFastBurn": {("1h", "5m", 14.4), ("6h", "30m", 6.0)},
    "RadflowLatencySloSlowBurn": {("1d", "2h", 3.0), ("3d", "6h", 1.0)},
}
"""Alert → (long window, short window, burn rate) pairs, from the SRE workbook's
multiwindow, multi-burn-rate alerts for a 30-day budget: 2% of it spent in an hour
(14.4) or 5% in six hours (6) pages; 10% in a day (3) or 10% in three days (1) is a
ticket."""


def _rules(objects: list[Obj]) -> dict[str, Obj]:
    return {
        rule.get("alert") or rule["record"]: rule
        for rule_set in of_kind(objects, "PrometheusRule")
        for group in rule_set["spec"]["groups"]
        for rule in group["rules"]
    }


def test_each_burn_rate_is_recorded_over_the_window_its_name_says() -> None:
    rules = _rules(render("prod"))
    windows = {}
    for name, rule in rules.items():
        match = BURN_RATE.match(name)
        if match:
            windows[match.group(1)] = set(re.findall(r"\[(\d+[mhd])\]", rule["expr"]))
    assert set(windows) == {"5m", "30m", "1h", "2h", "6h", "1d", "3d"}
    for window, ranges in windows.items():
        assert ranges == {window}, f"radflow:slo_burn_rate{window} reads ranges {ranges}"


def test_the_slo_alerts_pair_long_and_short_windows_at_the_workbook_s_burn_rates() -> None:
    rules = _rules(render("prod"))
    for alert, pairs in SRE_WORKBOOK.items():
        expr = rules[alert]["expr"]
        found = {
            (long, short, float(rate))
            for long, rate, short, rate_again in re.findall(
                r"radflow:slo_burn_rate(\w+) > ([\d.]+) and radflow:slo_burn_rate(\w+) > ([\d.]+)",
                expr,
            )
            if rate == rate_again
        }
        assert found == pairs, f"{alert}: {found}"
        assert rules[alert]["labels"]["severity"] == (
            "critical" if alert.endswith("FastBurn") else "warning"
        )


def test_every_recorded_series_read_is_recorded_with_the_labels_read() -> None:
    objects = render("prod")
    recorded = recorded_series(objects)
    assert recorded["radflow:slo_burn_rate1h"] == {"namespace", "destination", "lane"}
    queries = {
        **{
            f"dashboard {k}": v
            for d in dashboards().values()
            for k, v in dashboard_queries(d).items()
        },
        **{f"alert {k}": v for k, v in alert_queries(objects).items()},
    }
    used = 0
    for where, expr in queries.items():
        for name, labels in selectors(expr).items():
            if ":" not in name:
                continue
            used += 1
            assert name in recorded, f"{where} reads {name}, which no rule records"
            assert labels <= recorded[name], f"{where} matches {name} on {labels - recorded[name]}"
    assert used >= 10
