"""The what-if comparison on its own (no broker): time-of-day rules see the moment the
router decided, a hold is "no destination", a wait is a destination, and only the
instances whose destinations change are listed."""

from __future__ import annotations

from datetime import UTC, datetime

from radflow_core.events import Lane
from radflow_rules.loader import load_text
from radflow_rules.rules import Instance
from router.whatif import HELD, Case, Outcome, RouteTaken, compare, render

NEW = """
version: 1
timezone: UTC
destinations:
  pacs: {url: "https://pacs.example/dicomweb"}
  night: {url: "https://night.example/dicomweb"}
rules:
  - name: night-reading
    when: {time: {between: "18:00-07:00"}}
    route: [night]
    wait_for_study_complete: {quiet_seconds: 60}
    continue: true
  - name: ct
    when: {modality: CT}
    route: [pacs]
default: {hold: unrouted}
"""

NIGHT = datetime(2026, 11, 23, 22, 0, tzinfo=UTC)
DAY = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def case(uid: str, modality: str, at: datetime, actual: Outcome | None) -> Case:
    return Case(uid, "1.2.3", modality, at, actual, Instance({"modality": modality}))


def to_pacs(rule: str = "everything") -> Outcome:
    return Outcome({"pacs": RouteTaken(Lane.ROUTINE, (rule,))})


def test_only_instances_whose_destinations_change_are_listed_with_what_changed() -> None:
    rules = load_text(NEW)
    report = compare(
        rules,
        [
            case("1.1", "CT", DAY, to_pacs()),  # same destination, another rule: no change
            case("1.2", "MR", DAY, to_pacs()),  # now held: -pacs
            case("1.3", "CT", NIGHT, to_pacs()),  # night window at its own time: +night
            case("1.4", "US", DAY, Outcome({}, "unrouted")),  # held then, held now
            case("1.5", "CT", DAY, None),  # the router has not decided yet
        ],
    )
    assert [(c.case.sop_instance_uid, c.added, c.removed) for c in report.changes] == [
        ("1.2", (), ("pacs",)),
        ("1.3", ("night",), ()),
    ]
    assert (report.instances, report.compared) == (5, 4)
    assert [c.sop_instance_uid for c in report.undecided] == ["1.5"]
    pacs, night, held = (report.destinations[n] for n in ("pacs", "night", HELD))
    assert (pacs.requested, pacs.would, pacs.kept, pacs.removed) == (3, 2, 2, 1)
    assert (night.requested, night.would, night.added) == (0, 1, 1)
    assert (held.requested, held.would, held.kept, held.added) == (1, 2, 1, 1)
    assert report.by_rule[("pacs", "everything")].requested == 3
    assert report.by_rule[("pacs", "ct")].would == 2
    assert report.by_rule[(HELD, "unrouted")].would == 2
    night_change = report.changes[1]
    assert night_change.after.routes["night"].waits, "a wait is still a route to night"
    text = render(report, "heading")
    assert "2 instance(s) change destination:" in text
    assert "+night" in text and "-pacs" in text and "1.4" not in text.split("change destination")[1]


def test_a_lane_change_alone_is_counted_but_is_not_a_destination_change() -> None:
    rules = load_text(NEW.replace("route: [pacs]", "route: [pacs]\n    lane: stat"))
    report = compare(rules, [case("1.1", "CT", DAY, to_pacs())])
    assert report.changes == []
    assert report.destinations["pacs"].lane_changed == 1
    assert "No instance changes destination." in render(report, "heading")


def test_a_deidentification_change_alone_is_counted_but_is_not_a_destination_change() -> None:
    rules = load_text(
        NEW.replace("rules:\n", "deidentification:\n  research:\nrules:\n", 1).replace(
            "route: [pacs]", "route: [pacs]\n    deidentify: research"
        )
    )
    report = compare(rules, [case("1.1", "CT", DAY, to_pacs())])
    assert report.changes == []
    assert report.destinations["pacs"].deidentification_changed == 1
    assert report.destinations["pacs"].lane_changed == 0
    assert "de-identification changed" in render(report, "heading")
