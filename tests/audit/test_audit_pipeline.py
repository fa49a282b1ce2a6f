"""The audit trail through real ingest on the real broker: a C-STORE association, a
refused caller and a refused STOW-RS request end up as DICOM audit messages on
radflow.audit; the received instances' message names their patient by ID (PS3.15
A.5.3), and no message names the patient otherwise."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest

from radflow_core.dicom_status import StoreStatus
from radflow_core.topics import Topic
from radflow_devstack.kit.waiting import wait_for
from support.audit import patient_ids, without_patient_ids
from support.dicom import PHI_ID, PHI_NAME, make_instance, pynetdicom_store
from support.stack import IngestProcess, Stack

pytestmark = pytest.mark.pipeline

STUDY = "1.2.826.0.1.3680043.8.498.17"


def _audit(stack: Stack) -> list[dict]:
    return [event["data"] for event in stack.events(Topic.AUDIT)]


def test_received_instances_and_a_refused_caller_are_audited_naming_the_patient_by_id_only(
    stack: Stack, start_ingest, tmp_path: Path
) -> None:
    ingest: IngestProcess = start_ingest(
        allowed_peers="PYSCU", env={"RADFLOW_AUDIT_TRANSFER_WINDOW_S": "0.3"}
    )
    sent = [
        make_instance(
            tmp_path / f"{n}.dcm", study_instance_uid=STUDY, sop_instance_uid=f"{STUDY}.{n}"
        )
        for n in (1, 2)
    ]
    for path in sent:
        assert pynetdicom_store(ingest.dimse_port, path).status == StoreStatus.SUCCESS
    refused = subprocess.run(
        ["echoscu", "-aet", "INTRUDER", "-aec", "RADFLOW", "127.0.0.1", str(ingest.dimse_port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode != 0
    unauthenticated = httpx.post(
        ingest.stow_url,
        content=b"",
        headers={"Content-Type": 'multipart/related; type="application/dicom"'},
        timeout=10,
    )
    assert unauthenticated.status_code == 401

    def audited() -> list[dict] | None:
        records = _audit(stack)
        ids = {(r["event_id"], r["event_type"]) for r in records}
        wanted = {
            ("110100", "110120"),
            ("110104", None),
            ("110113", "110126"),
            ("110114", "110122"),
        }
        return records if wanted <= ids else None

    records = wait_for(
        "start, transfer and alert on radflow.audit", audited, timeout_s=20, every_s=0.5
    )
    assert all(PHI_NAME not in r["message"] for r in records)
    assert all(PHI_ID not in without_patient_ids(r["message"]) for r in records)

    (transfer,) = [r for r in records if r["event_id"] == "110104"]
    assert transfer["study_instance_uid"] == STUDY and transfer["outcome"] == 0
    message = ET.fromstring(transfer["message"])
    assert message.find("EventIdentification").get("EventActionCode") == "C"
    source = [p for p in message.iter("ActiveParticipant") if p.get("UserID") == "PYSCU"]
    assert source[0].find("RoleIDCode").get("csd-code") == "110153"
    assert source[0].get("NetworkAccessPointID") == "127.0.0.1"
    study = message.find("ParticipantObjectIdentification")
    assert study.get("ParticipantObjectID") == STUDY
    instances = sorted(i.get("UID") for i in study.iter("Instance"))
    assert instances == [f"{STUDY}.1", f"{STUDY}.2"]
    assert patient_ids(message) == [PHI_ID], "the sent Patient ID, once for both"
    for other in records:
        if other["event_id"] != "110104":
            assert patient_ids(other["message"]) == [], other["event_id"]

    (alert,) = [r for r in records if r["event_id"] == "110113"]
    assert alert["outcome"] == 4
    intruder = ET.fromstring(alert["message"]).find("ActiveParticipant")
    assert intruder.get("UserID") == "INTRUDER"
    assert intruder.get("UserIsRequestor") == "true"

    (login,) = [r for r in records if r["event_id"] == "110114"]
    assert login["outcome"] == 4
    assert "stow-rs: HTTP 401" in login["message"]

    ingest.proc.stop()
    stops = [r for r in _audit(stack) if r["event_type"] == "110121"]
    assert len(stops) == 1, "Application Stop written on a graceful stop"
