"""HL7 v2 for report-return: escaping, the ORU^R01 a RIS receives, and reading its ACK.

Escaping is ours, not hl7apy's: hl7apy leaves a backslash alone when it looks like the
start of an escape sequence, so a report containing ``\\F\\`` literally would arrive as
``|``. Every value is escaped here (``\\E\\ \\F\\ \\S\\ \\T\\ \\R\\``) before hl7apy
assembles the segments; its own escaping leaves such text unchanged. Line breaks become
``\\.br\\`` in FT, or one OBX per line in TX (the site chooses). See docs/hl7-interface.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal

from hl7apy.base_datatypes import FT
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Group, Message
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message

from radflow_core.events import AckError, ReportStatus
from radflow_core.report_document import (
    CodedConcept,
    PersonName,
    ReportDocument,
    ReportSection,
)
from report_return.report import MissingPatientIdentifier, UnencodableText
from report_return.sites import Site, TextType

RESULT_STATUS = {
    ReportStatus.PRELIMINARY: "P",
    ReportStatus.FINAL: "F",
    ReportStatus.CORRECTED: "C",
}
"""OBR-25 / OBX-11 (HL7 table 0123 / 0085)."""
FINDINGS = CodedConcept(code="18782-3", meaning="Radiology Study observation", scheme="LN")
"""OBX-3 of a section that has neither a code nor a heading."""
IMPRESSION = CodedConcept(code="19005-8", meaning="Impression", scheme="LN")
"""OBX-3 of the document's separate impression."""

_ESCAPES = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\"}
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SEQUENCE = re.compile(r"\\(\.br|[FSTRE]|X[0-9A-Fa-f]*|[HN])\\")


def lines(text: str) -> list[str]:
    """The lines of ``text``: LF, CR LF and CR each end one line."""
    return _LINE_BREAK.split(text)


def escape(text: str) -> str:
    """One value for an HL7 field: delimiters escaped, line breaks and other control
    characters (which would end a segment or an MLLP frame) as spaces."""
    flat = _CONTROL.sub(" ", _LINE_BREAK.sub(" ", text))
    return "".join(_ESCAPES.get(char, char) for char in flat)


def escape_formatted(text: str) -> str:
    """FT text: each line escaped, line breaks as ``\\.br\\``."""
    return "\\.br\\".join(escape(line) for line in lines(text))


