"""The latency objective's burn-rate alerts, evaluated by Prometheus's own rule engine
(``promtool test rules``) over made-up delivery counters: a fast burn pages, a slow one
opens a ticket, a burn that stopped resolves the page within its short window, an
idle destination never alerts.

The alerts' annotations are left out of the rules file given to promtool, which would
otherwise compare their rendered text: what is tested is when each alert fires and
with which labels. Skipped where promtool is not installed.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.manifests import K8S

ALERTS = K8S / "base" / "monitoring" / "alerts.yaml"
SLO_GROUPS = ("radflow.slo.burn-rates", "radflow.slo")
PER_MINUTE = 100
"""Deliveries a minute of each made-up lane."""


def _slo_rules() -> dict[str, Any]:
    spec = yaml.safe_load(ALERTS.read_text())["spec"]
    groups = []
    for group in spec["groups"]:
        if group["name"] in SLO_GROUPS:
            rules = [
                {k: v for k, v in rule.items() if k != "annotations"} for rule in group["rules"]
            ]
            groups.append({"name": group["name"], "rules": rules})
    assert [g["name"] for g in groups] == list(SLO_GROUPS)
    return {"groups": groups}


def _lane(destination: str, lane: str, objective: float, outcomes: dict[str, str]) -> list[Any]:
    labels = f'namespace="radflow", destination="{destination}", lane="{lane}"'
    series = [
        {
            "series": f"radflow_forwarder_slo_objective_ratio{{{labels}}}",
            "values": f"{objective}+0x240",
        }
    ]
    for outcome, values in outcomes.items():
        series.append(
            {
                "series": f"radflow_forwarder_slo_deliveries_total"
                f'{{{labels}, outcome="{outcome}"}}',
                "values": values,
            }
        )
    return series


def _fires(severity: str, destination: str, lane: str) -> dict[str, Any]:
    return {
        "exp_labels": {
            "severity": severity,
            "namespace": "radflow",
            "destination": destination,
            "lane": lane,
        }
    }


def _about(series: str, destination: str, lane: str, value: float) -> dict[str, Any]:
    """A check that ``series`` is within 0.1% of ``value`` at 90 min (1 - 0.99 is not
    exactly 0.01 in floating point, so the burn rate is not exactly a round number)."""
    selector = f'{series}{{destination="{destination}", lane="{lane}"}}'
    return {
        "expr": f"({selector} > bool {value * 0.999}) * ({selector} < bool {value * 1.001})",
        "eval_time": "90m",
        "exp_samples": [
            {
                "labels": f'{{namespace="radflow", destination="{destination}", lane="{lane}"}}',
                "value": 1,
            }
        ],
    }


def _tests() -> dict[str, Any]:
    over = PER_MINUTE // 5  # 20% late: 20x the budget of a 99% objective
    fast = _lane(
        "pacs",
        "stat",
        0.99,
        {
            "within": f"0+{PER_MINUTE - over}x240",
            "over": f"0+{over}x240",
            "failed": "0+0x240",
        },
    )
    # 20% late against a 90% objective: a burn rate of 2, a ticket but no page.
    slow = _lane(
        "pacs",
        "routine",
        0.9,
        {
            "within": f"0+{PER_MINUTE - over}x240",
            "over": "0+0x240",
            "failed": f"0+{over}x240",
        },
    )
    # Nothing delivered: 0/0 has no value, so no burn rate and no alert.
    idle = _lane(
        "idle", "stat", 0.99, {"within": "0+0x240", "over": "0+0x240", "failed": "0+0x240"}
    )
    # Healthy: 0.5% late against 99%, a burn rate of 0.5.
    healthy = _lane(
        "healthy",
        "routine",
        0.99,
        {"within": "0+199x240", "over": "0+1x240", "failed": "0+0x240"},
    )
    # 20% late for an hour, then none: the page resolves once its short windows are
    # clean (the 6 h pair's 30 min window), while the ticket stays.
    on_time, after_an_hour = PER_MINUTE - over, (PER_MINUTE - over) * 60 + PER_MINUTE
    stopped = _lane(
        "recovered",
        "stat",
        0.99,
        {
            "within": f"0+{on_time}x60 {after_an_hour}+{PER_MINUTE}x179",
            "over": f"0+{over}x60 {over * 60}+0x179",
            "failed": "0+0x240",
        },
    )
    return {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "group_eval_order": list(SLO_GROUPS),
        "tests": [
            {
                "name": "burn rates",
                "interval": "1m",
                "input_series": fast + slow + idle + healthy + stopped,
                "promql_expr_test": [
                    _about("radflow:slo_burn_rate1h", "pacs", "stat", 20),
                    _about("radflow:slo_burn_rate6h", "pacs", "routine", 2),
                    _about("radflow:slo_burn_rate1d", "healthy", "routine", 0.5),
                    {
                        "expr": 'radflow:slo_burn_rate5m{destination="idle"}',
                        "eval_time": "90m",
                        "exp_samples": [],
                    },
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "30m",
                        "alertname": "RadflowLatencySloFastBurn",
                        "exp_alerts": [
                            _fires("critical", "pacs", "stat"),
                            _fires("critical", "recovered", "stat"),
                        ],
                    },
                    {
                        "eval_time": "30m",
                        "alertname": "RadflowLatencySloSlowBurn",
                        "exp_alerts": [
                            _fires("warning", "pacs", "stat"),
                            _fires("warning", "pacs", "routine"),
                            _fires("warning", "recovered", "stat"),
                        ],
                    },
                    {
                        "eval_time": "100m",
                        "alertname": "RadflowLatencySloFastBurn",
                        "exp_alerts": [
                            _fires("critical", "pacs", "stat"),
                        ],
                    },
                    {
                        "eval_time": "100m",
                        "alertname": "RadflowLatencySloSlowBurn",
                        "exp_alerts": [
                            _fires("warning", "pacs", "stat"),
                            _fires("warning", "pacs", "routine"),
                            _fires("warning", "recovered", "stat"),
                        ],
                    },
                ],
            }
        ],
    }


def test_burn_rate_alerts_fire_and_resolve_as_the_sre_workbook_says(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus): rules not evaluated")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(_slo_rules(), sort_keys=False))
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(_tests(), sort_keys=False))
    done = subprocess.run(
        [promtool, "test", "rules", "test.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_made_up_series_are_what_the_test_says_they_are() -> None:
    """The scenarios' own arithmetic, so a mistake in the expanding notation shows here
    too where promtool is not installed."""
    series = {s["series"]: s["values"] for s in _tests()["tests"][0]["input_series"]}

    def expand(notation: str) -> list[float]:
        values: list[float] = []
        for part in notation.split():
            start, rest = part.split("+")
            step, times = rest.split("x")
            values += [float(start) + float(step) * i for i in range(int(times) + 1)]
        return values

    def share_late(destination: str, lane: str, start: int, end: int) -> float:
        def delta(outcome: str) -> float:
            key = (
                f'radflow_forwarder_slo_deliveries_total{{namespace="radflow", '
                f'destination="{destination}", lane="{lane}", outcome="{outcome}"}}'
            )
            values = expand(series[key])
            return values[end] - values[start]

        late = delta("over") + delta("failed")
        return late / (late + delta("within"))

    assert all(len(expand(v)) == 241 for v in series.values())
    assert share_late("pacs", "stat", 30, 90) == pytest.approx(0.2)
    assert share_late("pacs", "routine", 30, 90) == pytest.approx(0.2)
    assert share_late("healthy", "routine", 0, 240) == pytest.approx(0.005)
    assert share_late("recovered", "stat", 0, 60) == pytest.approx(0.2)
    assert share_late("recovered", "stat", 65, 100) == 0
    # Every counter only grows (a reset would be read as one by rate()).
    for values in series.values():
        numbers = expand(values)
        assert all(b >= a for a, b in itertools.pairwise(numbers))
