"""Bad rule files: each kind of mistake gets a precise message with its line."""

from __future__ import annotations

import textwrap

import pytest

from router.loader import RuleFileError, load_text

GOOD_HEAD = """\
version: 1
destinations:
  pacs: {url: "https://pacs.example/dicomweb"}
"""


def _problems(text: str) -> list[str]:
    with pytest.raises(RuleFileError) as info:
        load_text(textwrap.dedent(text), "site.yaml")
    return str(info.value).splitlines()


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("yaml syntax", "rules: [\n  - name: a\n", "site.yaml:2: not valid YAML"),
        ("empty file", "", "site.yaml:1: the rule file is empty"),
        (
            "unknown destination",
            GOOD_HEAD + "rules:\n  - name: a\n    route: [pacs2]\ndefault: {hold: x}\n",
            "site.yaml:6: unknown destination 'pacs2' in rule 'a' (expected one of: pacs)",
        ),
        (
            "bad regex",
            GOOD_HEAD + "rules:\n  - name: a\n    when: {modality: {regex: '(CT'}}\n"
            "    route: [pacs]\ndefault: {hold: x}\n",
            "site.yaml:6: invalid regular expression /(CT/",
        ),
        (
            "bad timezone",
            GOOD_HEAD + "rules:\n  - name: a\n    when:\n      time: {between: "
            "'18:00-07:00', timezone: Europe/Zurch}\n    route: [pacs]\ndefault: {hold: x}\n",
            "site.yaml:7: unknown time zone 'Europe/Zurch'",
        ),
        (
            "bad window",
            GOOD_HEAD + "rules:\n  - name: a\n    when: {time: {between: '6pm-7am'}}\n"
            "    route: [pacs]\ndefault: {hold: x}\n",
            "site.yaml:6: time window '6pm-7am' is not HH:MM-HH:MM",
        ),
        (
            "impossible time",
            GOOD_HEAD + "rules:\n  - name: a\n    when: {time: {between: "
            "'25:00-07:00'}}\n    route: [pacs]\ndefault: {hold: x}\n",
            "impossible time",
        ),
        (
            "bad day",
            GOOD_HEAD + "rules:\n  - name: a\n    when: {time: {between: '18:00-07:00',"
            " days: [mon, funday]}}\n    route: [pacs]\ndefault: {hold: x}\n",
            "unknown day(s)",
        ),
        (
            "unknown attribute",
            GOOD_HEAD + "rules:\n  - name: a\n    when: {modalty: CT}\n"
            "    route: [pacs]\ndefault: {hold: x}\n",
            "site.yaml:6: unknown attribute 'modalty'",
        ),
        (
            "typo in rule key",
            GOOD_HEAD + "rules:\n  - name: a\n    wen: {modality: CT}\n"
            "    route: [pacs]\ndefault: {hold: x}\n",
            "site.yaml:6: unknown key 'wen' in a rule",
        ),
        (
            "duplicate rule names",
            GOOD_HEAD + "rules:\n  - name: a\n    route: [pacs]\n"
            "    continue: true\n  - name: a\n    route: [pacs]\ndefault: {hold: x}\n",
            "site.yaml:8: rule name 'a' already used on line 5",
        ),
        (
            "no route",
            GOOD_HEAD + "rules:\n  - name: a\n    when: {modality: CT}\ndefault: {hold: x}\n",
            "site.yaml:5: rule 'a' routes nowhere",
        ),
        ("no default", GOOD_HEAD + "rules:\n  - name: a\n    route: [pacs]\n", "no 'default'"),
        (
            "destination without url",
            "version: 1\ndestinations:\n  pacs: {auth: X}\nrules:\n"
            "  - name: a\n    route: [pacs]\ndefault: {hold: x}\n",
            "site.yaml:3: destination 'pacs' needs a url",
        ),
        (
            "bad wait",
            GOOD_HEAD + "rules:\n  - name: a\n    route: [pacs]\n"
            "    wait_for_study_complete: {quiet_seconds: -5}\ndefault: {hold: x}\n",
            "quiet_seconds must be a whole number",
        ),
        (
            "bad lane",
            GOOD_HEAD + "rules:\n  - name: a\n    route: [pacs]\n    lane: urgent\n"
            "default: {hold: x}\n",
            "site.yaml:7: lane must be routine or stat",
        ),
        (
            "bad tag",
            GOOD_HEAD + "rules:\n  - name: a\n    when: {'(0008,10G0)': X}\n"
            "    route: [pacs]\ndefault: {hold: x}\n",
            "unknown attribute '(0008,10G0)'",
        ),
        (
            "empty any",
            GOOD_HEAD + "rules:\n  - name: a\n    when: {any: []}\n    route: [pacs]\n"
            "default: {hold: x}\n",
            "'any' needs at least one condition",
        ),
    ],
)
def test_each_mistake_is_named_with_its_line(name: str, text: str, expected: str) -> None:
    problems = _problems(text)
    assert any(expected in p for p in problems), (name, problems)


def test_every_problem_is_reported_not_just_the_first() -> None:
    text = GOOD_HEAD + (
        "rules:\n  - name: a\n    when: {modality: {regex: '('}}\n    route: [nope]\n"
        "default: {route: [missing]}\n"
    )
    problems = _problems(text)
    assert len(problems) == 3, problems


def test_unreachable_and_shadowed_rules_are_warned_about() -> None:
    rules = load_text(
        GOOD_HEAD
        + textwrap.dedent("""\
        rules:
          - name: everything
            route: [pacs]
          - name: never
            when: {modality: CT}
            route: [pacs]
        default: {hold: x}
        """),
        "site.yaml",
    )
    assert any("'never' is unreachable" in w and "site.yaml:7" in w for w in rules.warnings)
