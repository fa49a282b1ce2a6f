"""A DICOM Structured Report as a report document: its text content, verifying observer,
and the study, order and patient it refers to.

Only a document the radiologist finished and signed is returned: Completion Flag
COMPLETE and Verification Flag VERIFIED. The content tree becomes sections:

- the root container's concept name heads the first section; each named container
  inside starts a new section headed by its concept name (its code goes to OBX-3);
- TEXT items give their text, CODE items ``Name: Meaning``, NUM items ``Name: value unit``,
  each on its own line, followed by what their children say (modifiers, inferred-from
  text, also under IMAGE items); in a CONTINUOUS container the items form one paragraph
  (joined by spaces, CODE and NUM without their concept names, children left out);
- items that only give context (HAS OBS CONTEXT, HAS ACQ CONTEXT) and references
  (IMAGE, COMPOSITE, WAVEFORM, SCOORD, TCOORD, UIDREF) are left out.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from radflow_core.report_document import ReportDocument
from report_return.report import NotComplete, NotVerified, UnreadableReport, document_from

CONTEXT = frozenset({"HAS OBS CONTEXT", "HAS ACQ CONTEXT"})


@dataclass
class _Section:
    heading: str | None
    code: dict[str, str] | None
    lines: list[str] = field(default_factory=list)


def _text(value: Any) -> str:
    """A DICOM string value as text (multi-valued text joined back with backslashes)."""
    if value is None:
        return ""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return "\\".join(str(v) for v in value)
    return str(value)


def _code(item: Dataset, keyword: str) -> dict[str, str] | None:
    sequence = item.get(keyword)
    if not sequence:
        return None
    code = sequence[0]
    return {
        "code": _text(
            code.get("CodeValue") or code.get("LongCodeValue") or code.get("URNCodeValue")
        ),
        "meaning": _text(code.get("CodeMeaning")),
        "scheme": _text(code.get("CodingSchemeDesignator")),
    }


def _name(item: Dataset) -> str:
    code = _code(item, "ConceptNameCodeSequence")
    return code["meaning"] if code else ""


def _value(item: Dataset, continuous: bool) -> str | None:
    """One content item as text, or None for items that carry no report text."""
    kind = item.get("ValueType")
    name = _name(item)
    if kind == "TEXT":
        return _text(item.get("TextValue"))
    if kind == "CODE":
        concept = _code(item, "ConceptCodeSequence")
        meaning = concept["meaning"] if concept else ""
        return meaning if continuous or not name else f"{name}: {meaning}"
    if kind == "NUM":
        measured = item.get("MeasuredValueSequence")
        if not measured:
            return None
        unit = _code(measured[0], "MeasurementUnitsCodeSequence")
        value = f"{_text(measured[0].get('NumericValue'))} {unit['code'] if unit else ''}".strip()
        return value if continuous or not name else f"{name}: {value}"
    return None


class _Walker:
    def __init__(self, root: Dataset) -> None:
        self.sections = [_Section(_name(root) or None, _code(root, "ConceptNameCodeSequence"))]
        self.walk(root, continuous=root.get("ContinuityOfContent") == "CONTINUOUS")

    def walk(self, container: Dataset, continuous: bool) -> None:
        words: list[str] = []
        for item in container.get("ContentSequence") or []:
            if item.get("RelationshipType") in CONTEXT:
                continue
            if item.get("ValueType") == "CONTAINER":
                inner = item.get("ContinuityOfContent") == "CONTINUOUS"
                if _name(item):
                    self.flush(words)
                    code = _code(item, "ConceptNameCodeSequence")
                    self.sections.append(_Section(_name(item), code))
                    self.walk(item, inner)
                else:
                    self.flush(words)
                    self.walk(item, inner)
                continue
            text = _value(item, continuous)
            if continuous:
                if text is not None:
                    words.append(text)
                continue
            if text is not None:
                self.sections[-1].lines.append(text)
            self.walk(item, continuous=False)
        self.flush(words)

    def flush(self, words: list[str]) -> None:
        if words:
            self.sections[-1].lines.append(" ".join(words))
            words.clear()


_DT = re.compile(r"^(\d{8,14})(?:\.\d{1,6})?([+-]\d{4})?$")


def _datetime(value: str, offset: str | None) -> datetime | None:
    """A DICOM DT (or DA and TM joined) as an aware datetime: its own UTC offset, else
    Timezone Offset From UTC, else UTC."""
    match = _DT.match(value.strip())
    if not match:
        return None
    digits, own = match.groups()
    zone = UTC
    shift = own or offset
    if shift and re.fullmatch(r"[+-]\d{4}", shift):
        minutes = int(shift[1:3]) * 60 + int(shift[3:5])
        zone = timezone(timedelta(minutes=minutes if shift[0] == "+" else -minutes))
    try:
        parsed = datetime.strptime(digits.ljust(14, "0"), "%Y%m%d%H%M%S")
    except ValueError:
        return None
    return parsed.replace(tzinfo=zone)


def _person(name: Any) -> dict[str, str]:
    person = pydicom.valuerep.PersonName(_text(name))
    return {
        "family": person.family_name,
        "given": person.given_name,
        "middle": person.middle_name,
        "prefix": person.name_prefix,
        "suffix": person.name_suffix,
    }


def _patient(ds: Dataset) -> dict[str, Any]:
    identifiers = []
    if _text(ds.get("PatientID")).strip():
        identifiers.append(
            {
                "id": _text(ds.PatientID).strip(),
                "assigning_authority": _text(ds.get("IssuerOfPatientID")).strip() or None,
            }
        )
    for other in ds.get("OtherPatientIDsSequence") or []:
        if _text(other.get("PatientID")).strip():
            identifiers.append(
                {
                    "id": _text(other.PatientID).strip(),
                    "assigning_authority": _text(other.get("IssuerOfPatientID")).strip() or None,
                }
            )
    patient: dict[str, Any] = {"identifiers": identifiers}
    if _text(ds.get("PatientName")).strip():
        patient["name"] = _person(ds.PatientName)
    birth = _text(ds.get("PatientBirthDate")).strip()
    if len(birth) == 8 and birth.isdigit():
        patient["birth_date"] = f"{birth[:4]}-{birth[4:6]}-{birth[6:]}"
    if _text(ds.get("PatientSex")) in ("M", "F", "O"):
        patient["sex"] = _text(ds.PatientSex)
    return patient


def document_from_sr(data: bytes) -> ReportDocument:
    """The report document of a Structured Report's Part 10 bytes.

    Raises:
        UnreadableReport: not DICOM, or no SR content tree.
        NotComplete, NotVerified: the document is not finished and signed.
        MissingAccessionNumber, MissingPatientIdentifier, EmptyReport, ReportError.
    """
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.decode()
    except (InvalidDicomError, ValueError, TypeError, KeyError, EOFError, OSError) as exc:
        raise UnreadableReport(f"not a readable DICOM file ({type(exc).__name__})") from None
    if ds.get("ValueType") != "CONTAINER" or "ContentSequence" not in ds:
        raise UnreadableReport("not a Structured Report (no content tree)")
    if ds.get("CompletionFlag") != "COMPLETE":
        raise NotComplete(f"Completion Flag is {ds.get('CompletionFlag')!r}, not COMPLETE")
    if ds.get("VerificationFlag") != "VERIFIED":
        raise NotVerified(f"Verification Flag is {ds.get('VerificationFlag')!r}, not VERIFIED")
    request = (ds.get("ReferencedRequestSequence") or [Dataset()])[0]
    offset = _text(ds.get("TimezoneOffsetFromUTC")) or None
    observers = ds.get("VerifyingObserverSequence") or [Dataset()]
    observer = observers[0]
    observer_code = _code(observer, "VerifyingObserverIdentificationCodeSequence")
    signed_at = _datetime(_text(observer.get("VerificationDateTime")), offset) or _datetime(
        _text(ds.get("ContentDate")) + _text(ds.get("ContentTime")), offset
    )
    procedure = (
        _code(ds, "ProcedureCodeSequence")
        or _code(request, "RequestedProcedureCodeSequence")
        or _code(ds, "PerformedProcedureCodeSequence")
    )
    description = _text(request.get("RequestedProcedureDescription") or ds.get("StudyDescription"))
    if procedure is None and description.strip():
        procedure = {"code": "", "meaning": description.strip(), "scheme": ""}
    walker = _Walker(ds)
    document = {
        "accession_number": _text(ds.get("AccessionNumber") or request.get("AccessionNumber")),
        "placer_order_number": _text(
            request.get("PlacerOrderNumberImagingServiceRequest")
            or ds.get("PlacerOrderNumberImagingServiceRequest")
        ).strip()
        or None,
        "filler_order_number": _text(
            request.get("FillerOrderNumberImagingServiceRequest")
            or ds.get("FillerOrderNumberImagingServiceRequest")
        ).strip()
        or None,
        "study_instance_uid": _text(ds.get("StudyInstanceUID")),
        "procedure": procedure,
        "patient": _patient(ds),
        "sections": [
            {"heading": s.heading, "code": s.code, "text": "\n".join(s.lines)}
            for s in walker.sections
            if any(line.strip() for line in s.lines)
        ],
        "radiologist": {
            "id": observer_code["code"] if observer_code else None,
            "name": _person(observer.get("VerifyingObserverName")),
        },
        "observed_at": _datetime(_text(ds.get("StudyDate")) + _text(ds.get("StudyTime")), offset),
        "signed_at": signed_at or datetime.now(UTC),
    }
    return document_from(document)
