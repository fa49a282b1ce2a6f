"""De-identification in the rule file and in routing decisions: profiles, rules and
destinations that name them, the stricter of two, and what the forward request carries."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime

import pytest
from pydicom.uid import generate_uid

from radflow_core.events import (
    BlobRef,
    DecodeStatus,
    Deidentification,
    DeidOption,
    InstanceNormalized,
    Protocol,
    Sender,
)
from radflow_rules.deidentification import DeidProfile, enforced
from radflow_rules.loader import RuleFileError, load_text
from radflow_rules.rules import Instance, evaluate
from router.explain import describe
from router.routing import forward_request

RULES = """\
version: 1
deidentification:
  basic:
  research:
    options: [retain_longitudinal_modified_dates, retain_patient_characteristics]
  ai:
    options: [retain_patient_characteristics, retain_device_identity, clean_descriptors]
destinations:
  pacs: {url: "https://pacs.example"}
  ai-node: {url: "https://ai.example"}
  registry: {url: "https://registry.example", deidentify: research}
rules:
  - name: everything-to-pacs
    route: [pacs, ai-node]
    continue: true
  - name: ct-to-ai
    when: {modality: CT}
    route: [ai-node]
    deidentify: ai
    accept_burned_in: true
    continue: true
  - name: chest-to-ai
    when: {body_part_examined: CHEST}
    route: [ai-node, registry]
    deidentify: research
