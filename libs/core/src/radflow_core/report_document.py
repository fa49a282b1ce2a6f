"""The report document: what a ``reports.finalized`` event's claim check points at.

A reporting platform writes one JSON document per signed report version into the blob
store and announces it on ``reports.finalized`` (with its sha256), just as ingest does
for images: patient and order identifiers and the report's text are PHI and never
travel in an event. Report-return builds the same document from a DICOM Structured
Report, so both inputs become one HL7 message the same way. The JSON Schema is
published as ``docs/events/radflow.report.v1.schema.json``.
"""

from __future__ import annotations

from datetime import date
from typing import ClassVar, Literal

from pydantic import AwareDatetime, Field

from radflow_core.events import EventModel
from radflow_core.uids import Uid


class CodedConcept(EventModel):
    """A code from a coding scheme, as HL7 CE/CWE carries it (code^text^system)."""

    code: str = ""
    """The code value (may be empty when only a text is known)."""
    meaning: str
    """Its human-readable text."""
    scheme: str = ""
    """The coding system, e.g. LN (LOINC), DCM, SCT, or a local designator."""


class PersonName(EventModel):
    """A person's name in parts, as HL7 XPN/XCN and DICOM PN carry it."""

    family: str = ""
    """Family name."""
    given: str = ""
    """Given name."""
    middle: str = ""
    """Middle names or initials."""
    prefix: str = ""
    """E.g. Dr."""
    suffix: str = ""
    """E.g. Jr."""


class PatientIdentifier(EventModel):
    """One identifier of the patient (a medical record number, a national id...)."""

    id: str = Field(min_length=1, max_length=64)
    """The identifier."""
    assigning_authority: str | None = None
    """Who issued it (HL7 CX-4), e.g. the hospital's MRN namespace."""
    type_code: str | None = None
    """HL7 identifier type (CX-5), e.g. MR, PI, NI."""


class Patient(EventModel):
    """Who the report is about, as the ordering site knows the patient."""

    identifiers: tuple[PatientIdentifier, ...] = Field(min_length=1)
    """At least one; the site's settings choose which goes to PID-3."""
    name: PersonName | None = None
    """PID-5."""
    birth_date: date | None = None
    """PID-7."""
    sex: Literal["F", "M", "O", "U", "A", "N"] | None = None
    """PID-8 (HL7 table 0001)."""


class Radiologist(EventModel):
    """The radiologist who read and signed the report."""

    id: str | None = None
    """Their identifier at the site, e.g. a provider number."""
    name: PersonName
    """Their name."""


class ReportSection(EventModel):
    """One part of the report's text: findings, impression, a free-text block..."""

    heading: str | None = None
    """The section's title as the radiologist sees it (OBX-3 text)."""
    code: CodedConcept | None = None
    """What the section is, coded (OBX-3), e.g. LOINC 18782-3 findings."""
    text: str
    """The text; lines are separated by line breaks (LF, CR LF or CR)."""


class ReportDocument(EventModel):
    """``radflow.report`` v1: one signed version of a radiology report, as returned to
    the ordering site's RIS. Stored in the blob store (it is PHI), never in an event."""

    type_name: ClassVar[str] = "radflow.report"
    version: ClassVar[int] = 1

    accession_number: str = Field(min_length=1, max_length=64)
    """The order's accession number (required: the RIS matches the report with it)."""
    placer_order_number: str | None = None
    """The order number of the ordering system (ORC-2/OBR-2 by default)."""
    filler_order_number: str | None = None
    """The order number of the performing system (ORC-3/OBR-3 by default)."""
    study_instance_uid: Uid
    """(0020,000D) of the reported study."""
    visit_number: str | None = Field(default=None, min_length=1, max_length=64)
    """The patient's visit (encounter) number at the site, HL7 PV1-19: the FHIR
    DiagnosticReport's encounter is referred to by it. Optional."""
    procedure: CodedConcept | None = None
    """The reported procedure (OBR-4), e.g. a CPT or local code with its text."""
    patient: Patient
    """The patient, with at least one identifier."""
    sections: tuple[ReportSection, ...] = Field(min_length=1)
    """The report's text, in order; at least one section."""
    impression: str | None = None
    """The conclusion, if the platform keeps it apart from the sections: sent after them
    as its own observation (LOINC 19005-8, "Impression")."""
    radiologist: Radiologist
    """Who read and signed it (OBR-32, OBX-16)."""
    observed_at: AwareDatetime | None = None
    """When the study was performed (OBR-7)."""
    signed_at: AwareDatetime
    """When the radiologist signed this version (OBR-22, OBX-14)."""
