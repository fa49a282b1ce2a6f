"""The Grafana dashboard is a valid dashboard model that works on any Prometheus data
source, shows what operators were promised, and every query in it, in the alerts and
in the autoscalers parses as PromQL."""

from __future__ import annotations

import re

import pytest

from deploy.manifests import (
    Obj,
    alert_queries,
    dashboard_queries,
    dashboards,
    of_kind,
    parse_promql,
    render,
    scaler_queries,
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
                name = rule["alert"]
                assert rule["labels"]["severity"] in {"info", "warning", "critical"}, name
                assert rule["annotations"]["summary"], name
                assert len(rule["annotations"]["runbook"].splitlines()) >= 2, name
