"""DICOM audit messages (PS3.15 Annex A.5, the schema derived from RFC 3881) as XML.

Pure data and one serializer, no I/O: :mod:`radflow_core.audit` decides when a message
is due and where it goes. The codes are the standard's (DCM, A.5.3 and PS3.16 CID
400-405) and RFC 3881's; the element and attribute names follow the schema of A.5.1
(``tests/audit/dicom-audit-message.rng`` validates every kind of message we write).
"""

from __future__ import annotations

import ipaddress
import re
import xml.etree.ElementTree as ET
from base64 import b64encode
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum, StrEnum


@dataclass(frozen=True)
class Code:
    """A coded value: ``csd-code``, ``codeSystemName`` and ``originalText`` (the code
    meaning, which the schema requires)."""

    code: str
    system: str
    meaning: str


class Codes:
    """The codes radflow's audit messages use."""

    # EventID (PS3.16 CID 400)
    APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
    INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
    EXPORT = Code("110106", "DCM", "Export")
    SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
    USER_AUTHENTICATION = Code("110114", "DCM", "User Authentication")
    # EventTypeCode (CID 401 application activity, 403 security alert, 455 authentication)
    APPLICATION_START = Code("110120", "DCM", "Application Start")
    APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
    LOGIN = Code("110122", "DCM", "Login")
    NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
    NETWORK_CONFIGURATION = Code("110128", "DCM", "Network Configuration")
    SOFTWARE_CONFIGURATION = Code("110131", "DCM", "Software Configuration")
    # RoleIDCode (CID 402)
    APPLICATION = Code("110150", "DCM", "Application")
    DESTINATION = Code("110152", "DCM", "Destination Role ID")
    SOURCE = Code("110153", "DCM", "Source Role ID")
    # ParticipantObjectIDTypeCode (CID 404, RFC 3881)
    STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
    PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
    REPORT_NUMBER = Code("9", "RFC-3881", "Report Number")
    URI = Code("12", "RFC-3881", "URI")


class Action(StrEnum):
    """EventActionCode."""

    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


class Outcome(IntEnum):
    """EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


class ObjectType(StrEnum):
    """ParticipantObjectTypeCode."""

    PERSON = "1"
    SYSTEM_OBJECT = "2"
    ORGANIZATION = "3"
    OTHER = "4"


class ObjectRole(StrEnum):
    """ParticipantObjectTypeCodeRole (the ones we use)."""

    PATIENT = "1"
    REPORT = "3"
    MASTER_FILE = "5"
    SECURITY_RESOURCE = "13"


@dataclass(frozen=True)
class ActiveParticipant:
    """A user or process that took part: the sender, the receiver, the application."""

    user_id: str
    """An AE title, a service name, an authenticated identity or the peer's address."""
    requestor: bool
    """UserIsRequestor: this participant started the event."""
    role: Code | None = None
    alternative_user_id: str | None = None
    user_name: str | None = None
    address: str | None = None
    """NetworkAccessPointID: an IP address or a host name."""


@dataclass(frozen=True)
class ParticipantObject:
    """What the event was about: a patient, a study, a report, a configuration file."""

    object_id: str
    id_type: Code
    type_code: ObjectType
    role: ObjectRole | None = None
    name: str | None = None
    details: Sequence[tuple[str, bytes]] = ()
    """ParticipantObjectDetail (type, value); values are base64 in the XML."""
    sop_classes: Mapping[str, Sequence[str]] = field(default_factory=dict)
    """SOP Class UID → SOP Instance UIDs, for a study (ParticipantObjectDescription)."""
    anonymized: bool = False
    """The instances were de-identified before they left (``Anonymized`` true in the
    ParticipantObjectDescription)."""


@dataclass(frozen=True)
class AuditSource:
    """AuditSourceIdentification: which deployment and process reported the event."""

    source_id: str
    site_id: str | None = None
    type_code: str = "4"
    """Application server process tier in a multi-tier system."""


