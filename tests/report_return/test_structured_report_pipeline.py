"""Structured Reports through the whole pipeline: C-STORE → ingest → transcode → router
(a rule sends SR to a report-return destination) → report-return → MLLP peer. A
verified SR's text arrives as OBX text; an unfinished or unsigned one, or one without
an accession number, is dead-lettered and nothing is sent."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from radflow_core.topics import Topic
from radflow_devstack.kit.waiting import wait_for
from radflow_devstack.mllp_peer import MllpPeer
from support.dicom import bundled_file, pynetdicom_store
from support.metrics import metric
from support.mllp import field, sections
from support.reports import make_sr, write_sites
from support.stack import IngestProcess, Stack

pytestmark = pytest.mark.pipeline

RULES = """\
version: 1
destinations:
  ris-north: {kind: report-return, site: north}
  pacs: {url: "http://127.0.0.1:1/dicom-web"}
rules:
  - name: reports-to-the-ris
    when: {modality: SR}
    route: [ris-north]
  - name: images-to-pacs
    route: [pacs]
default: {hold: unrouted}
"""


def events(stack: Stack, topic: Topic) -> list[dict[str, Any]]:
    return [e["data"] for e in stack.events(topic)]


def text_values(item: Dataset) -> list[str]:
    """Every TEXT value of a content tree outside context items (an independent walk;
    in a CONTINUOUS container items are words of one paragraph, without children)."""
    found = []
    continuous = item.get("ContinuityOfContent") == "CONTINUOUS"
    for child in item.get("ContentSequence") or []:
        if child.get("RelationshipType") in ("HAS OBS CONTEXT", "HAS ACQ CONTEXT"):
            continue
        if child.get("ValueType") == "TEXT":
            found.append(re.sub(r"\r\n|\r", "\n", str(child.TextValue)))
        if not continuous or child.get("ValueType") == "CONTAINER":
            found += text_values(child)
    return found


@pytest.fixture
def pipeline(
    stack: Stack,
    start_ingest,
    start_transcode,
    start_router,
    start_report_return,
    mllp_peer: MllpPeer,
    tmp_path: Path,
) -> IngestProcess:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    sites = write_sites(
        tmp_path / "sites.yaml",
        {"north": {"host": "127.0.0.1", "port": mllp_peer.port, "ack_timeout_s": 5}},
    )
    later = {"wait_ready": False, "wait_port": False}
    started = [
        start_ingest(**later),
        start_transcode(**later),
        start_router(rules_file=str(rules), **later),
        start_report_return(sites_file=str(sites), rules_file=str(rules), **later),
    ]
    for service in started:
        service.wait_ready()
    return started[0]


def test_verified_structured_reports_reach_the_ris_with_their_text(
    stack: Stack, pipeline: IngestProcess, mllp_peer: MllpPeer, tmp_path: Path
) -> None:
    findings = [
        "Lungs: clear | no effusion ^ no pneumothorax & no nodules ~ 4 mm \\ none.",
        "Heart:\n  normal size\r\n  no pericardial effusion",
    ]
    impression = ["No acute cardiopulmonary process."]
    ours = make_sr(tmp_path / "ours.dcm", findings=findings, impression=impression)
    offis = pydicom.dcmread(bundled_file("test-SR.dcm"))
    offis.AccessionNumber, offis.PatientID = "ACC-OFFIS", "MRN-OFFIS"
    offis_path = tmp_path / "test-SR-with-order.dcm"
    offis.save_as(offis_path)
    for path in (ours, offis_path):
        assert pynetdicom_store(pipeline.dimse_port, path).status == 0

    wait_for("2 reports returned", lambda: len(events(stack, Topic.REPORT_RETURNED)) == 2, 120)
    normalized = events(stack, Topic.INSTANCE_NORMALIZED)
    assert {n["decode_status"] for n in normalized} == {"non_image"}
    assert {r["destination"] for r in events(stack, Topic.FORWARD_REQUESTED)} == {"ris-north"}
    by_accession = {field(m, "OBR", 18): m for m in mllp_peer.received}
    assert set(by_accession) == {"ACC-SR-1", "ACC-OFFIS"}

    message = by_accession["ACC-SR-1"]
    assert message.valid
    assert sections(message) == [
        (
            "121070^Findings^DCM",
            "Lungs: clear | no effusion ^ no pneumothorax & no nodules ~ "
            "4 mm \\ none.\nHeart:\n  normal size\n  no pericardial effusion",
        ),
        ("121072^Impressions^DCM", "No acute cardiopulmonary process."),
    ]
    assert field(message, "PID", 3) == "MRN-4711^^^NORTH^MR"
    assert field(message, "ORC", 2) == "PL-SR-9" and field(message, "ORC", 3) == "FI-SR-9"
    assert field(message, "OBR", 4) == "CTCHEST^CT Chest w/o contrast^L"
    assert field(message, "OBR", 25) == "F"
    assert field(message, "OBR", 32) == "R-17&Reader&Rita"
    assert field(message, "OBR", 22) == "20261123111500+0000"  # 12:15 at +01:00

    offis_text = "\n".join(text for _, text in sections(by_accession["ACC-OFFIS"]))
    for value in text_values(offis):
        assert value in offis_text, value
    assert field(by_accession["ACC-OFFIS"], "OBR", 32).startswith("1705&Riesmeier&Jörg")
    returned = {r["sop_instance_uid"]: r for r in events(stack, Topic.REPORT_RETURNED)}
    assert returned[offis.SOPInstanceUID]["source"] == "structured_report"
    assert returned[offis.SOPInstanceUID]["destination"] == "ris-north"
    assert events(stack, Topic.REPORT_FAILED) == []


def test_unfinished_unsigned_or_unmatched_structured_reports_are_dead_lettered(
    stack: Stack, pipeline: IngestProcess, mllp_peer: MllpPeer, tmp_path: Path
) -> None:
    sent = {
        "not_complete": bundled_file("reportsi.dcm"),  # PARTIAL, UNVERIFIED
        "missing_accession_number": bundled_file("test-SR.dcm"),  # no accession, no patient ID
        "not_verified": make_sr(
            tmp_path / "draft.dcm", findings=["draft"], impression=[], verification="UNVERIFIED"
        ),
    }
    for path in sent.values():
        assert pynetdicom_store(pipeline.dimse_port, path).status == 0
    wait_for("3 dead letters", lambda: len(events(stack, Topic.REPORT_FAILED)) == 3, 120)
    got = {f["sop_instance_uid"]: f["reason"] for f in events(stack, Topic.REPORT_FAILED)}
    assert got == {pydicom.dcmread(p).SOPInstanceUID: reason for reason, p in sent.items()}
    assert mllp_peer.received == []
    assert events(stack, Topic.REPORT_RETURNED) == []


def test_a_second_verified_report_for_an_acknowledged_order_is_sent_as_corrected(
    stack: Stack, pipeline: IngestProcess, mllp_peer: MllpPeer, tmp_path: Path
) -> None:
    first = make_sr(tmp_path / "first.dcm", findings=["First read."], impression=["Normal."])
    study = pydicom.dcmread(first).StudyInstanceUID
    assert pynetdicom_store(pipeline.dimse_port, first).status == 0
    wait_for("the first acknowledged", lambda: len(mllp_peer.received) == 1, 120)
    second = make_sr(
        tmp_path / "second.dcm",
        findings=["Addendum: a 4 mm nodule."],
        impression=["Follow up."],
        study=study,
    )
    assert pynetdicom_store(pipeline.dimse_port, second).status == 0
    wait_for("2 returned", lambda: len(events(stack, Topic.REPORT_RETURNED)) == 2, 120)
    assert [field(m, "OBR", 25) for m in mllp_peer.received] == ["F", "C"]
    assert [r["status"] for r in events(stack, Topic.REPORT_RETURNED)] == ["final", "corrected"]


BEFORE = """\
version: 1
destinations:
  pacs: {url: "http://127.0.0.1:1/dicom-web"}
