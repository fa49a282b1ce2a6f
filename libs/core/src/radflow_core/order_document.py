"""The order document: what a ``worklist.items`` event's claim check points at.

An order carries the patient's name, identifiers and birth date and the accession
number, none of which may travel in an event. The worklist service writes one JSON
document per scheduled procedure step into the blob store and announces the step on
``worklist.items`` with the document's sha256, as ingest does for images and the
reporting platform for reports. The Modality Worklist answers are built from it. The
JSON Schema is published as ``docs/events/radflow.order.v1.schema.json``.
"""

from __future__ import annotations

from datetime import date, time
from typing import ClassVar, Literal

from pydantic import AwareDatetime, Field

from radflow_core.events import EventModel, OrderPriority, SiteName
from radflow_core.report_document import CodedConcept, Patient, PersonName
from radflow_core.uids import Uid


class ScheduledStep(EventModel):
    """One scheduled procedure step (DICOM Scheduled Procedure Step Sequence item)."""

    step_id: str = Field(min_length=1, max_length=16)
    """(0040,0009) Scheduled Procedure Step ID (OBR-20 / IPC-4; 1, 2, ... when absent)."""
    start_date: date
    """(0040,0002) start date, in the site's local time as the order gives it."""
    start_time: time | None = None
    """(0040,0003) start time, local; None when the order gives a date only."""
    modality: str | None = Field(default=None, max_length=16)
    """(0008,0060) OBR-24 / IPC-5."""
    station_ae: str | None = Field(default=None, max_length=16)
    """(0040,0001) Scheduled Station AE Title: OBR-21 / IPC-9."""
    station_name: str | None = Field(default=None, max_length=16)
    """(0040,0010) Scheduled Station Name: IPC-7."""
    location: str | None = Field(default=None, max_length=16)
    """(0040,0011) Scheduled Procedure Step Location: IPC-8, else PV1-3.1."""
    description: str | None = Field(default=None, max_length=64)
    """(0040,0007) Scheduled Procedure Step Description: OBR-4 text."""
    protocol: CodedConcept | None = None
    """(0040,0008) Scheduled Protocol Code Sequence: IPC-6 (OMI only)."""
    performing_physician: PersonName | None = None
    """(0040,0006) Scheduled Performing Physician's Name: OBR-34 (technician)."""
    status: Literal["SCHEDULED", "STARTED"] = "SCHEDULED"
    """(0040,0020) Scheduled Procedure Step Status: STARTED after an ORC-5 IP."""


class OrderDocument(EventModel):
    """``radflow.order`` v1: one scheduled procedure step of an imaging order as the
    site's RIS sent it, for the Modality Worklist. Stored in the blob store (it is
    PHI), never in an event; ``worklist.items`` points at it."""

    type_name: ClassVar[str] = "radflow.order"
    version: ClassVar[int] = 1

    site: SiteName
    """The ordering site (from MSH-3/MSH-4 through the worklist's sites file)."""
    accession_number: str = Field(min_length=1, max_length=16)
    """(0008,0050) OBR-18 / IPC-1.1."""
    accession_issuer: str | None = Field(default=None, max_length=64)
    """(0008,0051) Issuer of Accession Number, local namespace: the site's configured
    issuer, else IPC-1.2. With the accession number it makes the order reference."""
    placer_order_number: str | None = Field(default=None, max_length=64)
    """ORC-2 (else OBR-2): the ordering system's number; (0040,2016)."""
    filler_order_number: str | None = Field(default=None, max_length=64)
    """ORC-3 (else OBR-3): the RIS's number; (0040,2017)."""
    requested_procedure_id: str = Field(min_length=1, max_length=16)
    """(0040,1001) OBR-19 / IPC-2; the accession number when absent."""
    requested_procedure: CodedConcept | None = None
    """(0032,1064) Requested Procedure Code Sequence and (0032,1060) its description:
    OBR-44 when present, else OBR-4."""
    study_instance_uid: Uid
    """(0020,000D) ZDS-1 / IPC-3; else derived from the order reference (2.25 form), so
    every query and every replay gives the modality the same UID."""
    priority: OrderPriority = OrderPriority.ROUTINE
    """(0040,1003) Requested Procedure Priority: TQ1-9 / ORC-7.6 / OBR-27.6."""
    patient: Patient
    """PID-3 (the first identifier is (0010,0020) with its issuer), PID-5, PID-7, PID-8."""
    referring_physician: PersonName | None = None
    """(0008,0090) Referring Physician's Name: ORC-12, else OBR-16."""
    reason: str | None = Field(default=None, max_length=64)
    """(0040,1002) Reason for the Requested Procedure: OBR-31 text."""
    step: ScheduledStep
    """The scheduled procedure step."""
    character_set: str = "ISO_IR 192"
    """The site's DICOM Specific Character Set (0008,0005) the answers use."""
    received_at: AwareDatetime
    """When the worklist accepted this version of the order (UTC)."""
