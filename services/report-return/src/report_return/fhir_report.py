"""The FHIR R4 DiagnosticReport a report becomes (the profile: docs/fhir-interface.md).

Built from the same report document as the ORU^R01, and validated before it is sent
against the FHIR models of ``fhir.resources`` (its R4B package: R4B changed nothing in
DiagnosticReport or the data types used here from R4 4.0.1, and the library no longer
ships a separate R4 package). A resource that does not validate is never sent: the
report goes to report.failed as ``fhir_invalid_resource`` with the failing elements
named (never their values).

Subject, encounter, performer and the imaging study are logical references (by
identifier), so the EHR resolves them against its own records: report-return neither
reads nor creates Patient or Encounter resources.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from pydantic import ValidationError

from radflow_core.errors import PipelineError
from radflow_core.events import ReportStatus
from radflow_core.report_document import CodedConcept, PersonName, ReportDocument
from report_return.hl7 import lines, patient_identifier
from report_return.sites import FhirEndpoint, Site

LOINC = "http://loinc.org"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
DICOM_UID = "urn:dicom:uid"
VERSION_TAG_SYSTEM = "urn:radflow:report-version"
"""meta.tag system carrying the platform's report version (the server's versionId is
its own count)."""
REPORT_CODE = {"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}
CATEGORY = {"system": V2_0074, "code": "RAD", "display": "Radiology"}
CONTENT_TYPE = "text/plain; charset=utf-8"
SCHEMES = {
    "LN": LOINC,
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
}
"""Coding scheme designators (HL7 v2 / DICOM) with a FHIR system URI."""
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$")


class FhirInvalidResource(PipelineError):
    """The DiagnosticReport built from the report does not validate against FHIR R4:
    retrying cannot fix it; the report document (or the site's settings) must change."""

    reason = "fhir_invalid_resource"


@dataclass(frozen=True)
class BuiltReport:
    """A validated DiagnosticReport and what the request that carries it needs."""

    body: bytes
    """The resource as JSON (application/fhir+json), as validated."""
    status: str
    """DiagnosticReport.status sent."""
    identifier_system: str
    identifier_value: str
    """The report's identifier: the key of the conditional create and update."""

    @property
    def search(self) -> str:
        """``identifier=system|value`` with FHIR search escaping (``\\`` ``|`` ``,`` ``$``)."""

        def esc(text: str) -> str:
            for char in ("\\", "|", ",", "$"):
                text = text.replace(char, "\\" + char)
            return text

        return f"identifier={esc(self.identifier_system)}|{esc(self.identifier_value)}"


def fhir_status(status: ReportStatus, endpoint: FhirEndpoint) -> str:
    """DiagnosticReport.status (value set diagnostic-report-status)."""
    if status is ReportStatus.CORRECTED:
        return endpoint.correction_status.value
    return status.value


def authority_system(authority: str | None) -> str | None:
    """An identifier system from an HL7 assigning authority: an OID as ``urn:oid:``,
    a URI as it is, anything else (a local namespace) none."""
    if not authority:
        return None
    if _OID.match(authority):
        return f"urn:oid:{authority}"
    if _URI.match(authority):
        return authority
    return None


def _display(name: PersonName) -> str:
    return " ".join(
        p for p in (name.prefix, name.given, name.middle, name.family, name.suffix) if p
    )


def _coding(concept: CodedConcept) -> dict[str, Any]:
    coding: dict[str, Any] = {"display": concept.meaning}
    if concept.code:
        coding["code"] = concept.code
    system = SCHEMES.get(concept.scheme) or authority_system(concept.scheme)
    if system:
        coding["system"] = system
    return coding


def report_text(document: ReportDocument) -> str:
    """The report as plain text: each section under its heading, the impression last,
    lines ended by LF."""
    parts = []
    for section in document.sections:
        body = "\n".join(lines(section.text))
        heading = section.heading or (section.code.meaning if section.code else None)
        parts.append(f"{heading}:\n{body}" if heading else body)
    if document.impression and document.impression.strip():
        parts.append("Impression:\n" + "\n".join(lines(document.impression)))
    return "\n\n".join(parts) + "\n"


def report_identifier(site: Site, report_id: str, structured: bool) -> tuple[str, str]:
    """(system, value) of the report: a Structured Report's SOP Instance UID as a
    DICOM UID, otherwise the platform's report id under the site's system."""
    assert site.fhir is not None
    if structured:
        return DICOM_UID, f"urn:oid:{report_id}"
    return site.fhir.report_identifier_system, report_id


def build_diagnostic_report(
    document: ReportDocument,
    status: ReportStatus,
    site: Site,
    *,
    report_id: str,
    report_version: int | None,
    structured: bool = False,
) -> BuiltReport:
    """The validated DiagnosticReport of one report version for ``site``.

    Raises:
        MissingPatientIdentifier: no identifier from the authority the site expects.
        FhirInvalidResource: the resource does not validate (elements named, no values).
    """
    endpoint = site.fhir
    assert endpoint is not None
    system, value = report_identifier(site, report_id, structured)
    chosen = patient_identifier(document, site)
    patient: dict[str, Any] = {
        "use": "usual",
        "type": {"coding": [{"system": V2_0203, "code": chosen.type_code}]},
        "value": chosen.id,
    }
    patient_system = endpoint.patient_identifier_system or authority_system(chosen.authority)
    if patient_system:
        patient["system"] = patient_system
    elif chosen.authority:
        patient["assigner"] = {"display": chosen.authority}
    code: dict[str, Any] = {"coding": [dict(REPORT_CODE)]}
    if document.procedure is not None:
        code["coding"].append(_coding(document.procedure))
        code["text"] = document.procedure.meaning
    interpreter: dict[str, Any] = {
        "type": "Practitioner",
        "display": _display(document.radiologist.name) or None,
    }
    if document.radiologist.id:
        interpreter["identifier"] = {"value": document.radiologist.id}
        if endpoint.performer_identifier_system:
            interpreter["identifier"]["system"] = endpoint.performer_identifier_system
    text = report_text(document)
    resource: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"use": "official", "system": system, "value": value}],
        "basedOn": [
            {
                "type": "ServiceRequest",
                "identifier": {
                    "type": {"coding": [{"system": V2_0203, "code": "ACSN"}]},
                    "value": document.accession_number,
                },
            }
        ],
        "status": fhir_status(status, endpoint),
        "category": [{"coding": [dict(CATEGORY)]}],
        "code": code,
        "subject": {"type": "Patient", "identifier": patient},
        "issued": document.signed_at.isoformat(),
        "performer": [interpreter],
        "resultsInterpreter": [interpreter],
        "imagingStudy": [
            {
                "type": "ImagingStudy",
                "identifier": {
                    "system": DICOM_UID,
                    "value": f"urn:oid:{document.study_instance_uid}",
                },
            }
        ],
        "presentedForm": [
            {
                "contentType": CONTENT_TYPE,
                "data": base64.b64encode(text.encode("utf-8")).decode("ascii"),
                "title": "Radiology report",
                "creation": document.signed_at.isoformat(),
            }
        ],
    }
    if report_version is not None:
        resource["meta"] = {"tag": [{"system": VERSION_TAG_SYSTEM, "code": str(report_version)}]}
    if document.visit_number:
        visit: dict[str, Any] = {
            "type": {"coding": [{"system": V2_0203, "code": "VN"}]},
            "value": document.visit_number,
        }
        if endpoint.encounter_identifier_system:
            visit["system"] = endpoint.encounter_identifier_system
        resource["encounter"] = {"type": "Encounter", "identifier": visit}
    if document.observed_at is not None:
        resource["effectiveDateTime"] = document.observed_at.isoformat()
    if document.impression and document.impression.strip():
        resource["conclusion"] = "\n".join(lines(document.impression.strip()))
    body = validate(resource)
    return BuiltReport(body, resource["status"], system, value)


