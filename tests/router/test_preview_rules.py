"""The ``preview:`` rule option: which images of a series get a lossy preview, decided
from the instance alone, and precise errors for a malformed option."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime

import pytest

from radflow_rules.loader import RuleFileError, load_text
from radflow_rules.rules import Instance, PreviewKind, PreviewSelection, evaluate

FIRST = PreviewSelection()
KEY = PreviewSelection(PreviewKind.KEY_FRAMES)


def every(n: int) -> PreviewSelection:
    return PreviewSelection(PreviewKind.EVERY, n)


@pytest.mark.parametrize(
    ("selection", "number", "frames", "expected"),
    [
        (FIRST, 1, 1, (1,)),
        (FIRST, 0, 1, (1,)),
        (FIRST, 2, 1, ()),
        (FIRST, 1, 30, (1,)),
        (FIRST, 2, 30, ()),
        (FIRST, None, 1, (1,)),
        (KEY, 1, 1, (1,)),
        (KEY, 5, 1, ()),
        (KEY, 1, 30, (1, 15, 30)),
        (KEY, 7, 30, (1, 15, 30)),
        (KEY, 1, 2, (1, 2)),
        (every(10), 1, 1, (1,)),
        (every(10), 11, 1, (1,)),
        (every(10), 12, 1, ()),
        (every(10), 0, 1, (1,)),
        (every(10), 4, 25, (1, 11, 21)),
        (every(1), 9, 1, (1,)),
    ],
)
def test_the_selection_is_decided_from_instance_number_and_frame_count(
    selection: PreviewSelection, number: int | None, frames: int, expected: tuple[int, ...]
) -> None:
    assert selection.frames(number, frames) == expected


HEAD = """\
version: 1
destinations:
  reading: {url: "https://reading.example/dicomweb"}
  archive: {url: "https://archive.example/dicomweb"}
  ris: {kind: report-return, site: main}
"""


def load(rules: str):
    return load_text(HEAD + textwrap.dedent(rules), "site.yaml")


def test_each_form_of_the_option_is_read_and_reaches_the_route_of_its_rule() -> None:
    rules = load("""\
        rules:
          - name: ct
            when: {modality: CT}
            route: [reading]
            preview: first
            continue: true
          - name: us
            when: {modality: US}
            route: [reading]
            preview: key-frames
          - name: ct-archive
            when: {modality: CT}
            route: [archive, reading]
            preview: {every: 10}
        default: {hold: x}
        """)
    assert [r.preview for r in rules.rules] == [FIRST, KEY, every(10)]
    decision = evaluate(rules, Instance({"modality": "CT"}), datetime.now(UTC))
    routes = {r.destination: r for r in decision.routes}
    assert routes["reading"].previews == (FIRST, every(10))
    assert routes["reading"].preview_frames(11, 1) == (1,)
    assert routes["reading"].preview_frames(2, 1) == ()
    assert routes["archive"].previews == (every(10),)
    assert routes["archive"].preview_frames(1, 1) == (1,)


def test_a_rule_without_the_option_routes_no_preview() -> None:
    rules = load("rules:\n  - name: all\n    route: [reading]\ndefault: {hold: x}\n")
    (route,) = evaluate(rules, Instance({}), datetime.now(UTC)).routes
    assert route.previews == ()
    assert route.preview_frames(1, 1) == ()


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("preview: all", "site.yaml:9: rule 'a': unknown preview 'all'"),
        ("preview: {every: 0}", "site.yaml:9: preview of rule 'a': every must be a whole number"),
        ("preview: {every: ten}", "site.yaml:9: preview of rule 'a': every must be a whole"),
        ("preview: {each: 3}", "site.yaml:9: unknown key 'each' in preview of rule 'a'"),
        ("preview: {}", "site.yaml:9: preview of rule 'a' names no selection"),
        ("preview: [first]", "site.yaml:9: preview must be a single value"),
    ],
)
def test_a_malformed_preview_option_is_named_with_its_line(option: str, expected: str) -> None:
    with pytest.raises(RuleFileError) as info:
        load(f"rules:\n  - name: a\n    route: [reading]\n    {option}\ndefault: {{hold: x}}\n")
    assert any(expected in line for line in str(info.value).splitlines()), str(info.value)


def test_previews_to_a_report_return_destination_are_refused() -> None:
    with pytest.raises(RuleFileError) as info:
        load("rules:\n  - name: a\n    route: [ris]\n    preview: first\ndefault: {hold: x}\n")
    assert "site.yaml:9: rule 'a' asks for previews but routes to ris" in str(info.value)


def test_previews_on_a_rule_that_reads_the_order_are_refused() -> None:
    with pytest.raises(RuleFileError) as info:
        load(
            "rules:\n  - name: a\n    when: {order_priority: stat}\n    route: [reading]\n"
            "    preview: first\ndefault: {hold: x}\n"
        )
    assert "site.yaml:10: rule 'a' asks for previews but its condition reads the order" in str(
        info.value
    )
    # The same rule without previews, and previews on a rule of the study's own
    # attributes after it, are fine.
    load(
        "rules:\n  - name: a\n    when: {order_priority: stat}\n    route: [reading]\n"
        "    continue: true\n  - name: b\n    when: {modality: CT}\n    route: [reading]\n"
        "    preview: first\ndefault: {hold: x}\n"
    )