rules:
  - name: images-to-pacs
    when: {modality: CT}
    route: [pacs]
default: {hold: unrouted}
"""


def test_a_site_newly_routed_in_the_rule_file_gets_structured_reports_without_a_restart(
    stack: Stack,
    start_ingest,
    start_transcode,
    start_router,
    start_report_return,
    mllp_peer: MllpPeer,
    tmp_path: Path,
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(BEFORE)
    sites = write_sites(
        tmp_path / "sites.yaml",
        {"north": {"host": "127.0.0.1", "port": mllp_peer.port, "ack_timeout_s": 5}},
    )
    later = {"wait_ready": False, "wait_port": False}
    ingest = start_ingest(**later)
    started = [
        ingest,
        start_transcode(**later),
        start_router(rules_file=str(rules), reload_interval_s="0.5", **later),
        report_return := start_report_return(
            sites_file=str(sites), rules_file=str(rules), reload_interval_s="0.5", **later
        ),
    ]
    for service in started:
        service.wait_ready()
    rules.write_text(RULES)  # Structured Reports now go to site north
    wait_for(
        "report-return to apply the changed rule file",
        lambda: metric(report_return.url, "radflow_report_return_rules_generation") == 2,
        timeout_s=30,
    )
    wait_for(
        "the router to apply it too",
        lambda: (
            "rules in force" in started[2].log().split("rules_digest")[-1]
            or started[2].log().count('"rules in force"') >= 2
        ),
        timeout_s=30,
    )
    sr = make_sr(tmp_path / "sr.dcm", findings=["No change."], impression=["Stable."])
    assert pynetdicom_store(ingest.dimse_port, sr).status == 0
    wait_for("the report returned", lambda: len(events(stack, Topic.REPORT_RETURNED)) == 1, 120)
    assert len(mllp_peer.received) == 1
