"""The shipped alerts and recording rules, evaluated by Prometheus's own rule engine:
``promtool test rules`` runs the unit tests shipped beside them
(deploy/k8s/base/monitoring/tests/test_*.yaml) on the rules file derived from the
PrometheusRule, as an operator would (docs/operations.md, "Testing the alerts").

Every alert needs a case where it fires and one where it stays quiet, every recording
rule a value: a new rule without them fails here. The input series must be ones the
services export, with their labels and the target labels Prometheus adds, so that a
test cannot pass on series no real system has. promtool's own runs are skipped where
it is not installed (Debian package prometheus, ``make system-deps``); the rest is not.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from deploy.manifests import K8S, selectors
from deploy.test_metrics_exported import PROMETHEUS_OWN, TARGET_LABELS, declared_labels
from radflow_devstack.prometheus_rules import rules_file, write_rules_file

MONITORING = K8S / "base" / "monitoring"
ALERTS = MONITORING / "alerts.yaml"
TEST_FILES = sorted((MONITORING / "tests").glob("test_*.yaml"))
TESTED_ANNOTATIONS = ("summary",)
"""The annotations the test files state (promtool compares every annotation an alert
carries): the summary, the line a pager shows. The description and runbook are long
prose whose rendering each test would have to repeat; `promtool check rules` still
parses their templates."""


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package prometheus): rules not evaluated")
    return path


def _run(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        [_promtool(), *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(ALERTS.read_text())["spec"]["groups"]
    return groups


def _unit_tests(path: Path) -> dict[str, Any]:
    tests: dict[str, Any] = yaml.safe_load(path.read_text())
    return tests


def test_promtool_accepts_the_rules_file_with_every_annotation(tmp_path: Path) -> None:
    rules = write_rules_file(ALERTS, tmp_path / "rules.yaml")
    assert yaml.safe_load(rules.read_text()) == {"groups": _groups()}
    _run("check", "rules", "rules.yaml", cwd=tmp_path)


def test_the_unit_tests_rules_file_differs_only_in_the_annotations_left_out() -> None:
    shipped = [rule for group in _groups() for rule in group["rules"]]
    tested = [
        rule
        for group in rules_file(ALERTS.read_text(), TESTED_ANNOTATIONS)["groups"]
        for rule in group["rules"]
    ]
    assert len(tested) == len(shipped)
    for rule, original in zip(tested, shipped, strict=True):
        if "alert" in original:
            assert rule["annotations"] == {"summary": original["annotations"]["summary"]}
            original = {**original, "annotations": rule["annotations"]}
        assert rule == original


@pytest.mark.parametrize("test_file", TEST_FILES, ids=lambda p: p.name)
def test_the_alerts_fire_and_stay_quiet_as_the_shipped_tests_say(
    test_file: Path, tmp_path: Path
) -> None:
    write_rules_file(ALERTS, tmp_path / "rules.yaml", TESTED_ANNOTATIONS)
    shutil.copy(test_file, tmp_path)
    _run("test", "rules", test_file.name, cwd=tmp_path)


def test_every_alert_has_a_firing_and_a_quiet_case_and_every_recording_rule_a_value() -> None:
    rules = [rule for group in _groups() for rule in group["rules"]]
    alerts = {r["alert"] for r in rules if "alert" in r}
    records = {r["record"] for r in rules if "record" in r}
    fires: set[str] = set()
    quiet: set[str] = set()
    valued: set[str] = set()
    for path in TEST_FILES:
        unit_tests = _unit_tests(path)
        assert unit_tests["rule_files"] == ["rules.yaml"], path.name
        # Groups in the order Prometheus evaluates them (promtool's is random otherwise).
        assert unit_tests["group_eval_order"] == [g["name"] for g in _groups()], path.name
        for test in unit_tests["tests"]:
            for case in test.get("alert_rule_test", []):
                # An unknown name would pass every quiet case: nothing fires.
                assert case["alertname"] in alerts, f"{path.name}: {case['alertname']}"
                (fires if case["exp_alerts"] else quiet).add(case["alertname"])
            for case in test.get("promql_expr_test", []):
                if case["exp_samples"]:
                    valued |= records & set(selectors(case["expr"]))
    assert alerts - fires == set(), "alerts never seen firing in the tests"
    assert alerts - quiet == set(), "alerts never seen quiet in the tests"
    assert records - valued == set(), "recording rules without an expected value"


def _input_series() -> list[tuple[str, dict[str, str]]]:
    """(file, series) → every input series of the test files: name and labels."""
    found = []
    for path in TEST_FILES:
        for test in _unit_tests(path)["tests"]:
            for series in test["input_series"]:
                selector = promql_parser.parse(series["series"])
                assert isinstance(selector, promql_parser.VectorSelector)
                labels = {m.name: m.value for m in selector.matchers.matchers}
                found.append(
                    (f"{path.name}: {selector.name}", {"__name__": selector.name, **labels})
                )
    return found


def test_the_input_series_are_what_the_services_export_as_prometheus_stores_it() -> None:
    declared = declared_labels()
    for where, labels in _input_series():
        name = labels.pop("__name__")
        assert name in declared or name in PROMETHEUS_OWN, f"{where}: not exported"
        own = declared.get(name, set())
        assert set(labels) == own | TARGET_LABELS, f"{where}: labels {sorted(labels)}"
        if name not in PROMETHEUS_OWN or labels["job"].startswith("radflow-"):
            # As the ServiceMonitors scrape them: job and service are the Service's name.
            assert labels["job"] == labels["service"] == f"radflow-{labels['container']}", where
            assert labels["pod"].startswith(labels["job"] + "-"), where


def test_the_slo_series_are_what_their_comments_say() -> None:
    """The arithmetic of test_slo.yaml's made-up delivery counters, so a mistake in
    promtool's expanding notation shows here too where promtool is not installed."""
    values: dict[tuple[str, str, str], list[float]] = {}
    for test in _unit_tests(MONITORING / "tests" / "test_slo.yaml")["tests"][:1]:
        for series in test["input_series"]:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', series["series"]))
            if series["series"].startswith("radflow_forwarder_slo_deliveries_total"):
                key = (labels["destination"], labels["lane"], labels["outcome"])
                values[key] = _expand(series["values"])

    def share_late(destination: str, lane: str, start: int, end: int) -> float:
        def delta(outcome: str) -> float:
            counter = values[(destination, lane, outcome)]
            return counter[end] - counter[start]

        late = delta("over") + delta("failed")
        return late / (late + delta("within"))

    assert all(len(v) == 241 for v in values.values())
    assert share_late("pacs", "stat", 30, 90) == pytest.approx(0.2)
    assert share_late("pacs", "routine", 30, 90) == pytest.approx(0.2)
    assert share_late("healthy", "routine", 0, 240) == pytest.approx(0.005)
    assert share_late("recovered", "stat", 0, 60) == pytest.approx(0.2)
    assert share_late("recovered", "stat", 65, 100) == 0
    # Every counter only grows (a reset would be read as one by rate()).
    for counter in values.values():
        assert all(b >= a for a, b in itertools.pairwise(counter))


def _expand(notation: str) -> list[float]:
    """promtool's ``a+bxn`` / ``a-bxn`` notation (n + 1 values), as numbers."""
    values: list[float] = []
    for part in notation.split():
        match = re.fullmatch(r"(-?[\d.]+)([+-])([\d.]+)x(\d+)", part)
        assert match is not None, part
        start, sign, step, times = match.groups()
        delta = float(step) if sign == "+" else -float(step)
        values += [float(start) + delta * i for i in range(int(times) + 1)]
    return values
