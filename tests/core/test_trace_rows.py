"""What ``radflow trace`` makes of single records (no broker): which records name a UID,
what their rows say, and what they never print."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from radflow_core.cli.trace import PENDING, event_of, names, ordered, summary, timings
from radflow_core.events import AuditRecorded, DeadLetter, encode, wrap
from radflow_core.history import HistoryRecord
from radflow_core.settings import KafkaSettings

KAFKA = KafkaSettings.from_env({"RADFLOW_KAFKA_TOPIC_PREFIX": "site1."})
SOP, STUDY = "1.2.840.99.1.7", "1.2.840.99.2"
AT = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def record(topic: str, value: bytes, offset: int = 0) -> HistoryRecord:
    return HistoryRecord(f"site1.{topic}", 0, offset, AT, STUDY, value)


def test_a_uid_is_named_whole_never_as_the_prefix_of_another() -> None:
    assert names(f'"sop_instance_uid":"{SOP}"', SOP)
    assert names(f'<Instance UID="{SOP}"/>', SOP)
    assert not names(f'"{SOP}1"', SOP)
    assert not names(f'"{SOP}.5"', SOP)
    assert not names(f'"9{SOP}"', SOP)


def test_a_dead_letter_is_traced_by_the_record_it_carries_without_printing_it() -> None:
    carried = {
        "type": "dicom.forward.requested",
        "data": {
            "sop_instance_uid": SOP,
            "study_instance_uid": STUDY,
            "destination": "pacs",
            "lane": "stat",
        },
    }
    letter = DeadLetter(
        reason="blob_not_found",
        message="the canonical variant is not in the store",
        retriable=False,
        attempts=1,
        service="stow-forwarder",
        source_topic="site1.dicom.forward.requested.stat",
        source_partition=3,
        source_offset=41,
        original_key=STUDY,
        original_value=json.dumps(carried),
        failed_at=AT,
    )
    row = event_of(
        record("dicom.instance.failed", encode(wrap(letter, "stow-forwarder"))), SOP, KAFKA
    )
    assert row is not None
    assert (row.topic, row.type, row.service) == (
        "dicom.instance.failed",
        "radflow.dead_letter",
        "stow-forwarder",
    )
    assert (row.sop_instance_uid, row.destination, row.lane) == (SOP, "pacs", "stat")
    assert "gave up on site1.dicom.forward.requested.stat@3:41" in row.detail
    assert "reason blob_not_found" in row.detail
    assert "original_value" not in row.detail and "{" not in row.detail


def test_an_audit_message_that_lists_the_instance_is_in_without_its_patient_id() -> None:
    xml = f'<AuditMessage><Instance UID="{SOP}"/><P ParticipantObjectID="PHI-ID-4711"/>'
    audit = AuditRecorded(event_id="110104", outcome=0, study_instance_uid=STUDY, message=xml)
    row = event_of(record("radflow.audit", encode(wrap(audit, "ingest"))), SOP, KAFKA)
    assert row is not None
    assert row.detail == "DICOM Instances Transferred (outcome 0)"
    assert "PHI-ID-4711" not in json.dumps(row.to_json())
    other = AuditRecorded(event_id="110104", outcome=0, study_instance_uid=STUDY, message="<A/>")
    assert event_of(record("radflow.audit", encode(wrap(other, "ingest"))), SOP, KAFKA) is None


def test_a_request_waiting_for_its_study_is_read_from_the_router_s_changelog() -> None:
    entry = {
        "group": "g",
        "level": "study",
        "quiet_seconds": 120,
        "arrived_at": (AT + timedelta(seconds=2)).isoformat(),
        "request": {"sop_instance_uid": SOP, "destination": "night", "lane": "routine"},
        "offset": 5,
    }
    row = event_of(record("radflow.router.pending", json.dumps(entry).encode()), SOP, KAFKA)
    assert row is not None and row.type == PENDING
    assert row.at == AT + timedelta(seconds=2)
    assert row.detail == "waiting for study complete, 120s quiet"
    tombstone = record("radflow.router.pending", b"")
    assert event_of(tombstone, SOP, KAFKA) is None


def test_hops_are_per_instance_and_the_summary_counts_instances_per_stage() -> None:
    def event(offset: int, sop: str, kind: str, seconds: float, destination: str | None = None):
        data = {"sop_instance_uid": sop, "study_instance_uid": STUDY, "destination": destination}
        envelope = {
            "type": kind,
            "time": (AT + timedelta(seconds=seconds)).isoformat(),
            "data": data,
        }
        row = event_of(record("x", json.dumps(envelope).encode(), offset), STUDY, KAFKA)
        assert row is not None
        return row

    rows = ordered(
        [
            event(0, "1.1", "dicom.instance.received", 0),
            event(1, "1.2", "dicom.instance.received", 1),
            event(2, "1.1", "dicom.forward.completed", 5, "pacs"),
            event(3, "1.1", "dicom.forward.requested", 3, "pacs"),
        ]
    )
    timed = timings(rows)
    assert [(t.event.sop_instance_uid, t.since_first_s, t.hop_s) for t in timed] == [
        ("1.1", 0.0, None),
        ("1.2", 1.0, None),
        ("1.1", 3.0, 3.0),
        ("1.1", 5.0, 2.0),
    ]
    assert summary(rows) == {"*": {"received": 2}, "pacs": {"completed": 1, "requested": 1}}
