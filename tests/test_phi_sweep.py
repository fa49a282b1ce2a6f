"""Patient data stays in the blob store: the whole pipeline runs on inputs full of
distinctive patient data (images refused at the door, delivered, refused by a
destination, held and dead-lettered; reports
from the reporting platform and from Structured Reports; a RIS that answers AE and AR
quoting the patient), then every service's log and every record of every topic, read
from the beginning, is searched for every marker. The one exception is the Patient ID
in the audit trail, where PS3.15 A.5.3 requires it, and only as the ID of a patient
participant object."""

from __future__ import annotations

import io
import json
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from radflow_core.topics import Topic
from radflow_devstack.kit.waiting import wait_for
from radflow_devstack.mllp_peer import MllpPeer, Reply
from radflow_devstack.processes import ManagedProcess
from support.audit import audit_records, patient_ids, without_patient_ids
from support.dicom import bundled_file, make_instance, pynetdicom_store
from support.kafka import read_topic
from support.orthanc import OrthancView
from support.reports import document, make_sr, publisher, write_sites
from support.stack import IngestProcess, Stack

pytestmark = pytest.mark.pipeline

ALLOWED: dict[str, frozenset[str]] = {Topic.AUDIT.value: frozenset({"PatientID"})}
"""Topic → the markers (by name, as in ``markers()``) that topic may carry, and only as
the ParticipantObjectID of a patient participant object of a DICOM audit message
(PS3.15 A.5.3 requires the patient in Instances Transferred and Export; the name is
left out: docs/security.md, Audit trail). No other topic may carry any."""

TAG = uuid.uuid4().hex[:6].upper()


def markers() -> dict[str, str]:
    """One unique, greppable value per kind of patient data (this run's tag in each)."""
    return {
        "PatientFamilyName": f"PHI{TAG}FAMILY",
        "PatientGivenName": f"PHI{TAG}GIVEN",
        "PatientID": f"PHI{TAG}PID",
        "OtherPatientIDs": f"PHI{TAG}OTHERID",
        "PatientBirthDate": "19230517",
        "PatientAddress": f"PHI{TAG}ADDRESS",
        "AccessionNumber": f"PHI{TAG}ACC",
        "ReferringPhysicianName": f"PHI{TAG}REFDOC",
        "StudyDescription": f"PHI{TAG}STUDYDESC",
        "SeriesDescription": f"PHI{TAG}SERIESDESC",
        "InstitutionName": f"PHI{TAG}INSTITUTION",
        "ReportText": f"PHI{TAG}REPORTTEXT",
        "RadiologistName": f"PHI{TAG}RADIOLOGIST",
    }


MARKERS = markers()
DEMOGRAPHICS = {
    "PatientName": f"{MARKERS['PatientFamilyName']}^{MARKERS['PatientGivenName']}",
    "PatientID": MARKERS["PatientID"],
    "OtherPatientIDs": MARKERS["OtherPatientIDs"],
    "PatientBirthDate": MARKERS["PatientBirthDate"],
    "PatientAddress": MARKERS["PatientAddress"],
    "AccessionNumber": MARKERS["AccessionNumber"],
    "ReferringPhysicianName": MARKERS["ReferringPhysicianName"],
    "StudyDescription": MARKERS["StudyDescription"],
    "SeriesDescription": MARKERS["SeriesDescription"],
    "InstitutionName": MARKERS["InstitutionName"],
}
"""DICOM attributes set on every instance sent."""
RIS_SAYS = (
    f"Patient {MARKERS['PatientFamilyName']} {MARKERS['PatientGivenName']} "
    f"born {MARKERS['PatientBirthDate']} MRN {MARKERS['PatientID']} order "
    f"{MARKERS['AccessionNumber']} unknown"
)
"""What the RIS answers in MSA-3 and ERR-8: it quotes the patient, as real ones do."""

DEBUG = {"RADFLOW_LOG_LEVEL": "DEBUG", "RADFLOW_AUDIT_TRANSFER_WINDOW_S": "0.5"}

RULES = """\
version: 1
destinations:
  ris-north: {kind: report-return, site: north}
  pacs: {url: "%(pacs)s"}
  refusing: {url: "%(refusing)s"}
rules:
  - name: reports-to-the-ris
    when: {modality: SR}
    route: [ris-north]
  - name: ct-to-pacs
    when: {modality: CT}
    route: [pacs, refusing]
default: {hold: unrouted}
"""


def _with_demographics(path: Path, raw: bytes | None = None) -> Path:
    ds = pydicom.dcmread(io.BytesIO(raw) if raw is not None else path)
    for keyword, value in DEMOGRAPHICS.items():
        setattr(ds, keyword, value)
    ds.save_as(path)
    return path


def _found(text: str, allowed: frozenset[str] = frozenset()) -> list[str]:
    return [name for name, value in MARKERS.items() if value in text and name not in allowed]


def _outside_patient_objects(value: Any, allowed: frozenset[str]) -> Any:
    """An audit record with the allowed markers taken out where the standard puts
    them (a patient object's ID); anything left over is a leak."""
    data = value.get("data") if isinstance(value, dict) else None
    if not allowed or not isinstance(data, dict) or "message" not in data:
        return value
    only = {MARKERS[name] for name in allowed}
    return {**value, "data": {**data, "message": without_patient_ids(data["message"], only)}}


def _topics(stack: Stack) -> Iterator[tuple[str, str]]:
    """(name, stack topic) for every topic of the pipeline, audit included once it is."""
    for topic in Topic:
        yield topic.value, stack.topic(topic)