@dataclass(frozen=True)
class AuditRecord:
    """One audit message, before it is written as XML."""

    event: Code
    action: Action
    outcome: Outcome
    at: datetime
    """EventDateTime, timezone-aware."""
    participants: Sequence[ActiveParticipant]
    objects: Sequence[ParticipantObject] = ()
    event_types: Sequence[Code] = ()
    description: str | None = None
    """EventOutcomeDescription: why it failed, in radflow's words (never partner text
    that might carry patient data)."""

    def to_xml(self, source: AuditSource) -> bytes:
        """The ``AuditMessage`` document, UTF-8, with its XML declaration."""
        root = ET.Element("AuditMessage")
        event = ET.SubElement(
            root,
            "EventIdentification",
            EventActionCode=self.action.value,
            EventDateTime=self.at.isoformat(timespec="milliseconds"),
            EventOutcomeIndicator=str(int(self.outcome)),
        )
        _code(event, "EventID", self.event)
        for event_type in self.event_types:
            _code(event, "EventTypeCode", event_type)
        if self.description:
            ET.SubElement(event, "EventOutcomeDescription").text = self.description
        for participant in self.participants:
            _participant(root, participant)
        source_element = ET.SubElement(root, "AuditSourceIdentification")
        if source.site_id:
            source_element.set("AuditEnterpriseSiteID", source.site_id)
        source_element.set("AuditSourceID", source.source_id)
        ET.SubElement(source_element, "AuditSourceTypeCode", {"csd-code": source.type_code})
        for obj in self.objects:
            _object(root, obj)
        for element in root.iter():
            element.attrib = {name: _xml_chars(value) for name, value in element.attrib.items()}
            if element.text:
                element.text = _xml_chars(element.text)
        document: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
        return document


def _code(parent: ET.Element, tag: str, code: Code) -> None:
    ET.SubElement(
        parent,
        tag,
        {"csd-code": code.code, "codeSystemName": code.system, "originalText": code.meaning},
    )


def _participant(root: ET.Element, p: ActiveParticipant) -> None:
    element = ET.SubElement(root, "ActiveParticipant", UserID=p.user_id)
    if p.alternative_user_id:
        element.set("AlternativeUserID", p.alternative_user_id)
    if p.user_name:
        element.set("UserName", p.user_name)
    element.set("UserIsRequestor", "true" if p.requestor else "false")
    if p.address:
        element.set("NetworkAccessPointID", p.address)
        element.set("NetworkAccessPointTypeCode", "2" if _is_ip(p.address) else "1")
    if p.role is not None:
        _code(element, "RoleIDCode", p.role)


def _object(root: ET.Element, o: ParticipantObject) -> None:
    element = ET.SubElement(
        root,
        "ParticipantObjectIdentification",
        ParticipantObjectID=o.object_id,
        ParticipantObjectTypeCode=o.type_code.value,
    )
    if o.role is not None:
        element.set("ParticipantObjectTypeCodeRole", o.role.value)
    _code(element, "ParticipantObjectIDTypeCode", o.id_type)
    if o.name:
        ET.SubElement(element, "ParticipantObjectName").text = o.name
    for kind, value in o.details:
        ET.SubElement(
            element, "ParticipantObjectDetail", type=kind, value=b64encode(value).decode("ascii")
        )
    if o.sop_classes:
        description = ET.SubElement(element, "ParticipantObjectDescription")
        for sop_class, instances in o.sop_classes.items():
            sop = ET.SubElement(
                description, "SOPClass", UID=sop_class, NumberOfInstances=str(len(instances))
            )
            for uid in instances:
                ET.SubElement(sop, "Instance", UID=uid)
        if o.anonymized:
            ET.SubElement(description, "Anonymized").text = "true"


_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_chars(text: str) -> str:
    """``text`` without the characters XML 1.0 cannot carry (a peer's claimed name may
    hold anything), each replaced by U+FFFD, so the message always parses."""
    return _NOT_XML.sub("\ufffd", text)


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True
