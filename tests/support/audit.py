"""Reading the audit trail (radflow.audit) in pipeline tests."""

from __future__ import annotations

import xml.etree.ElementTree as ET
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