@pytest.fixture
def mllp_peer() -> Iterator[MllpPeer]:
    peer = MllpPeer().start()
    yield peer
    peer.stop()


def test_no_patient_data_reaches_any_log_or_topic(
    stack: Stack,
    start_ingest: Callable[..., IngestProcess],
    start_transcode: Callable[..., IngestProcess],
    start_router: Callable[..., IngestProcess],
    start_forwarder: Callable[..., IngestProcess],
    start_report_return: Callable[..., IngestProcess],
    start_orthanc_server: Callable[..., ManagedProcess],
    mllp_peer: MllpPeer,
    tmp_path: Path,
) -> None:
    orthanc = OrthancView(start_orthanc_server())
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        RULES % {"pacs": orthanc.dicomweb, "refusing": f"{orthanc.url}/no-such-dicomweb"}
    )
    sites = write_sites(
        tmp_path / "sites.yaml",
        {
            "north": {
                "host": "127.0.0.1",
                "port": mllp_peer.port,
                "ack_timeout_s": 5,
                "application_error_retries": 0,
                "patient_identifier": {"assigning_authority": "NORTH"},
            }
        },
    )
    mllp_peer.script(Reply("AE", RIS_SAYS))
    mllp_peer.default = Reply("AR", RIS_SAYS)
    # DEBUG: what an operator turns on to diagnose must not leak either.
    later: dict[str, Any] = {"wait_ready": False, "wait_port": False, "env": DEBUG}
    started = [
        start_ingest(**later),
        start_transcode(**later),
        start_router(rules_file=str(rules), **later),
        start_forwarder(rules_file=str(rules), **later),
        start_report_return(
            sites_file=str(sites), rules_file=str(rules), retry_initial_s="0.1", **later
        ),
    ]
    for service in started:
        service.wait_ready()
    ingest = started[0]

    study = generate_uid()
    sent = [
        make_instance(tmp_path / f"ct{i}.dcm", study_instance_uid=study, extra=DEMOGRAPHICS)
        for i in range(2)
    ]
    sent.append(make_instance(tmp_path / "mr.dcm", modality="MR", extra=DEMOGRAPHICS))
    broken = bundled_file("JPEG-lossy.dcm")  # its pixel data cannot be decoded
    sent.append(_with_demographics(tmp_path / "broken.dcm", broken.read_bytes()))
    text = f"Findings for {MARKERS['PatientFamilyName']}: {MARKERS['ReportText']}"
    sr = make_sr(
        tmp_path / "sr.dcm",
        findings=[text],
        impression=[MARKERS["ReportText"]],
        accession=MARKERS["AccessionNumber"],
        patient_id=MARKERS["PatientID"],
    )
    sent.append(_with_demographics(sr))
    for path in sent:
        assert pynetdicom_store(ingest.dimse_port, path).status == 0, path.name
    refused = make_instance(
        tmp_path / "bad-uid.dcm", study_instance_uid="1.2.x", extra=DEMOGRAPHICS
    )
    assert pynetdicom_store(ingest.dimse_port, refused).status != 0, "ingest refuses it"
    publish = publisher(stack)
    for _ in range(2):
        publish(
            document(
                accession_number=MARKERS["AccessionNumber"],
                patient={
                    "identifiers": [{"id": MARKERS["PatientID"], "assigning_authority": "NORTH"}],
                    "name": {
                        "family": MARKERS["PatientFamilyName"],
                        "given": MARKERS["PatientGivenName"],
                    },
                    "birth_date": "1923-05-17",
                    "sex": "F",
                },
                sections=[{"heading": "Findings", "text": text}],
                impression=MARKERS["ReportText"],
                radiologist={"id": "R-17", "name": {"family": MARKERS["RadiologistName"]}},
            )
        )

    def count(topic: Topic) -> int:
        return len(stack.events(topic))

    expected = {
        Topic.FORWARD_COMPLETED: 2,
        Topic.FORWARD_FAILED: 2,
        Topic.INSTANCE_HELD: 1,
        Topic.INSTANCE_FAILED: 1,
        Topic.REPORT_FAILED: 3,
    }
    wait_for(
        "every input at its end: delivered, refused, held, dead-lettered, reports failed",
        lambda: all(count(t) == n for t, n in expected.items()),
        timeout_s=45,
    )
    assert {m.answered for m in mllp_peer.received} == {"AE", "AR"}
    assert any(MARKERS["PatientID"] in m.er7 for m in mllp_peer.received), "the RIS got it"

    def patient_audited() -> set[tuple[str, str]] | None:
        """(EventID, action) of the audit messages naming the patient by ID."""
        named = {
            (
                r["event_id"],
                ET.fromstring(r["message"]).find("EventIdentification").get("EventActionCode"),
            )
            for r in audit_records(stack)
            if patient_ids(r["message"]) == [MARKERS["PatientID"]]
        }
        return named if {("110104", "C"), ("110104", "R"), ("110106", "R")} <= named else None

    wait_for("received, sent and exported audited with the Patient ID", patient_audited)

    leaks: list[str] = []
    for name, topic in _topics(stack):
        for record in read_topic(stack.kafka, topic):
            value = _outside_patient_objects(record["value"], ALLOWED.get(name, frozenset()))
            raw = json.dumps({"key": record["key"], "value": value})
            for found in _found(raw):
                leaks.append(f"{found} in topic {name} offset {record['offset']}: {raw[:300]}")
    for service in started:
        for number, line in enumerate(service.log().splitlines(), 1):
            for found in _found(line):
                leaks.append(f"{found} in {service.proc.name}'s log line {number}: {line[:300]}")
    assert not leaks, "patient data outside the blob store:\n" + "\n".join(leaks)