def unescape(text: str) -> str:
    """Text of an escaped HL7 value (``\\.br\\`` as a line feed; highlighting dropped)."""

    def one(match: re.Match[str]) -> str:
        code = match.group(1)
        if code == ".br":
            return "\n"
        if code in ("H", "N"):
            return ""
        if code.startswith("X"):
            try:
                return bytes.fromhex(code[1:]).decode("latin-1")
            except ValueError:
                return match.group(0)
        return {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\"}[code]

    return _SEQUENCE.sub(one, text)


def control_id(site: str, delivery_key: str) -> str:
    """MSH-10: 20 characters derived from the site and what is delivered, so a retry and
    a replay after a crash carry the same control ID and the RIS can de-duplicate."""
    return hashlib.sha256(f"{site}\n{delivery_key}".encode()).hexdigest()[:20].upper()


def timestamp(moment: datetime) -> str:
    """HL7 DTM in UTC, e.g. 20261123193002+0000."""
    return moment.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


class _Escaped(FT):  # type: ignore[misc]
    """An FT or TX value already escaped here; hl7apy writes it as it is (keeping
    ``\\.br\\``)."""

    def __init__(self, value: str, text: TextType) -> None:
        super().__init__(value)
        self._text = text

    def to_er7(self, encoding_chars: Any = None) -> str:
        return str(self.value)

    @property
    def classname(self) -> str:
        return self._text.value


def _components(*parts: str) -> str:
    """Escaped components joined with ^, trailing empty ones dropped."""
    return "^".join(escape(p) for p in parts).rstrip("^")


def _coded(concept: CodedConcept, text: str | None = None) -> str:
    return _components(concept.code, text or concept.meaning, concept.scheme)


def _xpn(name: PersonName | None) -> str:
    if name is None:
        return ""
    return _components(name.family, name.given, name.middle, name.suffix, name.prefix)


def _xcn(person_id: str | None, name: PersonName, separator: str = "^") -> str:
    parts = (person_id or "", name.family, name.given, name.middle, name.suffix, name.prefix)
    return separator.join(escape(p) for p in parts).rstrip(separator)


@dataclass(frozen=True)
class ChosenIdentifier:
    """The patient identifier a site gets, with its authority and type resolved."""

    id: str
    authority: str | None
    type_code: str


def patient_identifier(document: ReportDocument, site: Site) -> ChosenIdentifier:
    """The report's patient identifier the site's ``patient_identifier`` rule picks
    (PID-3, or the FHIR subject's identifier).

    Raises:
        MissingPatientIdentifier: none from the authority the site expects.
    """
    rule = site.patient_identifier
    for identifier in document.patient.identifiers:
        authority = identifier.assigning_authority or rule.assigning_authority
        if rule.assigning_authority is None or authority == rule.assigning_authority:
            return ChosenIdentifier(
                identifier.id, authority, identifier.type_code or rule.type_code
            )
    raise MissingPatientIdentifier(
        f"the report has no patient identifier from {rule.assigning_authority!r}, the "
        f"assigning authority site {site.name!r} expects"
    )


def _patient_id(document: ReportDocument, site: Site) -> tuple[str, str]:
    """PID-3 (a CX) and its bare identifier."""
    chosen = patient_identifier(document, site)
    cx = _components(chosen.id, "", "", chosen.authority or "", chosen.type_code)
    return cx, chosen.id


def _order_value(document: ReportDocument, what: str) -> str:
    value = getattr(document, what, None)
    return escape(value) if value else ""


@dataclass(frozen=True)
class Observation:
    """One OBX: its identifier, sub-ID, and escaped value."""

    identifier: str
    sub_id: str
    value: str


def observations(document: ReportDocument, text: TextType) -> Iterator[Observation]:
    """The report's text as OBX values: per section (FT) or per line (TX)."""
    sections = list(document.sections)
    if document.impression and document.impression.strip():
        sections.append(
            ReportSection(heading="Impression", code=IMPRESSION, text=document.impression)
        )
    for index, section in enumerate(sections, 1):
        if section.code is not None:
            identifier = _coded(section.code, section.heading)
        elif section.heading:
            identifier = _components("", section.heading)
        else:
            identifier = _coded(FINDINGS)
        if text is TextType.FT:
            yield Observation(identifier, str(index), escape_formatted(section.text))
        else:
            for line in lines(section.text):
                yield Observation(identifier, str(index), escape(line))


@dataclass(frozen=True)
class Oru:
    """An ORU^R01 ready to send."""

    control_id: str
    status: ReportStatus
    er7: str
    """Segments separated by CR."""
    payload: bytes
    """``er7`` in the site's encoding."""
    patient_id: str | None = dataclasses.field(default=None, repr=False)
    """PID-3's identifier (CX-1, unescaped), for the Export audit message only."""


def build_oru(
    document: ReportDocument,
    status: ReportStatus,
    site: Site,
    message_control_id: str,
    now: datetime,
) -> Oru:
    """The ORU^R01 for one report version, as ``site`` wants it (docs/hl7-interface.md).

    Raises:
        MissingPatientIdentifier: none of the report's identifiers fits the site's rule.
        UnencodableText: the site's encoding cannot carry a character of the report.
    """
    result = RESULT_STATUS[status]
    message = Message(
        "ORU_R01", version=site.hl7_version, validation_level=VALIDATION_LEVEL.TOLERANT
    )
    msh = message.msh
    msh.msh_3 = escape(site.sending_application)
    msh.msh_4 = escape(site.sending_facility)
    msh.msh_5 = escape(site.receiving_application)
    msh.msh_6 = escape(site.receiving_facility)
    msh.msh_7 = timestamp(now)
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = message_control_id
    msh.msh_11 = site.processing_id
    msh.msh_12 = site.hl7_version
    if site.charset:
        msh.msh_18 = site.charset
    patient_result = message.add_group("ORU_R01_PATIENT_RESULT")
    pid = patient_result.add_group("ORU_R01_PATIENT").pid
    pid.pid_1 = "1"
    pid.pid_3, patient_id = _patient_id(document, site)
    if document.patient.name is not None and _xpn(document.patient.name):
        pid.pid_5 = _xpn(document.patient.name)
    if document.patient.birth_date is not None:
        pid.pid_7 = _date(document.patient.birth_date)
    if document.patient.sex is not None:
        pid.pid_8 = document.patient.sex
    order = patient_result.add_group("ORU_R01_ORDER_OBSERVATION")
    _fill_order(order, document, site, result)
    for set_id, observation in enumerate(observations(document, site.text), 1):
        obx = order.add_group("ORU_R01_OBSERVATION").obx
        obx.obx_1 = str(set_id)
        obx.obx_2 = site.text.value
        obx.obx_3 = observation.identifier
        obx.obx_4 = observation.sub_id
        obx.obx_5.datatype = site.text.value
        obx.obx_5.value = _Escaped(observation.value, site.text)
        obx.obx_11 = result
        obx.obx_14 = timestamp(document.signed_at)
        obx.obx_16 = _xcn(document.radiologist.id, document.radiologist.name)
    er7 = message.to_er7()
    try:
        payload = er7.encode(site.codec)
    except UnicodeEncodeError:
        raise UnencodableText(
            f"the report has characters that {site.encoding} (site {site.name!r}) cannot carry"
        ) from None
    return Oru(message_control_id, status, er7, payload, patient_id)


def _fill_order(order: Group, document: ReportDocument, site: Site, result: str) -> None:
    orc, obr = order.orc, order.obr
    orc.orc_1 = "RE"
    orc.orc_5 = "CM"
    obr.obr_1 = "1"
    for field, what in site.order_fields.items():
        segment, number = field.lower().split("-")
        value = _order_value(document, what)
        if value:
            setattr(orc if segment == "orc" else obr, f"{segment}_{number}", value)
    procedure = document.procedure or CodedConcept(meaning="Radiology report")
    obr.obr_4 = _coded(procedure)
    if document.observed_at is not None:
        obr.obr_7 = timestamp(document.observed_at)
    obr.obr_22 = timestamp(document.signed_at)
    obr.obr_24 = "RAD"
    obr.obr_25 = result
    obr.obr_32 = _xcn(document.radiologist.id, document.radiologist.name, "&")


def _date(value: date) -> str:
    return value.strftime("%Y%m%d")


AckCode = Literal["AA", "AE", "AR"]
_ACK_CODES: dict[str, AckCode] = {
    "AA": "AA",
    "CA": "AA",
    "AE": "AE",
    "CE": "AE",
    "AR": "AR",
    "CR": "AR",
}
"""Original-mode codes, and the enhanced-mode ones read as their equivalents."""


@dataclass(frozen=True)
class Ack:
    """What the RIS answered, redacted: its codes, never its words.

    A RIS's free text (MSA-3, ERR-7, ERR-8, the text of a coded value) often quotes the
    message it refuses, patient name and identifiers included; it is not kept, so it
    cannot reach an event or a log."""

    code: AckCode | None
    """None when the answer is not a readable acknowledgement of our message."""
    errors: tuple[AckError, ...]
    """Each ERR segment's coded fields (values that do not fit a code are dropped)."""
    problem: str
    """Why the answer is not a valid acknowledgement ('' when it is one); written by
    report-return, never quoting the answer."""


def parse_ack(data: bytes, codec: str, expected_control_id: str) -> Ack:
    """Read an ACK (the bytes inside the MLLP frame); never raises."""
    text = data.decode(codec, errors="replace")
    segments_text = "\r".join(s for s in _LINE_BREAK.split(text) if s)
    try:
        message = parse_message(
            segments_text,
            validation_level=VALIDATION_LEVEL.TOLERANT,
            find_groups=False,
        )
        segments = {s.name: s for s in message.children}
        msa = segments.get("MSA")
        errors = tuple(_err_codes(s) for s in message.children if s.name == "ERR")
    except (HL7apyException, ValueError, KeyError, IndexError, AttributeError, TypeError):
        return Ack(None, (), "the answer is not an HL7 message")
    if msa is None:
        return Ack(None, errors, "the answer has no MSA segment")
    code = _ACK_CODES.get(_field(msa, 1))
    if code is None:
        return Ack(None, errors, "MSA-1 is not an acknowledgement code")
    if _field(msa, 2) != expected_control_id:
        return Ack(
            None,
            errors,
            f"MSA-2 does not acknowledge our control ID {expected_control_id!r}",
        )
    return Ack(code, errors, "")


def _field(segment: Any, number: int) -> str:
    """Field ``number`` of a parsed segment as ER7 ('' when absent)."""
    name = f"{segment.name}_{number}"
    for child in segment.children:
        if child.name == name:
            return str(child.to_er7())
    return ""


_CODE = re.compile(r"[0-9]{1,5}")
ORU_SEGMENTS = frozenset(
    {"MSH", "SFT", "PID", "PD1", "NTE", "NK1", "PV1", "PV2", "ORC", "OBR", "TQ1", "TQ2"}
    | {"CTD", "OBX", "FT1", "CTI", "SPM", "DSC"}
)
"""Segments of an ORU^R01 (v2.5.1): an error location names one of ours, so any other
three letters in ERR-2 are the RIS's text, not a location."""
_POSITION = re.compile(r"[0-9]{0,5}")


def _err_codes(segment: Any) -> AckError:
    """An ERR segment's codes: HL7 error code (ERR-3), severity (ERR-4), location
    (ERR-2); v2.4's ERR-1 (location and code in one field) when ERR-2 and ERR-3 are
    absent. The first repetition of each; what does not fit a code's syntax is left out."""
    location = _first(_field(segment, 2)).split("^")
    code = _first(_field(segment, 3)).split("^")[0]
    if not location[0] and not code:
        legacy = _first(_field(segment, 1)).split("^")
        location = legacy[:3]
        code = legacy[3].split("&")[0] if len(legacy) > 3 else ""
    severity = _first(_field(segment, 4))
    return AckError(
        hl7_error_code=code if _CODE.fullmatch(code) else None,
        severity=severity if severity in ("E", "F", "I", "W") else None,
        location=_location(location),
    )


def _first(value: str) -> str:
    return value.split("~", 1)[0]


def _location(parts: list[str]) -> str | None:
    numbers = [p.split("&", 1)[0] for p in parts[1:6]]
    if parts[0] not in ORU_SEGMENTS or not all(_POSITION.fullmatch(n) for n in numbers):
        return None
    return "^".join([parts[0], *numbers]).rstrip("^")
