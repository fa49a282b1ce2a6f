"""Rules on who sent an instance: the authenticated sender's identity (``apikey:…``,
``cert:…``, ``jwt:<issuer>#<subject>``) as a condition and in the STAT policy, with
line errors for what is not an identity."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime

import pytest

from radflow_rules.loader import RuleFileError, load_text
from radflow_rules.rules import Instance, evaluate

RULES = """\
version: 1
destinations:
  pacs: {url: "https://pacs.example/dicomweb"}
  research: {url: "https://research.example/dicomweb"}
stat:
  identities: ["cert:ER-CT-1"]
rules:
  - name: partner-research
    when:
      sender_identity: {in: ["apikey:partner-a", "jwt:https://idp.example#research-app"]}
    route: [research]
  - name: outside-senders
    when: {sender_identity: {regex: "^jwt:https://idp[.]example#"}}
    route: [pacs]
default: {hold: unknown sender}
"""
AT = datetime(2026, 11, 23, 10, tzinfo=UTC)


def _route(identity: str | None) -> tuple[list[str], bool]:
    rules = load_text(RULES, "rules.yaml")
    attributes = {"sender_identity": identity}
    instance = Instance(attributes, rules.stat.is_stat(attributes, None))
    decision = evaluate(rules, instance, AT)
    return [r.destination for r in decision.routes], instance.stat


@pytest.mark.parametrize(
    ("identity", "routes", "stat"),
    [
        ("apikey:partner-a", ["research"], False),
        ("jwt:https://idp.example#research-app", ["research"], False),
        ("jwt:https://idp.example#modality-gw", ["pacs"], False),
        ("cert:ER-CT-1", [], True),
        (None, [], False),
    ],
)
def test_rules_route_and_prioritise_by_sender_identity(
    identity: str | None, routes: list[str], stat: bool
) -> None:
    assert _route(identity) == (routes, stat)


@pytest.mark.parametrize(
    ("snippet", "line"),
    [
        ("stat: {identities: [ER-CT-1]}\n", 4),
        ("stat: {identities: ['apikey:']}\n", 4),
    ],
)
def test_a_stat_identity_that_is_not_one_is_a_line_error(snippet: str, line: int) -> None:
    text = "version: 1\ndestinations:\n  pacs: {url: 'https://pacs/dicomweb'}\n" + snippet
    text += "rules:\n  - name: all\n    route: [pacs]\n"
    with pytest.raises(RuleFileError) as caught:
        load_text(text, "site.yaml")
    assert f"site.yaml:{line}" in str(caught.value)
    assert "is not a sender identity" in str(caught.value)


def test_a_condition_on_an_identity_that_is_not_one_is_a_line_error() -> None:
    text = textwrap.dedent("""\
        version: 1
        destinations:
          pacs: {url: 'https://pacs/dicomweb'}
        rules:
          - name: by-sender
            when: {sender_identity: partner-a}
            route: [pacs]
        """)
    with pytest.raises(RuleFileError) as caught:
        load_text(text, "site.yaml")
    assert "site.yaml:6" in str(caught.value)
    assert "'partner-a' is not a sender identity" in str(caught.value)
