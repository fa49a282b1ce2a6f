"""Which destinations a preview goes to: those of the rules its original matches that
ask for previews and whose selection picks its frame; always in the STAT lane."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime

from radflow_core.events import InstancePreview, Lane, PreviewOf, Sender
from radflow_rules.loader import load_text
from radflow_rules.rules import Instance, evaluate
from router.explain import describe
from router.previews import PreviewRouter, preview_request
from router.routing import idempotency_key

RULES = load_text(
    textwrap.dedent("""\
    version: 1
    destinations:
      reading: {url: "https://reading.example/dicomweb"}
      archive: {url: "https://archive.example/dicomweb"}
      lossless-only:
        url: "https://ai.example/dicomweb"
        transfer_syntaxes: [1.2.840.10008.1.2.4.80]
    rules:
      - name: ct-preview
        when: {modality: CT, sop_class_uid: 1.2.840.10008.5.1.4.1.1.2}
        route: [reading, lossless-only]
        preview: {every: 2}
        wait_for_study_complete: {quiet_seconds: 60, level: study}
        continue: true
      - name: ct-archive
        when: {modality: CT}
        route: [archive]
    default: {hold: unrouted}
    """),
    "site.yaml",
)
BLOB = {"bucket": "radflow", "key": "preview/x/y.dcm", "size": 10, "sha256": "a" * 64}


def preview(instance_number: int | None, modality: str = "CT") -> InstancePreview:
    return InstancePreview(
        sop_instance_uid="2.25.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
        study_instance_uid="1.2.3",
        series_instance_uid="2.25.2",
        modality=modality,
        sender=Sender(protocol="dimse", calling_ae="CT1"),
        received_at=datetime.now(UTC),
        preview_of=PreviewOf(
            sop_instance_uid="1.2.3.4",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            series_instance_uid="1.2.3.5",
        ),
        blob=BLOB,
        transfer_syntax_uid="1.2.840.10008.1.2.4.50",
        lossy_ratio=10.0,
        lossy_method="ISO_10918_1",
        frames=(1,),
        derived_at=datetime.now(UTC),
        original={**BLOB, "key": "original/x/z.dcm", "sha256": "b" * 64},
        instance_number=instance_number,
    )


ROUTER = PreviewRouter(None, None, None, 0)  # type: ignore[arg-type]


def test_a_preview_is_routed_as_its_original_to_the_rules_that_ask_for_it() -> None:
    routes = ROUTER.routes(preview(3), RULES)
    assert sorted(r.destination for r in routes) == ["lossless-only", "reading"], (
        "the original's SOP class matches, not the preview's; archive asked for none"
    )


def test_the_selection_of_the_rule_decides_which_previews_go() -> None:
    assert ROUTER.routes(preview(2), RULES) == []
    assert ROUTER.routes(preview(1, modality="MR"), RULES) == []


def test_a_preview_request_is_stat_never_held_and_marked_as_a_preview() -> None:
    now = datetime.now(UTC)
    event = preview(1)
    requests = {
        r.destination: preview_request(event, RULES, r, now) for r in ROUTER.routes(event, RULES)
    }
    reading = requests["reading"]
    assert reading.lane is Lane.STAT and reading.waited_for is None
    assert reading.preview_of == event.preview_of
    assert reading.blob == event.blob
    assert reading.requested_transfer_syntax_uid == "1.2.840.10008.1.2.4.50"
    assert reading.idempotency_key == idempotency_key("2.25.1", "a" * 64, "reading")
    assert requests["lossless-only"].requested_transfer_syntax_uid == "1.2.840.10008.1.2.4.80"


def test_explain_says_which_destinations_get_a_preview_ahead() -> None:
    decision = evaluate(
        RULES,
        Instance({"modality": "CT", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2"}),
        datetime.now(UTC),
    )
    text = describe("ct.dcm", decision)
    assert (
        "-> reading [routine, wait for study complete (60s quiet)]"
        " + lossy preview (every 2) ahead, stat by ct-preview" in text
    )
    assert "-> archive [routine] by ct-archive" in text


def test_a_de_identified_route_de_identifies_its_previews_too() -> None:
    rules = load_text(
        textwrap.dedent("""\
        version: 1
        deidentification:
          research: {options: [retain_uids]}
        destinations:
          second-opinion: {url: "https://second.example/dicomweb"}
        rules:
          - name: ct-research
            when: {modality: CT}
            route: [second-opinion]
            deidentify: research
            preview: first
        default: {hold: unrouted}
        """),
        "site.yaml",
    )
    (route,) = ROUTER.routes(preview(1), rules)
    request = preview_request(preview(1), rules, route, datetime.now(UTC))
    assert request.deidentify is not None and request.deidentify.profile == "research"
    assert request.lane is Lane.STAT and request.preview_of is not None
    plain = preview_request(
        preview(1), RULES, ROUTER.routes(preview(1), RULES)[0], datetime.now(UTC)
    )
    assert plain.deidentify is None
    assert request.idempotency_key != idempotency_key(
        request.sop_instance_uid, request.original_sha256, request.destination
    ), "a de-identified delivery is another delivery than the plain one"
