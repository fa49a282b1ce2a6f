"""Reading the audit trail (radflow.audit) in pipeline tests."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Collection
from typing import Any

from radflow_core.topics import Topic
from support.stack import Stack


def audit_records(stack: Stack, event_id: str | None = None) -> list[dict[str, Any]]:
    """The ``data`` of every radflow.audit event (of ``event_id``, if given)."""
    records = [event["data"] for event in stack.events(Topic.AUDIT)]
    return [r for r in records if event_id is None or r["event_id"] == event_id]


def participant_ids(record: dict[str, Any]) -> set[str]:
    """The UserIDs of a record's active participants."""
    return {p.get("UserID", "") for p in ET.fromstring(record["message"]).iter("ActiveParticipant")}


def is_patient(obj: Any) -> bool:
    """A patient participant object of PS3.15 A.5.3: Person, role Patient, ID type
    RFC-3881 "2" Patient Number."""
    id_type = obj.find("ParticipantObjectIDTypeCode")
    return (
        obj.get("ParticipantObjectTypeCode") == "1"
        and obj.get("ParticipantObjectTypeCodeRole") == "1"
        and id_type is not None
        and id_type.get("csd-code") == "2"
        and id_type.get("codeSystemName") == "RFC-3881"
    )


def patient_ids(message: Any) -> list[str]:
    """The ParticipantObjectIDs of a message's patient objects (``message``: its text,
    or a parsed ElementTree or lxml element)."""
    root = ET.fromstring(message) if isinstance(message, str | bytes) else message
    return [
        o.get("ParticipantObjectID", "")
        for o in root.iter("ParticipantObjectIdentification")
        if is_patient(o)
    ]


def without_patient_ids(message: str, only: Collection[str] | None = None) -> str:
    """The message with its patient objects' ParticipantObjectIDs (those in ``only``,
    if given) taken out: what is left must name no patient."""
    root = ET.fromstring(message)
    for obj in root.iter("ParticipantObjectIdentification"):
        if is_patient(obj) and (only is None or obj.get("ParticipantObjectID") in only):
            del obj.attrib["ParticipantObjectID"]
    return ET.tostring(root, encoding="unicode")
