"""Modality Worklist matching (PS3.4 K.6 and C.2.2.2): pure, no network.

Each open step is turned into a full worklist data set (:func:`item_dataset`); a query
identifier is matched against it attribute by attribute and the answer holds exactly
the query's keys (:func:`answer`):

- an empty key matches everything (universal matching) and is returned with the item's
  value, or empty when the order did not give one;
- single value matching, case-sensitive, except Patient's Name and the other person
  names, which match case-insensitively (as modalities type them);
- ``*`` and ``?`` wildcards in string keys (not in dates, times, UIDs);
- ranges (``A-B``, ``-B``, ``A-``) for dates and times, each on its own;
- a list of UIDs (backslash-separated);
- sequence matching: the first item of a query sequence is matched against each item
  of the step's sequence (Scheduled Procedure Step Sequence, the code sequences); an
  empty sequence returns every attribute the worklist keeps in it.

A non-empty key the worklist does not keep does not filter (PS3.4 C.2.2.1.1 lets an
SCP ignore optional matching keys) and is returned empty.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from radflow_core.events import OrderPriority
from radflow_core.order_document import OrderDocument
from radflow_core.report_document import CodedConcept, PersonName
from worklist.sites import CHARACTER_SETS

PRIORITY = {
    OrderPriority.STAT: "STAT",
    OrderPriority.ASAP: "HIGH",
    OrderPriority.ROUTINE: "ROUTINE",
}
"""(0040,1003) Requested Procedure Priority."""
_STRING_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "AS"}
_CASE_INSENSITIVE = {"PN"}


def _pn(name: PersonName | None) -> str:
    if name is None:
        return ""
    parts = [name.family, name.given, name.middle, name.prefix, name.suffix]
    return "^".join(parts).rstrip("^")


def _code(concept: CodedConcept) -> Dataset:
    ds = Dataset()
    ds.CodeValue = concept.code[:16]
    ds.CodingSchemeDesignator = concept.scheme[:16] or "L"
    ds.CodeMeaning = concept.meaning[:64]
    return ds


def item_dataset(doc: OrderDocument) -> Dataset:
    """The whole worklist item of one step (every attribute the worklist keeps)."""
    step = doc.step
    sps = Dataset()
    sps.ScheduledStationAETitle = step.station_ae or ""
    sps.ScheduledProcedureStepStartDate = step.start_date.strftime("%Y%m%d")
    sps.ScheduledProcedureStepStartTime = (
        step.start_time.strftime("%H%M%S") if step.start_time else ""
    )
    sps.Modality = step.modality or ""
    sps.ScheduledPerformingPhysicianName = _pn(step.performing_physician)
    sps.ScheduledProcedureStepDescription = step.description or ""
    sps.ScheduledProtocolCodeSequence = Sequence([_code(step.protocol)] if step.protocol else [])
    sps.ScheduledStationName = step.station_name or ""
    sps.ScheduledProcedureStepLocation = step.location or ""
    sps.ScheduledProcedureStepID = step.step_id
    sps.ScheduledProcedureStepStatus = step.status

    ds = Dataset()
    ds.AccessionNumber = doc.accession_number
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = doc.accession_issuer or ""
    ds.IssuerOfAccessionNumberSequence = Sequence([issuer] if doc.accession_issuer else [])
    ds.ReferringPhysicianName = _pn(doc.referring_physician)
    patient = doc.patient
    first = patient.identifiers[0]
    ds.PatientName = _pn(patient.name)
    ds.PatientID = first.id
    ds.IssuerOfPatientID = first.assigning_authority or ""
    ds.PatientBirthDate = patient.birth_date.strftime("%Y%m%d") if patient.birth_date else ""
    ds.PatientSex = patient.sex if patient.sex in ("M", "F", "O") else ""
    ds.StudyInstanceUID = doc.study_instance_uid
    ds.RequestedProcedureID = doc.requested_procedure_id
    procedure = doc.requested_procedure
    ds.RequestedProcedureDescription = procedure.meaning[:64] if procedure else ""
    ds.RequestedProcedureCodeSequence = Sequence([_code(procedure)] if procedure else [])
    ds.RequestedProcedurePriority = PRIORITY[doc.priority]
    ds.ReasonForTheRequestedProcedure = doc.reason or ""
    ds.PlacerOrderNumberImagingServiceRequest = doc.placer_order_number or ""
    ds.FillerOrderNumberImagingServiceRequest = doc.filler_order_number or ""
    ds.ScheduledProcedureStepSequence = Sequence([sps])
    return ds


def _wildcard(pattern: str, case_insensitive: bool) -> re.Pattern[str]:
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(f"^{body}$", re.DOTALL | (re.IGNORECASE if case_insensitive else 0))


def _in_range(query: str, value: str, width: int) -> bool:
    """DA/TM range or single value; times compared on their first ``width`` digits
    padded (a query 1000-1200 matches 103000)."""
    if not value:
        return False

    def norm(text: str, low: bool) -> str:
        digits = text.replace(":", "").split(".")[0]
        return digits.ljust(width, "0" if low else "9")[:width]

    if "-" not in query:
        if width == 8:
            return value == query
        return norm(query, True) <= norm(value, True) <= norm(query, False)
    low, high = query.split("-", 1)
    v = norm(value, True)
    return (not low or norm(low, True) <= v) and (not high or v <= norm(high, False))


def _text(elem: DataElement) -> str:
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def _matches_value(vr: str, query: str, value: str) -> bool:
    if vr == "DA":
        return _in_range(query, value, 8)
    if vr == "TM":
        return _in_range(query, value, 6)
    if vr == "UI":
        return value in query.split("\\")
    insensitive = vr in _CASE_INSENSITIVE
    if vr in _STRING_VRS and ("*" in query or "?" in query):
        return bool(_wildcard(query, insensitive).match(value))
    if insensitive:
        return query.strip().lower() == value.strip().lower()
    return query.strip() == value.strip()


def match(query: Dataset, item: Dataset) -> Dataset | None:
    """The answer to ``query`` from ``item`` (exactly the query's keys), or None when
    a matching key does not match."""
    out = Dataset()
    for elem in query:
        if elem.tag == 0x00080005 or elem.tag.group == 0x0002:
            continue
        kept = item.get(elem.tag)
        vr = elem.VR
        if vr == "SQ":
            answer = _match_sequence(elem, kept)
            if answer is None:
                return None
            out.add(answer)
            continue
        query_text = _text(elem)
        if kept is None:
            out.add_new(elem.tag, vr, None)
            continue
        value = _text(kept)
        if query_text and not _matches_value(vr, query_text, value):
            return None
        out.add_new(elem.tag, kept.VR, kept.value if value else None)
    return out


def _match_sequence(elem: DataElement, kept: DataElement | None) -> DataElement | None:
    items = list(elem.value or [])
    if kept is None:
        return DataElement(elem.tag, "SQ", Sequence([]))
    candidates = list(kept.value or [])
    if not items:
        return DataElement(elem.tag, "SQ", Sequence([_copy(c) for c in candidates]))
    wanted = items[0]
    if len(wanted) == 0:
        return DataElement(elem.tag, "SQ", Sequence([_copy(c) for c in candidates]))
    answers = [a for a in (match(wanted, c) for c in candidates) if a is not None]
    if not answers:
        if not candidates and not _has_matching_key(wanted):
            return DataElement(elem.tag, "SQ", Sequence([]))
        return None
    return DataElement(elem.tag, "SQ", Sequence(answers))


def _has_matching_key(query: Dataset) -> bool:
    for elem in query:
        if elem.VR == "SQ":
            if any(_has_matching_key(i) for i in elem.value or []):
                return True
        elif _text(elem):
            return True
    return False


def _copy(ds: Dataset) -> Dataset:
    out = Dataset()
    for elem in ds:
        out.add(elem)
    return out


def answer_character_set(preferred: str, answer: Dataset) -> str:
    """``preferred`` when every text of ``answer`` fits it, else ISO_IR 192 (UTF-8):
    a federated site's names may not fit the asking site's character set."""
    codec = CHARACTER_SETS.get(preferred, "utf-8")
    try:
        for text in _texts(answer):
            text.encode(codec)
    except UnicodeEncodeError:
        return "ISO_IR 192"
    return preferred


def _texts(ds: Dataset) -> Iterable[str]:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value or []:
                yield from _texts(item)
        elif elem.VR in _STRING_VRS and elem.value is not None:
            yield _text(elem)
