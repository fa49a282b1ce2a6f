"""Reading and checking the identifying header of a DICOM Part 10 file.

Shared by ingest (to validate what a sender gave us and build the received event)
and by later stages (which re-read blobs). Parsing is defensive: large values are
deferred (never loaded), a file that ends before its declared lengths is rejected,
and pathological nesting is reported as "cannot understand" instead of crashing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag, Tag

from radflow_core.dicom_status import StoreStatus
from radflow_core.errors import PipelineError
from radflow_core.transfer_syntaxes import ACCEPTED
from radflow_core.uids import is_valid_uid

_DEFER_BYTES = 4096
_PATIENT_ID = Tag(0x0010, 0x0020)


class InvalidInstance(PipelineError):
    """The bytes are not an acceptable DICOM instance; carries the status to answer."""

    reason = "invalid_instance"

    def __init__(self, status: StoreStatus, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class InstanceHeader:
    """Identifying, PHI-free attributes of one instance."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str | None
    body_part_examined: str | None
    requested_procedure_priority: str | None = None
    """(0040,1003), top level or in the Request Attributes Sequence: STAT, HIGH,
    ROUTINE, MEDIUM or LOW. Ingest picks the instance's lane by it."""


def _text(ds: FileDataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip()[:64] or None


def requested_procedure_priority(ds: Dataset) -> str | None:
    """(0040,1003) at the top level, else in the first Request Attributes Sequence item
    that has it; None when absent or undecodable (a priority never rejects an instance)."""
    try:
        value = ds.get("RequestedProcedurePriority")
        if not value:
            for item in ds.get("RequestAttributesSequence") or ():
                value = item.get("RequestedProcedurePriority")
                if value:
                    break
    except Exception:  # noqa: BLE001 - one undecodable value does not stop ingest
        return None
    if not value:
        return None
    return str(value).strip()[:16] or None


ATTRIBUTE_TEXT_LIMIT = 1024
"""Characters of an attribute's value that routing rules see."""


def attribute_text(value: object) -> str | None:
    """An attribute's value as routing rules see it, wherever it was read (the header
    by the router, the dataset by transcode for the event): the same text either way."""
    return None if value is None else str(value)[:ATTRIBUTE_TEXT_LIMIT]


ROUTING_KEYWORDS = (
    "RequestedProcedurePriority",
    "Manufacturer",
    "ManufacturerModelName",
)
"""The header attributes the normalized event carries for routing
(:class:`radflow_core.events.RoutingAttributes`)."""


def routing_attributes(ds: Dataset) -> dict[str, str | None]:
    """:data:`ROUTING_KEYWORDS` of a dataset by keyword, as :func:`attribute_text` reads
    them (None when absent or undecodable). Reads those elements only, so a dataset with
    its Pixel Data deferred keeps it deferred."""
    values: dict[str, str | None] = {}
    for keyword in ROUTING_KEYWORDS:
        try:
            values[keyword] = attribute_text(ds.get(keyword))
        except Exception:  # noqa: BLE001 - one undecodable value does not stop routing
            values[keyword] = None
    if not values["RequestedProcedurePriority"]:
        values["RequestedProcedurePriority"] = requested_procedure_priority(ds)
    return values


PATIENT_ID_LIMIT = 1024 * 1024
"""Bytes of a stored file :func:`read_patient_id` may read: Patient ID (0010,0020)
follows only the file meta and groups 0008/0009, so one ranged block holds it."""


def patient_id(ds: Dataset) -> str | None:
    """Patient ID (0010,0020), for the audit trail only (PS3.15 A.5.3 requires it in
    Instances Transferred); None when absent or undecodable. It is PHI: it never goes
    into an event, a log line or :class:`InstanceHeader`."""
    try:
        value = ds.get("PatientID")
    except Exception:  # noqa: BLE001 - an undecodable value is an unknown patient
        return None
    text = str(value).strip("\0 ")[:64] if value is not None else ""
    return text or None


@dataclass(frozen=True)
class Accession:
    """An instance's Accession Number (0008,0050) and its issuer: they identify the
    patient's examination, so they serve only to find its order (as an order reference,
    :mod:`radflow_core.orders`) and never go into an event, a log line or
    :class:`InstanceHeader`."""

    number: str = field(repr=False)
    issuer: str | None = field(repr=False)
    """Local Namespace Entity ID (0040,0031) of the first Issuer of Accession Number
    Sequence (0008,0051) item, as HL7 names an accession's assigning authority (EI.2)."""


def accession(ds: Dataset) -> Accession | None:
    """The Accession Number and its issuer; None when absent or undecodable (an
    accession number never rejects an instance: it is routed without its order)."""
    try:
        number = str(ds.get("AccessionNumber") or "").strip("\0 ")
        issuer = None
        for item in ds.get("IssuerOfAccessionNumberSequence") or ():
            issuer = str(item.get("LocalNamespaceEntityID") or "").strip("\0 ") or None
            break
    except Exception:  # noqa: BLE001 - one undecodable value does not stop ingest
        return None
    return Accession(number[:64], issuer[:64] if issuer else None) if number else None


@dataclass(frozen=True)
class Identifiers:
    """What identifies the patient and the examination in a header, kept apart from
    :class:`InstanceHeader` so that it never reaches an event or a log line."""

    patient_id: str | None = field(default=None, repr=False)
    """(0010,0020), for the audit trail."""
    accession: Accession | None = field(default=None, repr=False)
    """For the order lookup."""


def _past_patient_id(tag: BaseTag, vr: str | None, length: int) -> bool:
    return bool(tag > _PATIENT_ID)


def read_patient_id(file: BinaryIO) -> str | None:
    """The Patient ID of a stored Part 10 file, parsing nothing after it (for a ranged
    read of a blob: only the first block is fetched). None when there is none.

    Raises:
        Any parser error: the caller counts the patient as unknown.
    """
    file.seek(0)
    ds = read_partial(file, stop_when=_past_patient_id, defer_size=_DEFER_BYTES)
    return patient_id(ds)


def read_header(file: BinaryIO, size: int) -> InstanceHeader:
    """Parse a Part 10 file's structure and identifying attributes.

    Raises:
        InvalidInstance: with the DICOM status that describes what is wrong.
    """
    return read_header_and_patient(file, size)[0]


def read_header_and_patient(file: BinaryIO, size: int) -> tuple[InstanceHeader, str | None]:
    """:func:`read_header` and the Patient ID (for the audit trail only), from one parse.

    Raises:
        InvalidInstance: with the DICOM status that describes what is wrong.
    """
    header, identifiers = read_header_and_identifiers(file, size)
    return header, identifiers.patient_id


def read_header_and_identifiers(file: BinaryIO, size: int) -> tuple[InstanceHeader, Identifiers]:
    """:func:`read_header` and the patient's and examination's identifiers (for the
    audit trail and the order lookup only), from one parse.

    Raises:
        InvalidInstance: with the DICOM status that describes what is wrong.
    """
    file.seek(0)
    try:
        ds = dcmread(file, defer_size=_DEFER_BYTES)
        ds.get("SOPInstanceUID")  # forces the lazy parse of the header's elements
    except InvalidDicomError:
        raise InvalidInstance(
            StoreStatus.CANNOT_UNDERSTAND, "not a DICOM Part 10 file (no preamble/meta)"
        ) from None
    except RecursionError:
        raise InvalidInstance(
            StoreStatus.CANNOT_UNDERSTAND, "sequences nested too deeply"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any parser failure means "cannot understand"
        # pydicom's messages can quote element values; only the type is reported.
        raise InvalidInstance(
            StoreStatus.CANNOT_UNDERSTAND, f"unparsable dataset ({type(exc).__name__})"
        ) from None
    finally:
        consumed = file.tell()
    if consumed > size:
        raise InvalidInstance(StoreStatus.CANNOT_UNDERSTAND, "dataset truncated")

    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts is None:
        raise InvalidInstance(StoreStatus.MISSING_ATTRIBUTE, "no Transfer Syntax UID in file meta")
    if ts not in ACCEPTED:
        raise InvalidInstance(
            StoreStatus.TRANSFER_SYNTAX_NOT_SUPPORTED, "transfer syntax not accepted"
        )
    values: dict[str, str] = {}
    for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
        try:
            raw = ds.get(keyword)
        except Exception:  # noqa: BLE001 - a value pydicom cannot decode
            raise InvalidInstance(
                StoreStatus.CANNOT_UNDERSTAND, f"{keyword} cannot be decoded"
            ) from None
        if raw is None or str(raw).strip("\0 ") == "":
            raise InvalidInstance(StoreStatus.MISSING_ATTRIBUTE, f"{keyword} is missing")
        value = str(raw).strip("\0 ")
        if not is_valid_uid(value):
            raise InvalidInstance(StoreStatus.INVALID_UID, f"{keyword} is not a valid UID")
        values[keyword] = value
    header = InstanceHeader(
        sop_instance_uid=values["SOPInstanceUID"],
        sop_class_uid=values["SOPClassUID"],
        study_instance_uid=values["StudyInstanceUID"],
        series_instance_uid=values["SeriesInstanceUID"],
        transfer_syntax_uid=str(ts),
        modality=_text(ds, "Modality"),
        body_part_examined=_text(ds, "BodyPartExamined"),
        requested_procedure_priority=requested_procedure_priority(ds),
    )
    return header, Identifiers(patient_id(ds), accession(ds))
