"""docs/reliability.md is generated from the fault suite's results and says what each
run found, including a scenario that lost or duplicated something."""

from __future__ import annotations

from faults.publish import render


def _result(scenario: str, **overrides: object) -> dict[str, object]:
    return {
        "scenario": scenario,
        "title": f"title of {scenario}",
        "acknowledged": 120,
        "delivered": {"a": 120, "b": 120},
        "lost": {"a": 0, "b": 0},
        "duplicated": {"a": 0, "b": 0},
        "dead_letters": {"dicom.instance.failed": 0, "dicom.forward.failed": 0},
        "drain_s": 12.5,
        "details": {"outage_s": 12.1},
        "mode": "ci",
        "when": "2026-12-01T03:00:00Z",
        **overrides,
    }


def test_each_result_is_a_row_with_its_counts_and_the_operator_step() -> None:
    page = render([_result("soak"), _result("destination_outage", lost={"a": 0, "b": 3})])
    rows = [line for line in page.splitlines() if line.startswith("| title of")]
    assert rows[0].startswith("| title of destination_outage | ci, 2026-12-01 | 120 |")
    assert "a: 0 / b: 3" in rows[0]
    assert "12.5 s" in rows[0]
    assert "Measured: outage_s = 12.1." in page
    assert "**What an operator does:**" in page


def test_scenarios_without_a_result_are_listed_as_missing() -> None:
    page = render([_result("soak")])
    assert "No result was recorded for:" in page
    assert "`destination_outage`" in page