def validate(resource: dict[str, Any]) -> bytes:
    """The resource as JSON, once it validates against the R4(B) DiagnosticReport.

    Raises:
        FhirInvalidResource: naming each failing element (FHIRPath-like) and why.
    """
    try:
        model = DiagnosticReport.model_validate(resource)
    except ValidationError as exc:
        problems = sorted({f"{_path(error['loc'])} ({error['type']})" for error in exc.errors()})
        raise FhirInvalidResource(
            "the DiagnosticReport built does not validate against FHIR R4: " + "; ".join(problems)
        ) from None
    return model.model_dump_json(exclude_none=True).encode("utf-8")


def _path(loc: tuple[int | str, ...]) -> str:
    out = "DiagnosticReport"
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


REDACTED = "[redacted]"


def redactor(document: ReportDocument) -> Callable[[str], str]:
    """A function that replaces, in a FHIR server's free text, every value of the
    report that is patient data: name parts, identifiers, birth date (in the usual
    spellings), order and visit numbers, and each line of the report's text. Servers
    quote the resource they refuse; what they quote must not reach an event or a log."""
    values: set[str] = set()
    patient = document.patient
    if patient.name is not None:
        name = patient.name
        values.update(p for p in (name.family, name.given, name.middle) if len(p) >= 2)
    values.update(i.id for i in patient.identifiers)
    if patient.birth_date is not None:
        day = patient.birth_date
        values.update(
            {
                day.isoformat(),
                day.strftime("%Y%m%d"),
                day.strftime("%d.%m.%Y"),
                day.strftime("%m/%d/%Y"),
                day.strftime("%d/%m/%Y"),
            }
        )
    values.update(
        v
        for v in (
            document.accession_number,
            document.placer_order_number,
            document.filler_order_number,
            document.visit_number,
        )
        if v
    )
    texts = [s.text for s in document.sections] + [document.impression or ""]
    values.update(line.strip() for text in texts for line in lines(text) if len(line.strip()) >= 6)
    if not values:
        return lambda text: text
    pattern = re.compile(
        "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True)), re.IGNORECASE
    )
    control = re.compile(r"[\x00-\x1f\x7f]+")

    def redact(text: str) -> str:
        return control.sub(" ", pattern.sub(REDACTED, text))

    return redact
