"""Rule evaluation: attribute matchers, any-tag conditions, STAT mapping, and time
windows across midnight and daylight-saving changes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from radflow_core.events import Lane
from radflow_rules.loader import load_text
from radflow_rules.rules import Instance, evaluate

RULES = """
version: 1
timezone: Europe/Zurich
destinations:
  pacs: {url: "https://pacs.example/dicomweb"}
  night: {url: "https://night.example/dicomweb"}
  ai: {url: "https://ai.example/dicomweb"}
stat:
  calling_aes: [ER_CT1]
rules:
  - name: head-ai
    when:
      all:
        - modality: [CT, MR]
        - body_part_examined: {in: [HEAD, BRAIN]}
        - "(0008,1030)": {regex: "(?i)stroke"}
    route: [ai]
    continue: true
  - name: night
    when:
      time: {between: "18:00-07:00", days: [mon, tue, wed, thu, fri]}
    route: [night]
  - name: institution-known
    when:
      not: {institution: {exists: false}}
    route: [pacs]
default:
  hold: nothing matched
"""


@pytest.fixture(scope="module")
def rules():
    return load_text(RULES, "rules.yaml")


def _instance(rules, stat_priority: str | None = None, **attributes: str | None) -> Instance:
    return Instance(attributes, rules.stat.is_stat(attributes, stat_priority))


def _destinations(decision) -> list[str]:
    return [r.destination for r in decision.routes]


def zurich(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_any_tag_conditions_by_keyword_and_group_element(rules) -> None:
    at = zurich("2026-11-23T10:00+01:00")  # Monday day time
    stroke = _instance(
        rules,
        modality="CT",
        body_part_examined="HEAD",
        StudyDescription="CT Stroke protocol",
        InstitutionName="Spital",
    )
    decision = evaluate(rules, stroke, at)
    assert _destinations(decision) == ["ai", "pacs"]
    assert decision.routes[0].rules == ("head-ai",)
    plain = _instance(rules, modality="CT", body_part_examined="HEAD", StudyDescription="Routine")
    decision = evaluate(rules, plain, at)
    assert decision.routes == ()
    assert decision.hold == "nothing matched"  # held with its reason, never dropped


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        ("2026-11-23T17:59+01:00", False),  # Monday, before the window
        ("2026-11-23T18:00+01:00", True),
        ("2026-11-24T06:59+01:00", True),  # Tuesday morning: Monday night's window
        ("2026-11-24T07:00+01:00", False),
        ("2026-11-28T03:00+01:00", True),  # Saturday 03:00 belongs to Friday night
        ("2026-11-29T03:00+01:00", False),  # Sunday 03:00 belongs to Saturday: no window
        ("2026-11-23T17:30+00:00", True),  # 18:30 in Zurich, given in UTC
    ],
)
def test_night_window_wraps_midnight_and_belongs_to_the_day_it_starts(
    rules, when: str, expected: bool
) -> None:
    decision = evaluate(rules, _instance(rules, modality="OT"), zurich(when))
    assert ("night" in _destinations(decision)) is expected


@pytest.mark.parametrize(
    ("utc", "expected"),
    [
        # Zurich springs forward on Sunday 2026-03-29 (02:00 CET -> 03:00 CEST).
        ("2026-03-27T16:59+00:00", False),  # Fri 17:59 CET
        ("2026-03-27T17:00+00:00", True),  # Fri 18:00 CET
        ("2026-03-30T16:00+00:00", True),  # Mon 18:00 CEST: an hour earlier in UTC
        ("2026-03-30T04:59+00:00", False),  # Mon 06:59 CEST belongs to Sunday: no window
        ("2026-03-31T04:59+00:00", True),  # Tue 06:59 CEST: Monday night
        ("2026-03-31T05:00+00:00", False),  # Tue 07:00 CEST
    ],
)
def test_window_follows_local_time_across_spring_dst(rules, utc: str, expected: bool) -> None:
    decision = evaluate(rules, _instance(rules, modality="OT"), datetime.fromisoformat(utc))
    assert ("night" in _destinations(decision)) is expected


def test_fall_back_hour_is_judged_in_local_time(rules) -> None:
    # Sun 2026-10-25 03:00 CEST -> 02:00 CET; Monday 06:30 local is inside Sunday's?
    # Sunday windows do not exist (weekdays only): Monday 06:30 belongs to Sunday night.
    monday_0630 = datetime(2026, 10, 26, 5, 30, tzinfo=UTC)  # 06:30 CET
    assert "night" not in _destinations(
        evaluate(rules, _instance(rules, modality="OT"), monday_0630)
    )
    monday_1830 = datetime(2026, 10, 26, 17, 30, tzinfo=UTC)  # 18:30 CET (UTC+1 after fall back)
    assert "night" in _destinations(evaluate(rules, _instance(rules, modality="OT"), monday_1830))
    friday_1830_cest = datetime(2026, 10, 23, 16, 30, tzinfo=UTC)  # 18:30 CEST (UTC+2)
    assert "night" in _destinations(
        evaluate(rules, _instance(rules, modality="OT"), friday_1830_cest)
    )


@pytest.mark.parametrize(
    ("priority", "attributes", "stat"),
    [
        ("high", {}, True),  # C-STORE priority HIGH
        ("medium", {"RequestedProcedurePriority": "STAT"}, True),
        ("medium", {"calling_ae": "ER_CT1"}, True),  # calling-AE mapping
        ("medium", {"calling_ae": "CT2"}, False),
        (None, {"RequestedProcedurePriority": "ROUTINE"}, False),
    ],
)
def test_stat_comes_from_priority_tag_or_calling_ae(rules, priority, attributes, stat) -> None:
    instance = _instance(rules, priority, InstitutionName="X", **attributes)
    decision = evaluate(rules, instance, zurich("2026-11-23T10:00+01:00"))
    assert decision.routes[0].lane is (Lane.STAT if stat else Lane.ROUTINE)
