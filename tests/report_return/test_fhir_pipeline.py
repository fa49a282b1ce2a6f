"""report-return's FHIR channel on the real broker and S3 against a real HTTP FHIR
server (radflow_devstack.fhir_server): a finalized report becomes exactly one FHIR R4
DiagnosticReport that validates, a correction updates it, a retry after a lost answer
creates nothing new, refusals end in report.failed with the server's words redacted,
and the OAuth2 token is fetched once and renewed when it stops working."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from radflow_core.events import ReportStatus
from radflow_core.topics import Topic
from radflow_devstack.fhir_server import FhirServer, Outcome
from radflow_devstack.kit.waiting import wait_for
from radflow_devstack.mllp_peer import MllpPeer
from support.metrics import metric
from support.mllp import field
from support.reports import FHIR_CLIENT, FHIR_SECRET, Publish, document, write_sites
from support.stack import IngestProcess, Stack

pytestmark = pytest.mark.pipeline

PHI = ("SENTINEL", "PHINAME", "MRN-4711", "1970-01-01", "ACC-1001", "VISIT-31")


def returned(stack: Stack) -> list[dict[str, Any]]:
    return [e["data"] for e in stack.events(Topic.REPORT_RETURNED)]


def failed(stack: Stack) -> list[dict[str, Any]]:
    return [e["data"] for e in stack.events(Topic.REPORT_FAILED)]


def fhir_site(server: FhirServer, secret_file: Path, **settings: Any) -> dict[str, Any]:
    return {
        "output": "fhir",
        "patient_identifier": {"assigning_authority": "NORTH"},
        "fhir": {
            "base_url": server.base_url,
            "auth": {
                "type": "oauth2",
                "token_url": server.token_url,
                "client_id": FHIR_CLIENT,
                "client_secret_file": str(secret_file),
                "scope": "system/DiagnosticReport.write",
            },
            "report_identifier_system": "urn:oid:1.2.3.4.5.6",
            "patient_identifier_system": "urn:oid:1.2.3.4.5.1",
            "encounter_identifier_system": "urn:oid:1.2.3.4.5.2",
            "timeout_s": 5,
            **settings.pop("fhir", {}),
        },
        **settings,
    }


def start(start_report_return, tmp_path: Path, sites: dict[str, Any], **settings: str):
    path = write_sites(tmp_path / "sites.yaml", sites)
    return start_report_return(
        sites_file=str(path), retry_initial_s="0.1", retry_max_s="0.3", **settings
    )


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "fhir-secret"
    path.write_text(FHIR_SECRET + "\n")
    return path


def valid(resource: dict[str, Any]) -> DiagnosticReport:
    """The resource as the FHIR R4(B) model reads it (raises if it does not validate)."""
    return DiagnosticReport.model_validate(resource)


def test_a_final_report_to_a_fhir_site_creates_one_valid_diagnostic_report(
    stack: Stack,
    start_report_return,
    fhir_server: FhirServer,
    publish_report: Publish,
    secret_file: Path,
    tmp_path: Path,
) -> None:
    service: IngestProcess = start(
        start_report_return, tmp_path, {"north": fhir_site(fhir_server, secret_file)}
    )
    doc = document(visit_number="VISIT-31", observed_at="2026-11-23T10:15:00+01:00")
    event = publish_report(doc, report_id="REP-F1")
    wait_for("the report returned", lambda: len(returned(stack)) == 1, timeout_s=60)

    (answer,) = returned(stack)
    assert answer["channel"] == "fhir" and answer["status"] == "final"
    assert answer["ack_code"] is None and answer["attempts"] == 1
    assert answer["fhir"]["interaction"] == "create" and answer["fhir"]["http_status"] == 201
    assert answer["fhir"]["created"] is True
    (report,) = fhir_server.reports()
    assert answer["fhir"]["resource_id"] == report["id"]
    model = valid(report)
    assert model.status == "final"
    assert report["identifier"] == [
        {"use": "official", "system": "urn:oid:1.2.3.4.5.6", "value": "REP-F1"}
    ]
    assert report["category"][0]["coding"][0]["code"] == "RAD"
    assert report["category"][0]["coding"][0]["system"].endswith("/v2-0074")
    assert report["code"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "18748-4",
        "display": "Diagnostic imaging study",
    }
    subject = report["subject"]["identifier"]
    assert (subject["system"], subject["value"]) == ("urn:oid:1.2.3.4.5.1", "MRN-4711")
    encounter = report["encounter"]["identifier"]
    assert (encounter["system"], encounter["value"]) == ("urn:oid:1.2.3.4.5.2", "VISIT-31")
    assert report["imagingStudy"][0]["identifier"] == {
        "system": "urn:dicom:uid",
        "value": f"urn:oid:{event.study_instance_uid}",
    }
    assert report["resultsInterpreter"][0]["identifier"]["value"] == "R-17"
    assert report["performer"][0]["display"] == "Rita Reader"
    form = report["presentedForm"][0]
    assert form["contentType"] == "text/plain; charset=utf-8"
    text = base64.b64decode(form["data"]).decode("utf-8")
    assert "No acute findings." in text and "Normal study." in text
    assert report["conclusion"] == "Normal study."
    assert report["effectiveDateTime"].startswith("2026-11-23T10:15:00")
    (request,) = fhir_server.received
    assert request.method == "POST"
    assert request.headers["If-None-Exist"] == "identifier=urn:oid:1.2.3.4.5.6|REP-F1"
    assert request.headers["Authorization"].startswith("Bearer ")
    assert request.headers["X-Request-Id"] == answer["message_control_id"]
    assert (
        metric(
            service.url,
            "radflow_report_return_outcomes_total",
            site="north",
            channel="fhir",
            outcome="returned",
        )
        == 1
    )
    assert (
        metric(
            service.url,
            "radflow_report_return_fhir_requests_total",
            site="north",
            interaction="create",
            status="201",
        )
        == 1
    )
    log = service.log()
    assert not [p for p in PHI if p in log], "no patient data in the log"
    assert not [p for p in PHI if p in json.dumps(returned(stack))]


def test_both_sends_the_oru_to_the_ris_and_the_diagnostic_report_with_a_smart_assertion(
    stack: Stack,
    start_report_return,
    mllp_peer: MllpPeer,
    publish_report: Publish,
    tmp_path: Path,
) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    key_file = tmp_path / "smart-key.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with FhirServer(assertion_keys={"smart-client": public.decode()}) as server:
        site = {
            "output": "both",
            "host": "127.0.0.1",
            "port": mllp_peer.port,
            "ack_timeout_s": 5,
            "patient_identifier": {"assigning_authority": "NORTH"},
            "fhir": {
                "base_url": server.base_url,
                "auth": {
                    "type": "smart-backend",
                    "token_url": server.token_url,
                    "client_id": "smart-client",
                    "private_key_file": str(key_file),
                    "algorithm": "ES384",
                    "key_id": "k1",
                    "scope": "system/DiagnosticReport.write",
                },
            },
        }
        service = start(start_report_return, tmp_path, {"north": site})
        event = publish_report(document())
        wait_for("both channels returned", lambda: len(returned(stack)) == 2, timeout_s=60)
        assert sorted(r["channel"] for r in returned(stack)) == ["fhir", "oru"]
        assert {r["report_id"] for r in returned(stack)} == {event.report_id}
        assert len(mllp_peer.received) == 1 and field(mllp_peer.received[0], "OBR", 25) == "F"
        (report,) = server.reports()
        valid(report)
        assert server.tokens_issued == 1 and server.tokens_refused == 0
        # A replay is recognised on each channel and sent on neither.
        publish_report(document(), report_id=event.report_id, study=event.study_instance_uid)
        wait_for("the replay answered twice", lambda: len(returned(stack)) == 4, timeout_s=60)
        replays = [r for r in returned(stack) if r["already_returned"]]
        assert sorted(r["channel"] for r in replays) == ["fhir", "oru"]
        assert len(mllp_peer.received) == 1 and len(server.received) == 1
        for channel in ("oru", "fhir"):
            assert (
                metric(
                    service.url,
                    "radflow_report_return_outcomes_total",
                    site="north",
                    channel=channel,
                    outcome="returned",
                )
                == 1
            )


def test_a_correction_updates_the_same_diagnostic_report(
    stack: Stack,
    start_report_return,
    fhir_server: FhirServer,
    publish_report: Publish,
    secret_file: Path,
    tmp_path: Path,
) -> None:
    start(
        start_report_return,
        tmp_path,
        {
            "north": fhir_site(fhir_server, secret_file),
            "east": fhir_site(fhir_server, secret_file, fhir={"correction_status": "amended"}),
        },
    )
    doc = document()
    first = publish_report(doc, report_id="REP-C1", status=ReportStatus.PRELIMINARY)
    study = first.study_instance_uid
    publish_report(doc, report_id="REP-C1", version=2, study=study)
    fixed = document(impression="Small nodule, right upper lobe.")
    publish_report(fixed, report_id="REP-C1", version=3, status=ReportStatus.CORRECTED, study=study)
    publish_report(doc, report_id="REP-E1", site="east")
    publish_report(doc, report_id="REP-E1", version=2, site="east", study=study)
    # Version 1 reached the server but its marker was lost (a crash): version 2's create
    # finds it, and version 2 is then put over it.
    stale = {"resourceType": "DiagnosticReport", "status": "preliminary", "code": {"text": "x"}}
    stale["identifier"] = [{"system": "urn:oid:1.2.3.4.5.6", "value": "REP-S1"}]
    fhir_server.seed(stale)
    publish_report(doc, report_id="REP-S1", version=2, study=study)
    wait_for("6 versions returned", lambda: len(returned(stack)) == 6, timeout_s=60)

    by_report = {r["identifier"][0]["value"]: r for r in fhir_server.reports()}
    assert set(by_report) == {"REP-C1", "REP-E1", "REP-S1"}, "one resource per report"
    assert [v["status"] for v in fhir_server.versions(by_report["REP-S1"]["id"])] == [
        "preliminary",
        "final",
    ]
    (recovered,) = [r for r in returned(stack) if r["report_id"] == "REP-S1"]
    assert recovered["attempts"] == 2 and recovered["fhir"]["interaction"] == "update"
    statuses = {(r["report_id"], r["report_version"]): r["status"] for r in returned(stack)}
    assert statuses.pop(("REP-S1", 2)) == "final"
    north = fhir_server.versions(by_report["REP-C1"]["id"])
    assert [v["status"] for v in north] == ["preliminary", "final", "corrected"]
    assert north[-1]["conclusion"] == "Small nodule, right upper lobe."
    assert [v["meta"]["tag"][0]["code"] for v in north] == ["1", "2", "3"]
    for version in north:
        valid(version)
    east = fhir_server.versions(by_report["REP-E1"]["id"])
    assert [v["status"] for v in east] == ["final", "amended"]
    methods = [(r.method, r.path.split("?")[0]) for r in fhir_server.received]
    assert [m for m, _ in methods].count("POST") == 3 and [m for m, _ in methods].count("PUT") == 4
    puts = [r for r in fhir_server.received if r.method == "PUT"]
    assert all("?identifier=" in r.path for r in puts)
    assert statuses == {
        ("REP-C1", 1): "preliminary",
        ("REP-C1", 2): "final",
        ("REP-C1", 3): "corrected",
        ("REP-E1", 1): "final",
        ("REP-E1", 2): "corrected",
    }
    updates = [r for r in returned(stack) if r["fhir"]["interaction"] == "update"]
    assert len(updates) == 4 and all(r["fhir"]["http_status"] == 200 for r in updates)


def test_a_retry_after_a_lost_response_or_a_5xx_creates_nothing_new(
    stack: Stack,
    start_report_return,
    fhir_server: FhirServer,
    publish_report: Publish,
    secret_file: Path,
    tmp_path: Path,
) -> None:
    service = start(start_report_return, tmp_path, {"north": fhir_site(fhir_server, secret_file)})
    fhir_server.script("503", "drop")
    publish_report(document(), report_id="REP-L1")
    wait_for("the report returned", lambda: len(returned(stack)) == 1, timeout_s=60)

    (answer,) = returned(stack)
    assert answer["attempts"] == 3
    assert answer["fhir"]["http_status"] == 200 and answer["fhir"]["created"] is False
    assert len(fhir_server.reports()) == 1, "the dropped answer's create is the only one"
    assert [r.answered for r in fhir_server.received] == [503, None, 200]
    assert {r.headers["X-Request-Id"] for r in fhir_server.received} == {
        answer["message_control_id"]
    }
    assert {r.headers["If-None-Exist"] for r in fhir_server.received} == {
        "identifier=urn:oid:1.2.3.4.5.6|REP-L1"
    }
    assert failed(stack) == []
    assert metric(service.url, "radflow_report_return_retries_total", site="north") == 2


def test_refusals_end_in_report_failed_with_the_servers_words_redacted(
    stack: Stack,
    start_report_return,
    fhir_server: FhirServer,
    publish_report: Publish,
    secret_file: Path,
    tmp_path: Path,
) -> None:
    service = start(start_report_return, tmp_path, {"north": fhir_site(fhir_server, secret_file)})
    fhir_server.script(
        Outcome(
            422,
            "Patient MRN-4711 (Sentinel, PHINAME, born 1970-01-01) has no order ACC-1001",
            code="processing",
            expression=("DiagnosticReport.subject",),
        )
    )
    refused = publish_report(document(), report_id="REP-R1")
    wait_for("the refusal", lambda: len(failed(stack)) == 1, timeout_s=60)
    # Two reports already carry the next one's identifier: the server cannot choose.
    twin = {"resourceType": "DiagnosticReport", "status": "final", "code": {"text": "x"}}
    twin["identifier"] = [{"system": "urn:oid:1.2.3.4.5.6", "value": "REP-R2"}]
    fhir_server.seed(twin)
    fhir_server.seed(twin)
    ambiguous = publish_report(document(), report_id="REP-R2")
    wait_for("the 412", lambda: len(failed(stack)) == 2, timeout_s=60)

    by_report = {f["report_id"]: f for f in failed(stack)}
    dead = by_report[refused.report_id]
    assert dead["channel"] == "fhir" and dead["reason"] == "fhir_rejected"
    assert dead["retriable"] is False and dead["attempts"] == 1 and dead["http_status"] == 422
    assert dead["fhir_issues"] == [
        {
            "severity": "error",
            "code": "processing",
            "details_code": None,
            "text": "Patient [redacted] ([redacted], [redacted], born [redacted]) has no order "
            "[redacted]",
            "expression": ["DiagnosticReport.subject"],
        }
    ]
    assert dead["source_topic"] == stack.topic(Topic.REPORTS_FINALIZED)
    twice = by_report[ambiguous.report_id]
    assert twice["reason"] == "fhir_ambiguous" and twice["http_status"] == 412
    assert len(fhir_server.reports()) == 2 and returned(stack) == []
    assert not [p for p in PHI if p.lower() in json.dumps(failed(stack)).lower()]
    assert not [p for p in PHI if p.lower() in service.log().lower()]
    assert (
        metric(
            service.url, "radflow_report_return_failed_total", site="north", reason="fhir_rejected"
        )
        == 1
    )


def test_the_token_is_fetched_once_reused_and_renewed_after_a_401(
    stack: Stack,
    start_report_return,
    fhir_server: FhirServer,
    publish_report: Publish,
    secret_file: Path,
    tmp_path: Path,
) -> None:
    service = start(start_report_return, tmp_path, {"north": fhir_site(fhir_server, secret_file)})
    publish_report(document())
    publish_report(document())
    wait_for("2 reports returned", lambda: len(returned(stack)) == 2, timeout_s=60)
    assert fhir_server.tokens_issued == 1, "one token for both reports"
    fhir_server.revoke_tokens()
    publish_report(document())
    wait_for("the third report returned", lambda: len(returned(stack)) == 3, timeout_s=60)
    assert fhir_server.tokens_issued == 2 and fhir_server.unauthorized == 1
    assert [r["attempts"] for r in returned(stack)] == [1, 1, 1]
    assert metric(service.url, "radflow_report_return_fhir_tokens_total", site="north") == 2
    assert len(fhir_server.reports()) == 3


def test_a_resource_that_does_not_validate_is_failed_with_the_element_named(
    stack: Stack,
    start_report_return,
    fhir_server: FhirServer,
    publish_report: Publish,
    secret_file: Path,
    tmp_path: Path,
) -> None:
    start(start_report_return, tmp_path, {"north": fhir_site(fhir_server, secret_file)})
    # Fine for HL7 (OBR-4), but FHIR's code type allows no double space.
    doc = document(procedure={"code": "CT  CHEST", "meaning": "CT Chest", "scheme": "L"})
    publish_report(doc)
    wait_for("the invalid resource failed", lambda: len(failed(stack)) == 1, timeout_s=60)
    (dead,) = failed(stack)
    assert dead["reason"] == "fhir_invalid_resource" and dead["retriable"] is False
    assert "DiagnosticReport.code.coding[1].code (string_pattern_mismatch)" in dead["message"]
    assert "CT  CHEST" not in dead["message"] and dead["attempts"] == 0
    time.sleep(0.5)
    assert fhir_server.received == [] and fhir_server.tokens_issued == 0


def test_a_fhir_server_that_keeps_failing_is_retried_until_the_budget_runs_out(
    stack: Stack,
    start_report_return,
    fhir_server: FhirServer,
    publish_report: Publish,
    secret_file: Path,
    tmp_path: Path,
) -> None:
    start(
        start_report_return,
        tmp_path,
        {"north": fhir_site(fhir_server, secret_file)},
        retry_budget_s="1.5",
    )
    fhir_server.script(*["503"] * 100)
    event = publish_report(document())
    wait_for("retries exhausted", lambda: len(failed(stack)) == 1, timeout_s=60)
    (dead,) = failed(stack)
    assert dead["reason"] == "retries_exhausted" and dead["retriable"] is True
    assert dead["channel"] == "fhir" and dead["http_status"] == 503
    assert dead["report_id"] == event.report_id and dead["attempts"] >= 2
    assert len(fhir_server.received) == dead["attempts"] and fhir_server.reports() == []
    assert dead["message_control_id"] == fhir_server.received[0].headers["X-Request-Id"]
    assert returned(stack) == []