default: {route: [registry]}
"""


def _decide(attributes: dict[str, str | None]):  # type: ignore[no-untyped-def]
    rules = load_text(RULES, "rules.yaml")
    decision = evaluate(rules, Instance(attributes), datetime.now(UTC))
    return rules, {r.destination: r for r in decision.routes}


def test_a_rule_names_a_profile_and_only_its_destinations_are_deidentified() -> None:
    _, routes = _decide({"modality": "CT", "body_part_examined": "HEAD"})
    assert routes["pacs"].deidentify is None
    deid = routes["ai-node"].deidentify
    assert deid is not None and deid.profile.name == "ai" and deid.accept_burned_in
    assert deid.profile.options == {
        DeidOption.RETAIN_PATIENT_CHARACTERISTICS,
        DeidOption.RETAIN_DEVICE_IDENTITY,
        DeidOption.CLEAN_DESCRIPTORS,
    }


def test_two_profiles_to_one_destination_give_the_stricter_combination() -> None:
    _, routes = _decide({"modality": "CT", "body_part_examined": "CHEST"})
    deid = routes["ai-node"].deidentify
    assert deid is not None
    assert deid.profile.name == "ai+research"
    # retained only where both retain; cleaned where either cleans
    assert deid.profile.options == {
        DeidOption.RETAIN_PATIENT_CHARACTERISTICS,
        DeidOption.CLEAN_DESCRIPTORS,
    }
    assert not deid.accept_burned_in  # chest-to-ai does not accept it


def test_a_destination_that_requires_a_profile_never_gets_identities() -> None:
    only_default = load_text(
        RULES.replace("route: [pacs, ai-node]", "route: [pacs]\n    when: {modality: CT}")
    )
    decision = evaluate(only_default, Instance({"modality": "MR"}), datetime.now(UTC))
    (route,) = decision.routes
    assert route.rules == ("default",)
    assert route.deidentify is not None and route.deidentify.profile.name == "research"
    rules = load_text(RULES.replace("route: [pacs, ai-node]", "route: [pacs, registry]"))
    decision = evaluate(rules, Instance({"modality": "MR"}), datetime.now(UTC))
    registry = next(r for r in decision.routes if r.destination == "registry")
    assert registry.deidentify is not None and registry.deidentify.profile.name == "research"


def test_the_forward_request_carries_the_profile_and_its_own_idempotency_key() -> None:
    rules, routes = _decide({"modality": "CT", "body_part_examined": "HEAD"})
    now = datetime.now(UTC)
    blob = BlobRef(bucket="b", key="k", size=1, sha256="a" * 64)
    event = InstanceNormalized(
        sop_instance_uid=generate_uid(),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(),
        sender=Sender(protocol=Protocol.DIMSE),
        received_at=now,
        original=blob,
        original_transfer_syntax_uid="1.2.840.10008.1.2.1",
        canonical=blob,
        canonical_transfer_syntax_uid="1.2.840.10008.1.2.1",
        decode_status=DecodeStatus.NON_IMAGE,
        normalized_at=now,
    )
    plain = forward_request(event, rules, routes["pacs"], now)
    deid = forward_request(event, rules, routes["ai-node"], now)
    assert plain.deidentify is None
    assert deid.deidentify is not None and deid.deidentify.profile == "ai"
    assert deid.deidentify.options == tuple(sorted(deid.deidentify.options))
    assert deid.deidentify.accept_burned_in
    identified = forward_request(
        event, rules, routes["ai-node"].__class__("ai-node", plain.lane, None, ("x",)), now
    )
    assert identified.idempotency_key != deid.idempotency_key


def _problems(text: str) -> list[str]:
    with pytest.raises(RuleFileError) as info:
        load_text(textwrap.dedent(text), "site.yaml")
    return str(info.value).splitlines()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("deidentify: ai", "deidentify: nope"), "site.yaml:19: rule 'ct-to-ai': unknown "),
        (
            ("retain_device_identity,", "retain_everything,"),
            "site.yaml:7: de-identification profile 'ai': unknown option 'retain_everything'",
        ),
        (
            ('registry.example", deidentify: research', 'registry.example", deidentify: x'),
            "site.yaml:11: destination 'registry': unknown de-identification profile 'x'",
        ),
        (
            (
                "    continue: true\n  - name: ct",
                "    accept_burned_in: true\n    continue: true\n  - name: ct",
            ),
            "site.yaml:15: rule 'everything-to-pacs': accept_burned_in applies to de-identified",
        ),
    ],
)
def test_deidentification_mistakes_are_named_with_their_line(
    change: tuple[str, str], expected: str
) -> None:
    text = RULES.replace(*change)
    assert text != RULES
    problems = _problems(text)
    assert any(expected in p for p in problems), problems


def test_explain_says_which_profile_a_route_applies() -> None:
    rules = load_text(RULES, "rules.yaml")
    decision = evaluate(rules, Instance({"modality": "CT"}), datetime.now(UTC))
    text = describe("ct.dcm", decision)
    assert "-> pacs [routine] by everything-to-pacs" in text
    assert (
        "-> ai-node [routine, de-identified: ai (clean_descriptors, "
        "retain_device_identity, retain_patient_characteristics, burned-in accepted)]"
    ) in text


def test_a_ris_destination_cannot_be_deidentified() -> None:
    text = RULES.replace(
        '  pacs: {url: "https://pacs.example"}', "  pacs: {kind: report-return, site: north}"
    ).replace("route: [ai-node]\n    deidentify: ai", "route: [ai-node, pacs]\n    deidentify: ai")
    problems = _problems(text)
    assert any(
        "site.yaml:19: rule 'ct-to-ai': destination 'pacs' is a RIS" in p for p in problems
    ), problems


def test_the_forwarder_enforces_a_destinations_profile_on_any_request() -> None:
    research = DeidProfile(
        "research", frozenset({DeidOption.RETAIN_UIDS, DeidOption.CLEAN_DESCRIPTORS})
    )
    assert enforced(None, None) is None
    carried = Deidentification(
        profile="ai", options=(DeidOption.RETAIN_UIDS,), accept_burned_in=True
    )
    assert enforced(carried, None) == carried
    assert enforced(None, research) == Deidentification(
        profile="research", options=(DeidOption.CLEAN_DESCRIPTORS, DeidOption.RETAIN_UIDS)
    )
    assert enforced(carried, research) == Deidentification(
        profile="ai+research",
        options=(DeidOption.CLEAN_DESCRIPTORS, DeidOption.RETAIN_UIDS),
        accept_burned_in=True,
    )
