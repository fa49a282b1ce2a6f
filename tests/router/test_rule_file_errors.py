"""Bad rule files: each kind of mistake gets a precise message with its line."""

from __future__ import annotations

import textwrap

import pytest

from radflow_rules.loader import RuleFileError, load_text
from support.bad_rules import BAD_RULE_FILES, GOOD_HEAD


def _problems(text: str) -> list[str]:
    with pytest.raises(RuleFileError) as info:
        load_text(textwrap.dedent(text), "site.yaml")
    return str(info.value).splitlines()


@pytest.mark.parametrize(("name", "text", "expected"), BAD_RULE_FILES)
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


def test_a_destination_may_not_take_the_name_the_forwarder_reserves() -> None:
    text = (
        "version: 1\n"
        "destinations:\n"
        "  unknown-destinations: {url: 'http://pacs/dicomweb'}\n"
        "rules:\n"
        "  - name: all\n"
        "    route: [unknown-destinations]\n"
    )
    with pytest.raises(RuleFileError) as caught:
        load_text(text, "rules.yaml")
    assert any("reserved" in line and ":3:" in line for line in caught.value.lines)


def test_secrets_may_go_over_https_or_loopback_and_dimse_peers_take_dicom_tls() -> None:
    rules = load_text(
        textwrap.dedent("""\
        version: 1
        destinations:
          orthanc: {url: "http://orthanc.local:8042/dicom-web"}
          sidecar:
            url: http://127.0.0.1:8080/dicom-web
            auth: {type: bearer, token_env: T}
          v6: {url: "http://[::1]:8080/dicom-web", auth: {type: bearer, token_env: T}}
          cloud:
            url: https://pacs.example/dicom-web
            auth: {type: oauth2, token_url: "https://login.example/token", client_id: r,
                   client_secret_env: S}
          pacs:
            kind: dimse
            host: 10.0.0.5
            port: 2762
            ae_title: PACS
            tls: {ca_file: /ca.pem, cert_file: /c.pem, key_file: /c.key, server_name: pacs.example}
        rules:
          - name: a
            route: [orthanc, sidecar, v6, cloud, pacs]
        default: {hold: x}
        """),
        "site.yaml",
    )
    tls = rules.destinations["pacs"].tls
    assert tls is not None and tls.server_name == "pacs.example"
    assert str(tls.ca_file) == "/ca.pem"
