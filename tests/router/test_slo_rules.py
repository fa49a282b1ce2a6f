"""Latency objectives in the rule file: per destination and lane, a share of instances
that must be delivered within so many seconds; every mistake named with its line."""

from __future__ import annotations

import textwrap

import pytest

from radflow_core.events import Lane
from radflow_rules.loader import RuleFileError, load_text
from radflow_rules.rules import LatencyObjective, Slo

TAIL = "rules:\n  - name: all\n    route: [pacs]\ndefault: {hold: unrouted}\n"


def _rules(destination: str) -> str:
    return "version: 1\ndestinations:\n  pacs:\n" + textwrap.indent(destination, "    ") + TAIL


def _problems(text: str) -> list[str]:
    with pytest.raises(RuleFileError) as caught:
        load_text(text, "site.yaml")
    return caught.value.lines


def test_objectives_are_read_per_lane_and_a_lane_may_have_none() -> None:
    rules = load_text(
        "version: 1\n"
        "destinations:\n"
        "  pacs:\n"
        "    url: https://pacs.example/dicomweb\n"
        "    slo:\n"
        "      stat: {within_s: 60, percent: 99.5}\n"
        "      routine: {within_s: 900, percent: 99}\n"
        "  archive:\n"
        "    kind: dimse\n"
        "    host: archive.example\n"
        "    port: 104\n"
        "    ae_title: ARCHIVE\n"
        "    slo: {stat: {within_s: 120, percent: 95}}\n"
        "  plain: {url: https://plain.example/dicomweb}\n"
        "rules:\n"
        "  - name: all\n"
        "    route: [pacs, archive, plain]\n"
        "default: {hold: unrouted}\n",
        "site.yaml",
    )
    pacs = rules.destinations["pacs"].slo
    assert pacs.for_lane(Lane.STAT) == LatencyObjective(60.0, 99.5)
    assert pacs.for_lane(Lane.ROUTINE) == LatencyObjective(900.0, 99.0)
    assert pacs.for_lane(Lane.ROUTINE).ratio == pytest.approx(0.99)  # type: ignore[union-attr]
    archive = rules.destinations["archive"].slo
    assert archive.items() == [(Lane.STAT, LatencyObjective(120.0, 95.0))]
    assert archive.for_lane(Lane.ROUTINE) is None
    assert rules.destinations["plain"].slo == Slo()
    assert rules.destinations["plain"].slo.items() == []


def test_changing_an_objective_changes_the_destination_but_not_its_identity() -> None:
    before = load_text(_rules("url: https://pacs.example/dicomweb\n"), "site.yaml")
    after = load_text(
        _rules("url: https://pacs.example/dicomweb\nslo: {routine: {within_s: 5, percent: 90}}\n"),
        "site.yaml",
    )
    old, new = before.destinations["pacs"], after.destinations["pacs"]
    assert old != new
    assert old.identity == new.identity


@pytest.mark.parametrize(
    ("slo", "line", "expected"),
    [
        (
            "slo: {urgent: {within_s: 60, percent: 99}}",
            5,
            "unknown key 'urgent' in slo of destination 'pacs' (expected one of: routine, stat)",
        ),
        (
            "slo:\n  stat: {within_s: 60}",
            6,
            "slo.stat of destination 'pacs' needs percent",
        ),
        (
            "slo:\n  routine: {percent: 99}",
            6,
            "slo.routine of destination 'pacs' needs within_s",
        ),
        (
            "slo:\n  stat:\n    within_s: soon\n    percent: 99",
            7,
            "within_s must be a number (got 'soon')",
        ),
        (
            "slo:\n  stat:\n    within_s: 0\n    percent: 99",
            7,
            "within_s must be more than 0 seconds",
        ),
        (
            "slo:\n  stat:\n    within_s: 60\n    percent: 100",
            8,
            "percent must be above 0 and below 100",
        ),
        (
            "slo:\n  stat:\n    within_s: inf\n    percent: 99",
            7,
            "within_s must be a finite number",
        ),
        (
            "slo:\n  stat: {within_s: 60, percent: 99, p95_s: 30}",
            6,
            "unknown key 'p95_s' in slo.stat of destination 'pacs'",
        ),
        ("slo: {}", 5, "slo of destination 'pacs' names no lane"),
        ("slo: 300", 5, "slo of destination 'pacs' must be a mapping"),
        ("slo:\n  stat: 60", 6, "slo.stat of destination 'pacs' must be a mapping"),
    ],
)
def test_each_mistake_in_an_objective_is_named_with_its_line(
    slo: str, line: int, expected: str
) -> None:
    problems = _problems(_rules("url: https://pacs.example/dicomweb\n" + slo + "\n"))
    assert any(p.startswith(f"site.yaml:{line}: ") and expected in p for p in problems), problems


def test_report_return_destinations_take_no_objective() -> None:
    text = (
        "version: 1\n"
        "destinations:\n"
        "  ris:\n"
        "    kind: report-return\n"
        "    site: north\n"
        "    slo: {routine: {within_s: 60, percent: 99}}\n"
        "rules:\n"
        "  - name: all\n"
        "    route: [ris]\n"
        "default: {hold: unrouted}\n"
    )
    problems = _problems(text)
    assert any(p.startswith("site.yaml:6: unknown key 'slo'") for p in problems), problems


def test_every_problem_of_both_lanes_is_reported() -> None:
    problems = _problems(
        _rules(
            "url: https://pacs.example/dicomweb\n"
            "slo:\n"
            "  stat: {within_s: -1, percent: 99}\n"
            "  routine: {within_s: 60, percent: 0}\n"
        )
    )
    assert len(problems) == 2, problems
